"""Free answers, as FakeVLM's scripts/eval.py generates them: the raw prompt, greedy, 256 tokens, each
labelled by the official text rule. The one place free generation is written, for `moderation eval`'s
paper-comparable figures and for `moderation model check`.

It needs no pydantic and no rich: the GPU device run (bench/gpu_bls_check.py) has neither.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from moderation.model import EVAL_MAX_NEW_TOKENS
from moderation.model.fakevlm import FakeVLM, Label, label_from_answer
from moderation.model.imaging import crop, decode

# Pixel values (N, 3, 336, 336) -> one free greedy answer per row.
FreeAnswerer = Callable[[np.ndarray], list[str]]


@dataclass(frozen=True)
class FreeAnswer:
    text: str  # the model's own answer to the raw prompt, greedy
    label: Label | None  # by FakeVLM's eval rule; None when neither word decides


def free_answers(vlm: FakeVLM, pixels: np.ndarray, *, max_new_tokens: int = EVAL_MAX_NEW_TOKENS) -> list[str]:
    """Greedy answers to the raw prompt (no answer prefix, no chat template), as the released eval runs."""
    prompt = vlm.prompt
    question = torch.tensor([prompt.ids[: len(prompt.ids) - len(prompt.answer)]], device=vlm.device)
    rows = question.expand(pixels.shape[0], -1)
    model: Any = vlm.model
    with torch.inference_mode():
        out = model.generate(
            input_ids=rows,
            attention_mask=torch.ones_like(rows),
            pixel_values=vlm.pixel_values(pixels),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=vlm.tokenizer.pad_token_id,
        )
    new = out[:, question.shape[1] :]
    return [str(text).strip() for text in vlm.tokenizer.batch_decode(new, skip_special_tokens=True)]


def label_answers(texts: Sequence[str]) -> list[FreeAnswer]:
    return [FreeAnswer(text, label_from_answer(text)) for text in texts]


async def answer_files(
    files: Sequence[Path],
    answerer: FreeAnswerer,
    *,
    batch_size: int,
    max_pixels: int,
    advance: Callable[[int], None] = lambda _: None,
) -> list[FreeAnswer]:
    """One labelled free answer per file, in order, batch by batch off the event loop; `advance(n)` after each."""
    answers: list[FreeAnswer] = []
    for start in range(0, len(files), batch_size):
        chunk = files[start : start + batch_size]
        # Callers pass files that were just scored, so they decode: a failure now is unexpected and may crash.
        pixels = await asyncio.gather(*(asyncio.to_thread(file_crop, path, max_pixels) for path in chunk))
        answers += label_answers(await asyncio.to_thread(answerer, np.stack(pixels)))
        advance(len(chunk))
    return answers


def file_crop(path: Path, max_pixels: int) -> np.ndarray:
    """A file's uint8 crop by the exact preprocessing; raises OSError or Rejected when it cannot be had."""
    return crop(decode(path.read_bytes(), max_pixels=max_pixels).image)
