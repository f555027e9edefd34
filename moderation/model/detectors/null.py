"""A detector that costs nothing, for benchmarking everything around the model."""

from __future__ import annotations

import numpy as np

from moderation.events import ModelInfo
from moderation.model.detectors.base import Detection


class NullDetector:
    """Costs nothing and says "real" (P(fake) = 0): for benchmarking everything around the model."""

    model = ModelInfo(name="null", version="0 (no model: benchmarking only)", weights="null")
    explain_model = model

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def explain_ready(self) -> bool:
        return True

    async def detect(self, crop: np.ndarray) -> Detection:
        return Detection(score=0.0, label="real", explanation=None, answer_label=None)

    async def explain(self, crop: np.ndarray) -> Detection:
        return await self.detect(crop)  # no words to give: benchmarks measure the path, not the text
