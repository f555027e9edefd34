"""Bounded memory and a bounded walk: structure budgets, the format allowlist, wide modes without 64-bit
temporaries, the pixel byte budget and the decode pool."""

from __future__ import annotations

import asyncio
import io
import threading
import time
import tracemalloc
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from PIL import Image, features

from moderation.devkit import animations, hostile_images
from moderation.devkit.samples import draw_image, encode
from moderation.errors import Reason, Rejected
from moderation.model import structure
from moderation.model.imaging import (
    DECODE_SLACK,
    DEFAULT_FORMATS,
    decode,
    decode_bytes,
    decode_for_model,
    prepare,
    read_header,
    readable,
    to_l,
)
from moderation.settings import Settings
from moderation.worker.budget import ByteBudget, return_large_frees
from moderation.worker.pipeline import INLINE_MAX_BYTES, INLINE_MAX_PIXELS

CAP = 50_000_000


def reason_of(data: bytes, **kwargs: object) -> Reason | None:
    try:
        decode(data, max_pixels=CAP, **kwargs)  # type: ignore[arg-type]
    except Rejected as exc:
        return exc.reason
    return None


# Structure budgets


@pytest.mark.parametrize("after_data", [False, True])
def test_a_png_of_200k_private_chunks_is_refused_before_pillow_walks_it(after_data: bool) -> None:
    data = hostile_images.png_with_private_chunks(200_000, after_data=after_data)
    with pytest.raises(Rejected) as caught:
        read_header(data, max_pixels=CAP)
    assert caught.value.reason == Reason.INVALID_IMAGE and "structure budget" in caught.value.detail
    assert not caught.value.retryable


def test_a_png_with_some_private_chunks_still_decodes() -> None:
    data = hostile_images.png_with_private_chunks(structure.MAX_PNG_OTHER_CHUNKS - 10)
    assert decode(data, max_pixels=CAP).image.size == (64, 48)


def test_a_progressive_jpeg_within_the_scan_budget_decodes_and_one_over_it_is_refused() -> None:
    plain = hostile_images.progressive_jpeg((320, 240))
    scans = plain.count(b"\xff\xda")
    within = hostile_images.progressive_jpeg((320, 240), structure.MAX_JPEG_SCANS - scans)
    over = hostile_images.progressive_jpeg((320, 240), structure.MAX_JPEG_SCANS - scans + 1)
    assert decode(within, max_pixels=CAP).image.size == (320, 240)
    for fast in (False, True):
        with pytest.raises(Rejected) as caught:
            prepare(over, max_pixels=CAP, fast=fast)
        assert caught.value.reason == Reason.INVALID_IMAGE and "scans" in caught.value.detail


def test_a_jpeg_header_of_fill_bytes_is_refused() -> None:
    good = encode(draw_image(1, (64, 48)), "JPEG")
    padded = good[:2] + b"\xff" * (structure.MAX_JPEG_JUNK_BYTES + 1) + good[2:]
    assert reason_of(good[:2] + b"\xff" * 100 + good[2:]) is None  # libjpeg and Pillow allow fill bytes
    assert reason_of(padded) == Reason.INVALID_IMAGE


def gif_with_comment_blocks(count: int) -> bytes:
    plain = hostile_images.save(Image.new("P", (40, 30), 3), "GIF")
    blocks_start = 13 + (3 << ((plain[10] & 0x07) + 1) if plain[10] & 0x80 else 0)  # after the colour table
    comment = b"\x21\xfe" + b"\x01x" * count + b"\x00"
    return plain[:blocks_start] + comment + plain[blocks_start:]


def test_a_gif_of_endless_comment_blocks_is_refused() -> None:
    assert decode(gif_with_comment_blocks(100), max_pixels=CAP).image.size == (40, 30)
    assert reason_of(gif_with_comment_blocks(structure.MAX_GIF_BLOCKS + 1)) == Reason.INVALID_IMAGE


@pytest.mark.parametrize("cut", [9, 20, 40])
def test_truncated_structures_pass_the_budget_for_pillow_to_judge(cut: int) -> None:
    for data in (hostile_images.png_with_private_chunks(5), hostile_images.progressive_jpeg((64, 48))):
        structure.check(data[:cut])  # no exception: Pillow says what is wrong with it


# The format allowlist


@pytest.mark.parametrize("fmt", [*hostile_images.OTHER_FORMATS, "PSD"])
def test_real_files_of_other_formats_are_unsupported_not_parsed(fmt: str) -> None:
    data = hostile_images.other_format(fmt)
    assert Image.open(io.BytesIO(data)).format == fmt  # a real file Pillow would otherwise parse
    with pytest.raises(Rejected) as caught:
        decode(data, max_pixels=CAP)
    assert caught.value.reason == Reason.UNSUPPORTED_FORMAT and not caught.value.retryable
    with pytest.raises(Rejected) as fast:
        decode_for_model(data, max_pixels=CAP)
    assert fast.value.reason == Reason.UNSUPPORTED_FORMAT


def test_a_narrower_allowlist_refuses_the_formats_it_leaves_out() -> None:
    jpeg, png = encode(draw_image(2, (64, 48)), "JPEG"), encode(draw_image(2, (64, 48)), "PNG")
    assert reason_of(png, formats=("PNG",)) is None
    assert reason_of(jpeg, formats=("PNG",)) == Reason.UNSUPPORTED_FORMAT
    assert reason_of(b"garbage, in no format at all", formats=("PNG",)) == Reason.INVALID_IMAGE


def test_the_allowlist_keeps_only_formats_the_installed_pillow_reads() -> None:
    assert readable(("jpeg", "NO-SUCH-FORMAT", "png")) == ("JPEG", "PNG")
    assert ("AVIF" in readable(DEFAULT_FORMATS)) == bool(features.check("avif"))
    assert ("HEIF" in readable(DEFAULT_FORMATS)) == ("HEIF" in Image.OPEN)  # only with the pillow-heif plugin
    assert Settings().image_formats == DEFAULT_FORMATS
    assert Settings(image_formats="jpeg, png").image_formats == ("JPEG", "PNG")  # type: ignore[arg-type]


# Wide modes: 16-bit, 32-bit and float images to 8 bits without whole-image 64-bit copies


def whole_image_reference(image: Image.Image) -> np.ndarray:
    """The former conversion, on the whole image at once in int64 / float64."""
    if image.mode == "F":
        pixels = np.nan_to_num(np.asarray(image, dtype=np.float64))
        scale = 255.0 if pixels.max(initial=0) <= 1.0 else 1.0
        return np.clip(pixels * scale, 0, 255).astype(np.uint8)
    pixels = np.asarray(image, dtype=np.int64)
    shift = 8 if pixels.max(initial=0) > 255 else 0
    return (np.clip(pixels, 0, 65535) >> shift).astype(np.uint8)


WIDE = {
    "I;16 over 255": Image.fromarray((np.arange(300 * 7000) % 65536).astype(np.uint16).reshape(7000, 300)),
    "I;16 under 256": Image.fromarray((np.arange(300 * 7000) % 200).astype(np.uint16).reshape(7000, 300)),
    "I;16B": Image.fromarray((np.arange(300 * 70) * 9).astype(np.uint16).reshape(70, 300)).convert("I;16B"),
    "I": Image.fromarray((np.arange(300 * 7000) * 37 - 50_000).astype(np.int32).reshape(7000, 300)),
    "F in [0, 1]": Image.fromarray(np.linspace(0, 1, 300 * 7000, dtype=np.float32).reshape(7000, 300)),
    "F with nan and inf": Image.fromarray(
        np.array([[np.nan, np.inf, -np.inf, 0.5, 300.0, -2.0] * 50] * 40, dtype=np.float32)
    ),
}


@pytest.mark.parametrize("name", list(WIDE))
def test_wide_modes_convert_band_by_band_to_the_same_pixels(name: str) -> None:
    image = WIDE[name]
    assert np.array_equal(np.asarray(to_l(image)), whole_image_reference(image))


def test_a_16_bit_image_converts_without_a_temporary_its_size() -> None:
    width, height = 4000, 4000  # 16 MP: an int64 copy would be 128 MB
    image = Image.open(io.BytesIO(hostile_images.sixteen_bit_png((width, height))))
    image.load()
    tracemalloc.start()  # numpy's allocations are traced (Pillow's own buffers are not)
    try:
        to_l(image)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < width * height + 24 * 2**20, f"{peak / 2**20:.0f} MiB traced"  # the output plus a band's worth


def test_decode_bytes_bounds_the_decoded_image_and_libjpeg_coefficients() -> None:
    def cost(data: bytes) -> int:
        return decode_bytes(read_header(data, max_pixels=CAP))

    pixels = 640 * 480
    assert cost(encode(draw_image(1, (640, 480)), "PNG")) == pixels * (4 + 4) + DECODE_SLACK
    assert cost(hostile_images.sixteen_bit_png((640, 480))) == pixels * (2 + 1 + 4) + DECODE_SLACK
    baseline = hostile_images.save(Image.new("RGB", (640, 480)), "JPEG")
    progressive = hostile_images.save(Image.new("RGB", (640, 480)), "JPEG", progressive=True)
    assert cost(progressive) == cost(baseline) + pixels * 2 * 3


# The byte budget and the decode pool


def test_the_byte_budget_never_holds_more_than_its_total_and_serves_in_order() -> None:
    budget = ByteBudget(100)
    peak, order, lock = [0], [], threading.Lock()

    def job(name: str, nbytes: int) -> None:
        with budget.reserve(nbytes):
            with lock:
                order.append(name)
                peak[0] = max(peak[0], budget.in_use)
            time.sleep(0.02)

    with budget.reserve(60):  # everything below queues behind this
        threads = [threading.Thread(target=job, args=(f"j{i}", n)) for i, n in enumerate([50, 30, 500, 10])]
        for queued, thread in enumerate(threads, start=1):
            thread.start()
            while budget.waiting < queued:  # so that they queue in this order
                time.sleep(0.001)
        assert order == []  # j1 would fit, but j0 is first in line
    for thread in threads:
        thread.join(5)
    assert order[:3] == ["j0", "j1", "j2"] and set(order) == {"j0", "j1", "j2", "j3"}
    assert peak[0] <= 100 and budget.in_use == 0


def test_a_reservation_over_the_whole_budget_runs_alone() -> None:
    budget = ByteBudget(100)
    with budget.reserve(10**9) as share:
        assert share == 100 and budget.in_use == 100
    assert budget.in_use == 0


class CountingPool(ThreadPoolExecutor):
    """A real pool that counts what it is given."""

    def __init__(self) -> None:
        super().__init__(1, thread_name_prefix="decode")
        self.submitted = 0

    def submit(self, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.submitted += 1
        return super().submit(*args, **kwargs)


async def test_large_objects_are_read_and_decoded_on_the_pools_threads_only() -> None:
    from moderation.model.frames import CAPS
    from moderation.policy import Policy
    from moderation.worker.pipeline import Pipeline
    from moderation.worker.policies import Policies

    pool = CountingPool()
    pipeline = Pipeline(
        None, None, Policies.of(Policy(0.5, 0.8, 0.5)), CAP, decode_pool=pool, decode_budget=ByteBudget(2**30)
    )  # type: ignore[arg-type]
    for side in (96, 336):  # a thumbnail, and FakeVLM's own input size (~0.8 ms with PDQ): prepared on the loop
        small = encode(draw_image(1, (side, side)), "JPEG")
        assert len(small) <= INLINE_MAX_BYTES and side * side <= INLINE_MAX_PIXELS
        await pipeline._examine(small, CAPS)
    assert pool.submitted == 0
    larger = encode(draw_image(1, (448, 448)), "JPEG")  # small in bytes, but more pixels: the threads
    assert len(larger) <= INLINE_MAX_BYTES and INLINE_MAX_PIXELS < 448 * 448
    await pipeline._examine(larger, CAPS)
    assert pool.submitted == 1
    bomb = hostile_images.png_with_private_chunks(200_000)  # its header walk never touches the loop
    with pytest.raises(Rejected):
        await pipeline._examine(bomb, CAPS)
    large = encode(draw_image(1, (1200, 900)), "PNG")
    [frame] = (await pipeline._examine(large, CAPS)).frames
    assert pool.submitted == 3 and frame.pixels.shape == (336, 336, 3)
    animated = animations.flat((64, 48), 3)  # tiny, but its frames are the threads' work
    assert len((await pipeline._examine(animated, CAPS)).frames) == 3 and pool.submitted == 4
    pool.shutdown()
    await asyncio.sleep(0)


def test_large_frees_go_back_to_the_system_under_glibc() -> None:
    import platform

    assert return_large_frees() == (platform.libc_ver()[0] == "glibc")


async def test_the_loop_lag_probe_exports_a_stall() -> None:
    from moderation.worker import metrics
    from moderation.worker.metrics import watch_loop_lag

    probe = asyncio.create_task(watch_loop_lag(0.01))
    await asyncio.sleep(0.05)
    time.sleep(0.3)  # a deliberate stall of the event loop
    await asyncio.sleep(0.05)
    probe.cancel()
    assert (metrics.REGISTRY.get_sample_value("moderation_event_loop_lag_max_seconds") or 0) >= 0.25
