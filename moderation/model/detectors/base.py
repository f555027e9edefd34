"""What every detector backend is: `detect` one preprocessed image (or `detect_batch` many) into a
`Detection`. The backends: `triton` (the worker's, in production), `inprocess` (FakeVLM in this process),
`null` (benchmarks). `detector.model` says which weights answer (`ModelInfo.weights`, see
`moderation.model.identity`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol, TypeVar

import numpy as np

from moderation.events import ModelInfo

Verdict = Literal["real", "fake"]


@dataclass(frozen=True)
class Detection:
    """What a backend answered, made safe once: P(fake) clamped to [0, 1], labels only "real" or "fake"."""

    score: float  # P(fake)
    label: Verdict
    explanation: str | None
    answer_label: Verdict | None  # the label the explanation's own words give, when explained

    @classmethod
    def of(cls, score: float, label: str | None, explanation: str | None, answer_label: str | None) -> Detection:
        """From a backend's raw answer: an unknown label follows the score, an unknown answer label is none."""
        clamped = min(max(float(score), 0.0), 1.0)
        return cls(
            score=clamped,
            label=_verdict(label) or ("fake" if clamped >= 0.5 else "real"),
            explanation=explanation or None,
            answer_label=_verdict(answer_label),
        )


def _verdict(label: str | None) -> Verdict | None:
    if label == "fake":
        return "fake"
    if label == "real":
        return "real"
    return None


class Detector(Protocol):
    model: ModelInfo

    async def detect(self, pixel_values: np.ndarray, *, explain_above: float) -> Detection: ...


class BatchDetector(Detector, Protocol):
    """A detector that also takes many images at once (what the scan and eval commands use)."""

    async def detect_batch(
        self, pixel_values: np.ndarray, *, explain_above: float | Sequence[float]
    ) -> list[Detection]: ...


class Lifecycle(Protocol):
    async def start(self) -> None: ...

    async def stop(self) -> None: ...


_D = TypeVar("_D", bound=Lifecycle)


@contextlib.asynccontextmanager
async def running(detector: _D) -> AsyncIterator[_D]:
    """start() ... stop(), whatever happens in between."""
    await detector.start()
    try:
        yield detector
    finally:
        await detector.stop()


async def detect_each(
    detector: Detector, pixel_values: np.ndarray, explain_above: float | Sequence[float]
) -> list[Detection]:
    """Every image through `detector.detect` at once, each with its own (or the shared) explain limit."""
    limits = _per_row(explain_above, len(pixel_values))
    return list(
        await asyncio.gather(*(detector.detect(p, explain_above=e) for p, e in zip(pixel_values, limits, strict=True)))
    )


def _per_row(explain_above: float | Sequence[float], rows: int) -> list[float]:
    if isinstance(explain_above, int | float):
        return [float(explain_above)] * rows
    limits = [float(e) for e in explain_above]
    if len(limits) != rows:
        raise ValueError(f"{rows} images but {len(limits)} explain_above values")
    return limits
