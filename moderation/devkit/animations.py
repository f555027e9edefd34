"""Animated and multi-page images for the tests and bench/frames.py: a real first frame with a generated one
spliced in later (what an uploader hiding a fake behind a real first frame sends), and long animations."""

from __future__ import annotations

import io
from collections.abc import Sequence

from PIL import Image

from moderation.devkit.synthetic import Sample, samples

ANIMATED_FORMATS = ("GIF", "PNG", "WEBP")  # GIF, APNG and animated WebP (lossless)
SIZE = (336, 336)  # one of the synthetic sizes: FakeVLM's own, so the crop is the frame


def animation(frames: Sequence[Image.Image], fmt: str, *, duration: int = 100) -> bytes:
    """The frames as one animated (or, for TIFF, multi-page) file; WebP lossless, so pixels stay as drawn."""
    options: dict[str, object] = {"lossless": True} if fmt == "WEBP" else {}
    if fmt != "TIFF":
        options |= {"duration": duration, "loop": 0}
    buffer = io.BytesIO()
    frames[0].save(buffer, format=fmt, save_all=True, append_images=list(frames[1:]), **options)
    return buffer.getvalue()


def flat(size: tuple[int, int], frames: int, fmt: str = "GIF") -> bytes:
    """An animation of `frames` flat frames, each its own colour (encoders merge identical frames): small
    however long."""
    colours = [(i % 256, i * 7 % 256, i // 256 * 60 % 256) for i in range(frames)]
    return animation([Image.new("RGB", size, colour) for colour in colours], fmt, duration=40)


def pictures(count: int, label: str, seed: int = 7) -> list[Sample]:
    """`count` synthetic samples of this label at SIZE, in stream order (the trained tiny model is right about
    them: `tests/model/test_frames.py` checks the ones it uses)."""
    found: list[Sample] = []
    index = 0
    while len(found) < count:
        for sample in samples(16, seed, start=index):
            if sample.label == label and sample.image.size == SIZE and len(found) < count:
                found.append(sample)
        index += 16
    return found


def spliced(fmt: str, frames: int, fake_at: int, seed: int = 7) -> bytes:
    """An animation of `frames` real pictures whose frame `fake_at` is a generated one."""
    real = [s.image for s in pictures(frames, "real", seed)]
    real[fake_at] = pictures(1, "fake", seed)[0].image
    return animation(real, fmt)
