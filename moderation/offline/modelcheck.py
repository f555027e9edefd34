"""Is verdict-first valid for a checkpoint? Compare the forced verdict with the model's free answer.

Verdict-first forces the answer prefix "This is a" and reads P(fake) from the next token's logits.
FakeVLM was trained with a chat template and is evaluated without one, so what it says first when it
answers freely is an empirical fact per checkpoint. This check generates freely, as FakeVLM's
scripts/eval.py does (raw prompt, greedy, max_new_tokens 256), and reports the share of answers that
start with the forced prefix and how often the verdict-first label agrees with the free answer's label
by the official text rule.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from moderation.errors import Rejected
from moderation.model import EVAL_MAX_NEW_TOKENS
from moderation.model.fakevlm import ANSWER_PREFIX, FakeVLM
from moderation.model.imaging import CROP_SIZE
from moderation.offline.freegen import file_crop, free_answers, label_answers

# Verdict-first stands for a checkpoint when at least this share of its free answers start with the forced
# prefix, and at least this share of the labelled ones carry the forced verdict's label.
VALID_SHARE = 0.95


@dataclass(frozen=True)
class Answer:
    free_text: str  # the model's own answer to the raw prompt, greedy
    free_label: str | None  # by FakeVLM's eval rule; None when neither word decides
    score: float  # verdict-first P(fake)
    verdict_label: str  # verdict-first label at the threshold


@dataclass(frozen=True)
class CheckReport:
    images: int
    prefix_share: float  # free answers that start with ANSWER_PREFIX
    labelled: int  # free answers the eval rule could label
    agreement: float | None  # verdict-first label == free label, over the labelled answers
    disagreements: int
    # |score - threshold| where they disagree: how far the forced verdict is from flipping to the free one
    margin_mean: float | None
    margin_max: float | None
    answers: list[Answer]

    @property
    def verdict_first_valid(self) -> bool:
        return self.prefix_share >= VALID_SHARE and (self.agreement or 0.0) >= VALID_SHARE

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=2)


def check(
    vlm: FakeVLM,
    pixels: np.ndarray,
    *,
    threshold: float = 0.5,
    max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    batch_size: int = 8,
) -> CheckReport:
    """Verdict-first against free generation on the same uint8 crops (N, 336, 336, 3)."""
    answers: list[Answer] = []
    for start in range(0, pixels.shape[0], batch_size):
        batch = pixels[start : start + batch_size]
        free = label_answers(free_answers(vlm, batch, max_new_tokens=max_new_tokens))
        scored = vlm.score(batch, [float("inf")] * batch.shape[0], threshold=threshold)
        answers += [Answer(f.text, f.label, s.score, s.label) for f, s in zip(free, scored, strict=True)]
    return summarise(answers, threshold)


def summarise(answers: list[Answer], threshold: float) -> CheckReport:
    labelled = [a for a in answers if a.free_label is not None]
    disagree = [a for a in labelled if a.free_label != a.verdict_label]
    margins = [abs(a.score - threshold) for a in disagree]
    return CheckReport(
        images=len(answers),
        prefix_share=sum(a.free_text.startswith(ANSWER_PREFIX) for a in answers) / len(answers) if answers else 0.0,
        labelled=len(labelled),
        agreement=1 - len(disagree) / len(labelled) if labelled else None,
        disagreements=len(disagree),
        margin_mean=sum(margins) / len(margins) if margins else None,
        margin_max=max(margins) if margins else None,
        answers=answers,
    )


def load_images(paths: Sequence[Path], *, max_pixels: int = 50_000_000) -> tuple[np.ndarray, list[Path], list[str]]:
    """Files and folders -> uint8 crops by the exact preprocessing, the files used, and why others were not."""
    from moderation.offline.scan import collect_files  # here: scan needs pydantic, the GPU device run does not have it

    rows, used, skipped = [], [], []
    for path in collect_files(paths):
        try:
            rows.append(file_crop(path, max_pixels))
            used.append(path)
        except (OSError, Rejected) as exc:
            skipped.append(f"{path}: {exc}")
    return (np.stack(rows) if rows else np.empty((0, CROP_SIZE, CROP_SIZE, 3), np.uint8)), used, skipped
