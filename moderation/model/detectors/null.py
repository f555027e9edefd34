"""A detector that costs nothing, for benchmarking everything around the model."""

from __future__ import annotations

import numpy as np

from moderation.events import ModelInfo
from moderation.model.detectors.base import Detection


class NullDetector:
    """Costs nothing and says "real" (P(fake) = 0): for benchmarking everything around the model."""

    model = ModelInfo(name="null", version="0 (no model: benchmarking only)", weights="null")

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def detect(self, pixel_values: np.ndarray, *, explain_above: float) -> Detection:
        return Detection(score=0.0, label="real", explanation=None, answer_label=None)
