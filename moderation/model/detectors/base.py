"""What every detector backend is: `detect` one image's uint8 crop (`imaging.crop`, (336, 336, 3)) into a
verdict, `explain` it into a verdict with its explanation (or `detect_batch` many). The backends: `triton`
(the worker's, in production), `inprocess` (FakeVLM in this process), `null` (benchmarks).
`detector.model` says which weights give verdicts, `detector.explain_model` which give explanations
(`ModelInfo.weights`, see `moderation.model.identity`). Verdicts and explanations are served apart, so a
verdict never waits behind a generation.
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
    @property
    def model(self) -> ModelInfo:
        """What answers `detect`."""
        ...

    @property
    def explain_model(self) -> ModelInfo:
        """What answers `explain`."""
        ...

    async def detect(self, crop: np.ndarray) -> Detection:
        """The verdict alone (explanation and answer_label None), as soon as P(fake) is known."""
        ...

    async def explain(self, crop: np.ndarray) -> Detection:
        """The explain pass's verdict with its explanation. Rejected(INFERENCE_UNAVAILABLE) while the backend
        is down or overloaded (retry later), Rejected(INFERENCE_FAILED) otherwise."""
        ...


class BatchDetector(Detector, Protocol):
    """A detector that also takes many images at once (what the scan and eval commands use)."""

    async def detect_batch(self, pixels: np.ndarray, *, explain_above: float | Sequence[float]) -> list[Detection]:
        """A verdict for every row, explained where its score >= its limit."""
        ...


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


async def detect_each(detector: Detector, crops: np.ndarray, explain_above: float | Sequence[float]) -> list[Detection]:
    """Every image through `detector.detect` at once; then the rows whose score reaches their (or the shared)
    limit through `detector.explain`, whose answer (the same verdict, and its explanation) replaces it. A row
    whose limit is <= 0 is explained whatever its score: it goes to `explain` alone, without a verdict pass."""
    limits = _per_row(explain_above, len(crops))
    asked = [i for i, limit in enumerate(limits) if limit > 0]
    verdicts = dict(zip(asked, await asyncio.gather(*(detector.detect(crops[i]) for i in asked)), strict=True))
    wanted = [i for i, limit in enumerate(limits) if i not in verdicts or verdicts[i].score >= limit]
    explained = dict(zip(wanted, await asyncio.gather(*(detector.explain(crops[i]) for i in wanted)), strict=True))
    return [explained.get(i) or verdicts[i] for i in range(len(crops))]


def _per_row(explain_above: float | Sequence[float], rows: int) -> list[float]:
    if isinstance(explain_above, int | float):
        return [float(explain_above)] * rows
    limits = [float(e) for e in explain_above]
    if len(limits) != rows:
        raise ValueError(f"{rows} images but {len(limits)} explain_above values")
    return limits
