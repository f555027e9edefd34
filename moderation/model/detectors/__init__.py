"""The detector interface (`base`) and one module per backend: `triton`, `inprocess`, `null`."""

from moderation.model.detectors.base import BatchDetector, Detection, Detector, running
from moderation.model.detectors.inprocess import IN_PROCESS, InProcessDetector
from moderation.model.detectors.null import NullDetector
from moderation.model.detectors.triton import TritonDetector

__all__ = [
    "IN_PROCESS",
    "BatchDetector",
    "Detection",
    "Detector",
    "InProcessDetector",
    "NullDetector",
    "TritonDetector",
    "running",
]
