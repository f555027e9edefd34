"""Free answers to files, as FakeVLM's scripts/eval.py generates them: the raw prompt, greedy, 256 tokens.

The answerer itself (`modelcheck.free_answers` on a loaded model) is passed in; this module feeds it the
files' pixels by the exact preprocessing, batch by batch, off the event loop.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from rich.console import Console

from moderation.model.imaging import crop, decode
from moderation.offline.scan import ProgressBar

EVAL_MAX_NEW_TOKENS = 256  # FakeVLM's scripts/eval.py

# Pixel values (N, 3, 336, 336) -> one free greedy answer per row.
FreeAnswerer = Callable[[np.ndarray], list[str]]


async def answer_files(
    files: Sequence[Path],
    answerer: FreeAnswerer,
    *,
    batch_size: int,
    max_pixels: int,
    progress: bool = False,
    console: Console | None = None,
) -> list[str]:
    """One free answer per file, in order."""
    texts: list[str] = []
    with ProgressBar(progress, console, "free generation", len(files)) as bar:
        for start in range(0, len(files), batch_size):
            chunk = files[start : start + batch_size]
            pixels = await asyncio.gather(*(asyncio.to_thread(_pixels, path, max_pixels) for path in chunk))
            texts += await asyncio.to_thread(answerer, np.stack(pixels))
            bar.advance(len(chunk))
    return texts


def _pixels(path: Path, max_pixels: int) -> np.ndarray:
    # Callers pass files that were just scored, so they decode: a failure now is unexpected and may crash.
    return crop(decode(path.read_bytes(), max_pixels=max_pixels).image)
