"""Hostile inputs: every one is answered with an image or a precise `Rejected`, never a crash or a hang."""

from __future__ import annotations

import asyncio
import functools
import io
import json
import struct
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from PIL import Image

from moderation.client import event_message, publish, read_outcomes, upload_images
from moderation.devkit import hostile_images
from moderation.devkit.demo import stop_worker
from moderation.devkit.samples import draw_image, encode
from moderation.errors import Reason, Rejected
from moderation.events import UploadEvent, parse_upload
from moderation.model.imaging import decode, preprocess

FORMATS = ["JPEG", "PNG", "WEBP", "GIF", "TIFF", "BMP"]
CAP = 10_000_000


@functools.cache
def encoded(fmt: str, size: tuple[int, int] = (96, 64), mode: str = "RGB") -> bytes:
    image = draw_image(5, size).convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    return buffer.getvalue()


def blank_png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def decode_or_reason(data: bytes) -> Reason | None:
    try:
        decoded = decode(data, max_pixels=CAP)
    except Rejected as exc:
        return exc.reason
    assert decoded.image.mode == "RGB" and decoded.image.size[0] > 0
    assert preprocess(decoded.image).shape == (3, 336, 336)
    return None


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("fraction", [0.0, 0.05, 0.3, 0.6, 0.95])
def test_truncated_files_of_every_format_are_invalid_images_or_decode(fmt: str, fraction: float) -> None:
    data = encoded(fmt)
    assert decode_or_reason(data[: int(len(data) * fraction)]) in (None, Reason.INVALID_IMAGE, Reason.EMPTY_OBJECT)


@pytest.mark.parametrize("fmt", FORMATS)
@settings(max_examples=25, deadline=2000, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_corrupted_files_never_crash_the_decoder(fmt: str, data: st.DataObject) -> None:
    original = bytearray(encoded(fmt))
    for _ in range(data.draw(st.integers(1, 8))):
        position = data.draw(st.integers(0, len(original) - 1))
        original[position] = data.draw(st.integers(0, 255))
    assert decode_or_reason(bytes(original)) in (
        None,
        Reason.INVALID_IMAGE,
        Reason.TOO_MANY_PIXELS,
        Reason.UNSUPPORTED_FORMAT,  # a corrupted signature can be another format's
    )


@settings(max_examples=200, deadline=1000)
@given(st.binary(max_size=512))
def test_arbitrary_bytes_never_crash_the_decoder(data: bytes) -> None:
    expected = (None, Reason.INVALID_IMAGE, Reason.EMPTY_OBJECT, Reason.TOO_MANY_PIXELS, Reason.UNSUPPORTED_FORMAT)
    assert decode_or_reason(data) in expected


def jpeg_claiming(width: int, height: int) -> bytes:
    """A small JPEG whose frame header claims other dimensions: a decompression bomb's header."""
    data = bytearray(encoded("JPEG", (64, 64)))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def gif_claiming(width: int, height: int) -> bytes:
    data = bytearray(encoded("GIF", (64, 64)))
    data[6:10] = struct.pack("<HH", width, height)  # the logical screen
    return bytes(data)


@pytest.mark.parametrize(
    "bomb",
    [
        pytest.param(lambda: blank_png(12_000, 12_000), id="png-144MP"),
        pytest.param(lambda: jpeg_claiming(60_000, 60_000), id="jpeg-header-3.6GP"),
        pytest.param(lambda: gif_claiming(65_535, 65_535), id="gif-screen-4.3GP"),
    ],
)
def test_decompression_bombs_are_refused_from_the_header(bomb) -> None:  # type: ignore[no-untyped-def]
    data = bomb()
    assert len(data) < 2_000_000
    with pytest.raises(Rejected) as caught:
        decode(data, max_pixels=50_000_000)
    assert caught.value.reason == Reason.TOO_MANY_PIXELS


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (40, 30), (i * 50, 10, 200 - i * 40)) for i in range(4)]
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=frames[1:], duration=50)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG", "TIFF"])
def test_decode_reads_the_first_frame_of_an_animated_or_multi_frame_image(fmt: str) -> None:
    # the worker judges the others too (moderation.model.frames, tests/test_frames.py)
    decoded = decode(animated(fmt), max_pixels=CAP)
    assert decoded.image.size == (40, 30)
    assert tuple(np.asarray(decoded.image)[0, 0]) == pytest.approx((0, 10, 200), abs=8)


def test_sixteen_bit_images_are_scaled_not_clipped() -> None:
    ramp = np.linspace(0, 65535, 64 * 48).astype(np.uint16).reshape(48, 64)
    buffer = io.BytesIO()
    Image.fromarray(ramp).save(buffer, format="PNG")
    pixels = np.asarray(decode(buffer.getvalue(), max_pixels=CAP).image)
    assert pixels.min() == 0 and pixels.max() == 255 and 120 < pixels.mean() < 135


@pytest.mark.parametrize(
    ("mode", "fmt"),
    [
        ("CMYK", "JPEG"),
        ("CMYK", "TIFF"),
        ("P", "PNG"),
        ("RGBA", "PNG"),
        ("LA", "PNG"),
        ("1", "PNG"),
        ("RGBA", "WEBP"),
        ("L", "JPEG"),
    ],
)
def test_every_colour_mode_becomes_rgb(mode: str, fmt: str) -> None:
    assert decode_or_reason(encoded(fmt, mode=mode)) is None


def test_exif_orientation_is_left_as_fakevlm_sees_it() -> None:
    # FakeVLM's eval opens images without applying EXIF orientation; so do we, to keep its scores.
    image = draw_image(1, (80, 40))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 on display
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert decode(buffer.getvalue(), max_pixels=CAP).image.size == (80, 40)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4),
    max_leaves=12,
)
GOOD = {"schema_version": 1, "event_id": "e-1", "bucket": "uploads", "key": "a.jpg"}


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=300))
def test_arbitrary_payloads_parse_or_are_rejected(payload: bytes) -> None:
    try:
        assert isinstance(parse_upload(payload), UploadEvent)
    except Rejected as exc:
        assert exc.reason in (Reason.INVALID_EVENT, Reason.UNSUPPORTED_SCHEMA)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=15), json_values, max_size=6), st.sampled_from([True, False]))
@example({"schema_version": []}, True)  # an unhashable version once raised TypeError, not a reason code
@example({"schema_version": True}, True)
def test_arbitrary_json_objects_parse_or_are_rejected(extra: dict[str, object], keep_good: bool) -> None:
    body = (GOOD | extra) if keep_good else extra
    try:
        event = parse_upload(json.dumps(body).encode())
    except Rejected as exc:
        assert exc.reason in (Reason.INVALID_EVENT, Reason.UNSUPPORTED_SCHEMA)
        assert len(exc.detail) < 2000
    else:
        assert event.event_id == body["event_id"]


@pytest.mark.parametrize(
    "odd",
    [
        {"event_id": "x" * 201},
        {"event_id": 12345},
        {"event_id": "a\x00b"},
        {"bucket": "../etc"},
        {"key": ""},
        {"key": "k" * 1025},
        {"attributes": {"nested": {"a": 1}}},
        {"attributes": {"k" * 129: "v"}},
        {"attributes": {str(i): "v" for i in range(40)}},
        {"size_bytes": -1},
        {"uploaded_at": "yesterday"},
        {"\u202eevil": 1},
        {"EVENT_ID": "dup"},
    ],
)
def test_odd_fields_and_keys_are_invalid_events(odd: dict[str, object]) -> None:
    with pytest.raises(Rejected) as caught:
        parse_upload(json.dumps(GOOD | odd).encode())
    assert caught.value.reason == Reason.INVALID_EVENT


def test_huge_payloads_are_rejected_quickly() -> None:
    payload = json.dumps(GOOD | {"attributes": {"a": "v" * 5_000_000}}).encode()
    with pytest.raises(Rejected):
        parse_upload(payload)


@pytest.mark.integration
@pytest.mark.slow
def test_other_formats_and_structure_bombs_are_dead_letters_through_a_real_worker(lane, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    settings = lane.settings
    files = {
        "eps": (hostile_images.other_format("EPS"), Reason.UNSUPPORTED_FORMAT),
        "psd": (hostile_images.other_format("PSD"), Reason.UNSUPPORTED_FORMAT),
        "ico": (hostile_images.other_format("ICO"), Reason.UNSUPPORTED_FORMAT),
        "chunks": (hostile_images.png_with_private_chunks(200_000), Reason.INVALID_IMAGE),
        "scans": (hostile_images.progressive_jpeg((640, 480), 100), Reason.INVALID_IMAGE),
        "good": (encode(draw_image(4, (640, 480)), "JPEG"), None),
        "good-16bit": (hostile_images.sixteen_bit_png((900, 700)), None),
    }
    paths = []
    for name, (data, _) in files.items():
        (path := tmp_path / name).write_bytes(data)
        paths.append(path)
    events = asyncio.run(upload_images(settings, paths, bucket=settings.s3_allowed_buckets[0]))
    expected = {event.event_id: files[Path(event.key).name][1] for event in events}
    asyncio.run(publish(settings, [event_message(e) for e in events]))

    worker = lane.worker()
    try:
        outcomes = asyncio.run(read_outcomes(settings, set(expected), timeout_s=300))
    finally:
        stop_worker(worker)
    for event_id, reason in expected.items():
        if reason is None:
            assert len(outcomes.verdicts[event_id]) == 1, outcomes.dead_letters.get(event_id)
        else:
            [letter] = outcomes.dead_letters[event_id]
            assert (letter.reason, letter.retryable) == (reason, False), letter.detail
