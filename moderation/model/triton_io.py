"""The Triton side that both FakeVLM Python models share (the CPU/in-process one and the GPU BLS one).

The contract: PIXEL_VALUES [n, 3, 336, 336] FP32 and the optional EXPLAIN_ABOVE [n, 1] in; SCORE, LABEL,
EXPLANATION, ANSWER_LABEL and WEIGHTS (what the loaded weights are, `moderation.model.identity`) out. A request
that cannot be read gets its own INVALID_ARG error; a batch whose inference fails gets UNAVAILABLE for its
readable requests; neither touches the other requests.
Each function takes the model's `triton_python_backend_utils` module (`pb`), which exists only inside
Triton's Python stub, so that the models' tests can hand in a stand-in.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from moderation.model.imaging import CROP_SIZE

PIXEL_SHAPE = (3, CROP_SIZE, CROP_SIZE)


@dataclass(frozen=True)
class Rows:
    """One request's images."""

    pixels: np.ndarray  # (n, 3, 336, 336) float32
    explain_above: np.ndarray  # (n,) float32, inf = never explain


class Answer(Protocol):
    @property
    def score(self) -> float: ...
    @property
    def label(self) -> str: ...
    @property
    def explanation(self) -> str | None: ...
    @property
    def answer_label(self) -> str | None: ...


def decode(pb: Any, request: Any, to_numpy: Callable[[Any], np.ndarray] = lambda t: t.as_numpy()) -> Rows | Any:
    """The request's rows, or a TritonError that belongs to this request alone."""
    try:
        return _rows(pb, request, to_numpy)
    except Exception as exc:  # an unreadable tensor must not fail the other requests of the batch
        return _invalid(pb, f"cannot read the request's inputs: {exc}")


def readable(decoded: Sequence[Rows | Any]) -> list[Rows]:
    return [item for item in decoded if isinstance(item, Rows)]


def responses(
    pb: Any, decoded: Sequence[Rows | Any], answers: Iterable[Answer] | Exception, weights: str = ""
) -> list[Any]:
    """One response per request: its error, or its rows' answers (taken in order from `answers`) with the
    `weights` that gave them, or, when the batch's inference raised, UNAVAILABLE."""
    if isinstance(answers, Exception):
        pb.Logger.log_error(f"fakevlm: inference failed: {answers!r}")
        error = pb.TritonError(f"fakevlm inference failed: {answers}", pb.TritonError.UNAVAILABLE)
        return [pb.InferenceResponse(error=item if not isinstance(item, Rows) else error) for item in decoded]
    remaining = iter(answers)
    return [
        _response(pb, [next(remaining) for _ in range(len(item.pixels))], weights)
        if isinstance(item, Rows)
        else pb.InferenceResponse(error=item)
        for item in decoded
    ]


def _rows(pb: Any, request: Any, to_numpy: Callable[[Any], np.ndarray]) -> Rows | Any:
    pixels_tensor = pb.get_input_tensor_by_name(request, "PIXEL_VALUES")
    if pixels_tensor is None:
        return _invalid(pb, "missing input PIXEL_VALUES")
    pixels = to_numpy(pixels_tensor)
    if pixels.ndim != 4 or pixels.shape[1:] != PIXEL_SHAPE:
        return _invalid(pb, f"PIXEL_VALUES must be [n, 3, {CROP_SIZE}, {CROP_SIZE}], got {list(pixels.shape)}")
    if pixels.dtype != np.float32 or not np.isfinite(pixels).all():
        return _invalid(pb, "PIXEL_VALUES must be finite float32 values")
    rows = pixels.shape[0]
    explain_tensor = pb.get_input_tensor_by_name(request, "EXPLAIN_ABOVE")
    if explain_tensor is None:
        return Rows(pixels, np.full(rows, math.inf, dtype=np.float32))
    explain = to_numpy(explain_tensor).astype(np.float32).reshape(-1)
    if explain.shape[0] != rows:
        return _invalid(pb, f"EXPLAIN_ABOVE has {explain.shape[0]} values for {rows} images")
    if np.isnan(explain).any():
        return _invalid(pb, "EXPLAIN_ABOVE must not be NaN")
    return Rows(pixels, explain)


def _response(pb: Any, answers: list[Answer], weights: str) -> Any:
    def strings(values: list[str]) -> np.ndarray:
        return np.array([[v.encode("utf-8")] for v in values], dtype=np.object_)

    return pb.InferenceResponse(
        output_tensors=[
            pb.Tensor("SCORE", np.array([[a.score] for a in answers], dtype=np.float32)),
            pb.Tensor("LABEL", strings([a.label for a in answers])),
            pb.Tensor("EXPLANATION", strings([a.explanation or "" for a in answers])),
            pb.Tensor("ANSWER_LABEL", strings([a.answer_label or "" for a in answers])),
            pb.Tensor("WEIGHTS", strings([weights] * len(answers))),
        ]
    )


def _invalid(pb: Any, message: str) -> Any:
    return pb.TritonError(message, pb.TritonError.INVALID_ARG)
