"""decode_for_model: FakeVLM's uint8 crop from bytes, fast; normalised, within a stated tolerance of the CLIP
processor."""

import functools
import io

import numpy as np
import pytest
from PIL import Image
from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

from moderation.devkit.samples import draw_image, encode
from moderation.errors import Reason, Rejected
from moderation.model.imaging import (
    CLIP_STD,
    CROP_SIZE,
    FAST_MAX_ABS_DIFF,
    FAST_MEAN_ABS_DIFF,
    decode,
    decode_for_model,
    normalise,
    preprocess,
)
from tests.fixtures.models import LLAVA_PREPROCESSOR

CAP = 10**8
ONE_LEVEL = 1 / 255 / min(CLIP_STD) + 1e-6  # one 8-bit level, in normalised units


@pytest.fixture(scope="module")
def reference() -> CLIPImageProcessorPil:
    return CLIPImageProcessorPil(**LLAVA_PREPROCESSOR)


@functools.cache
def _photo(seed: int, size: tuple[int, int]) -> Image.Image:
    return draw_image(seed, size)  # seconds at 12 MP: drawn once for both formats


def _fast(data: bytes, **kwargs: float) -> np.ndarray:
    return normalise(decode_for_model(data, max_pixels=CAP, **kwargs).pixels)


def _theirs(reference: CLIPImageProcessorPil, data: bytes) -> np.ndarray:
    full = Image.open(io.BytesIO(data)).convert("RGB")
    return reference(images=full, return_tensors="np")["pixel_values"][0]


@pytest.mark.parametrize(
    ("size", "seed"),
    [
        ((1155, 866), 11),  # 1 MP: JPEG decoded at full size
        ((1732, 2309), 12),  # 4 MP portrait: JPEG at 1/2 scale
        ((3266, 2449), 13),  # 8 MP: JPEG at 1/2
        pytest.param((4000, 3000), 14, marks=pytest.mark.slow),  # 12 MP: JPEG at 1/4
    ],
)
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_matches_the_clip_processor_within_the_stated_tolerance(reference, size, seed, fmt) -> None:
    data = encode(_photo(seed, size), fmt)
    fast = decode_for_model(data, max_pixels=CAP)
    theirs = _theirs(reference, data)
    diff = np.abs(normalise(fast.pixels) - theirs)
    assert fast.pixels.shape == (CROP_SIZE, CROP_SIZE, 3) and theirs.shape == (3, CROP_SIZE, CROP_SIZE)
    assert fast.pixels.dtype == np.uint8 and fast.pixels.flags.c_contiguous
    assert diff.max() <= FAST_MAX_ABS_DIFF, f"max abs diff {diff.max():.4f}"
    assert diff.mean() <= FAST_MEAN_ABS_DIFF, f"mean abs diff {diff.mean():.5f}"
    assert (fast.width, fast.height, fast.format) == (*size, fmt)


@pytest.mark.parametrize(
    ("size", "levels"),
    [
        ((640, 480), 1),
        ((480, 640), 1),
        ((336, 336), 0),
        ((1000, 337), 1),
        ((1155, 866), 1),
        ((1732, 2309), 1),
        ((120, 90), 2),  # enlarged
        ((3000, 100), 2),  # enlarged
    ],
)
def test_lossless_formats_are_within_a_level_or_two(size, levels) -> None:
    # No DCT scaling: torch's bicubic kernel computes Pillow's filter, up to the rounding of its fixed point.
    data = encode(draw_image(5, size), "PNG")
    expected = preprocess(decode(data, max_pixels=CAP).image)
    diff = np.abs(_fast(data) - expected)
    assert diff.max() <= levels * ONE_LEVEL and diff.mean() <= FAST_MEAN_ABS_DIFF / 10


def test_a_larger_reducing_gap_is_closer_to_the_reference(reference) -> None:
    data = encode(draw_image(21, (2400, 1800)), "JPEG")
    theirs = _theirs(reference, data)
    errors = [np.abs(_fast(data, reducing_gap=gap) - theirs).mean() for gap in (1.0, 3.0)]
    assert errors[1] < errors[0]


@pytest.mark.parametrize(
    ("mode", "fmt", "size"),
    [
        ("P", "PNG", (900, 700)),
        ("RGBA", "PNG", (900, 700)),
        ("L", "PNG", (900, 700)),
        ("LA", "PNG", (900, 700)),
        ("1", "PNG", (900, 700)),
        ("RGB", "PNG", (1200, 900)),
        ("I;16", "PNG", (900, 700)),
        ("L", "JPEG", (2000, 1500)),
        ("CMYK", "JPEG", (2000, 1500)),
        ("RGB", "WEBP", (1200, 900)),
        ("RGB", "GIF", (1200, 900)),
    ],
)
def test_every_mode_and_format_becomes_the_same_pixels_as_decode(mode, fmt, size) -> None:
    image = draw_image(8, size)
    if mode == "I;16":
        image = Image.fromarray(np.asarray(image.convert("L"), dtype=np.uint16) * 257)
    elif mode != "RGB":
        image = image.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, format=fmt)
    data = buffer.getvalue()
    decoded = decode(data, max_pixels=CAP)
    fast = decode_for_model(data, max_pixels=CAP)
    diff = np.abs(normalise(fast.pixels) - preprocess(decoded.image))
    assert diff.max() <= FAST_MAX_ABS_DIFF and diff.mean() <= FAST_MEAN_ABS_DIFF
    assert (fast.width, fast.height, fast.format) == (decoded.width, decoded.height, decoded.format) == (*size, fmt)


def _pixel_bomb() -> bytes:
    buffer = io.BytesIO()
    Image.new("L", (20_000, 20_000)).save(buffer, format="PNG")  # 400 MP in a few hundred KB
    return buffer.getvalue()


def _zero_sized_gif() -> bytes:
    gif = bytearray(encode(draw_image(4, (8, 8)), "GIF"))
    gif[6:10] = b"\x00\x00\x00\x00"  # logical screen 0x0
    return bytes(gif)


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"", Reason.EMPTY_OBJECT),
        (b"hello, not an image", Reason.INVALID_IMAGE),
        (encode(draw_image(3, (200, 150)), "JPEG")[:600], Reason.INVALID_IMAGE),
        (encode(draw_image(3, (2000, 1500)), "JPEG")[:20_000], Reason.INVALID_IMAGE),  # truncated, drafted
        (encode(draw_image(3, (200, 150)), "PNG")[:900], Reason.INVALID_IMAGE),
        (_pixel_bomb(), Reason.TOO_MANY_PIXELS),
    ],
    ids=["empty", "not-an-image", "truncated-jpeg", "truncated-large-jpeg", "truncated-png", "pixel-bomb"],
)
def test_bad_bytes_get_the_same_reason_as_decode(data: bytes, reason: Reason) -> None:
    with pytest.raises(Rejected) as by_decode:
        decode(data, max_pixels=50_000_000)
    with pytest.raises(Rejected) as by_fast:
        decode_for_model(data, max_pixels=50_000_000)
    assert by_decode.value.reason == by_fast.value.reason == reason


def test_the_pixel_cap_uses_the_original_size_not_the_drafted_one() -> None:
    data = encode(draw_image(6, (2000, 1500)), "JPEG")
    with pytest.raises(Rejected) as caught:
        decode_for_model(data, max_pixels=2000 * 1500 - 1)
    assert caught.value.reason == Reason.TOO_MANY_PIXELS
    assert decode_for_model(data, max_pixels=2000 * 1500).width == 2000
