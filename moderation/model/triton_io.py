"""The Triton side that both FakeVLM Python models share (the CPU/in-process one and the GPU BLS one).

The contract: IMAGE [n, 336, 336, 3] UINT8 in (the HWC RGB crop of `moderation.model.imaging.crop`; the model
normalises it on its own device), SCORE, LABEL and WEIGHTS (what the loaded weights are,
`moderation.model.identity`) out, and for the explain role (`fakevlm_explain`) EXPLANATION and ANSWER_LABEL too.
An image is 336 * 336 * 3 = 338,688 bytes on the wire, where the float32 PIXEL_VALUES [3, 336, 336] it replaced
were 1,354,752 (tests/model/test_imaging.py holds both figures).
A request that cannot be read gets its own INVALID_ARG error; a batch whose inference fails gets UNAVAILABLE for
its readable requests; neither touches the other requests.
Each function takes the model's `triton_python_backend_utils` module (`pb`), which exists only inside
Triton's Python stub, so that the models' tests can hand in a stand-in.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Protocol

import numpy as np

from moderation.model.imaging import CROP_SIZE

IMAGE = "IMAGE"
IMAGE_SHAPE = (CROP_SIZE, CROP_SIZE, 3)

# What each model answers: the verdict model never generates, the explain model explains every row.
Role = Literal["verdict", "explain"]
ROLES: tuple[Role, ...] = ("verdict", "explain")
VERDICT_OUTPUTS = ("SCORE", "LABEL", "WEIGHTS")
EXPLAIN_OUTPUTS = ("SCORE", "LABEL", "EXPLANATION", "ANSWER_LABEL", "WEIGHTS")


@dataclass(frozen=True)
class Rows:
    """One request's images."""

    crops: np.ndarray  # (n, 336, 336, 3) uint8


class Answer(Protocol):
    @property
    def score(self) -> float: ...
    @property
    def label(self) -> str: ...
    @property
    def explanation(self) -> str | None: ...
    @property
    def answer_label(self) -> str | None: ...


def role_of(params: dict[str, str]) -> Role:
    """The model's role from its config's `role` parameter (verdict when absent); a ValueError otherwise."""
    role = params.get("role", "verdict")
    if role not in ROLES:
        raise ValueError(f"parameter role must be one of {', '.join(ROLES)}, got {role!r}")
    return "explain" if role == "explain" else "verdict"


def decode(pb: Any, request: Any, to_numpy: Callable[[Any], np.ndarray] = lambda t: t.as_numpy()) -> Rows | Any:
    """The request's rows, or a TritonError that belongs to this request alone."""
    try:
        return _rows(pb, request, to_numpy)
    except Exception as exc:  # an unreadable tensor must not fail the other requests of the batch
        return _invalid(pb, f"cannot read the request's inputs: {exc}")


def readable(decoded: Sequence[Rows | Any]) -> list[Rows]:
    return [item for item in decoded if isinstance(item, Rows)]


def crops(decoded: Sequence[Rows | Any]) -> np.ndarray:
    """Every readable request's images as one array, in request order: one forward pass for the dynamic batch."""
    rows = readable(decoded)
    return np.concatenate([r.crops for r in rows]) if rows else np.empty((0, *IMAGE_SHAPE), np.uint8)


def responses(
    pb: Any,
    decoded: Sequence[Rows | Any],
    answers: Iterable[Answer] | Exception,
    weights: str = "",
    role: Role = "verdict",
) -> list[Any]:
    """One response per request: its error, or its rows' answers (taken in order from `answers`) with the
    `weights` that gave them, or, when the batch's inference raised, UNAVAILABLE."""
    if isinstance(answers, Exception):
        pb.Logger.log_error(f"fakevlm ({role}): inference failed: {answers!r}")
        error = pb.TritonError(f"fakevlm inference failed: {answers}", pb.TritonError.UNAVAILABLE)
        return [pb.InferenceResponse(error=item if not isinstance(item, Rows) else error) for item in decoded]
    remaining = iter(answers)
    return [
        _response(pb, [next(remaining) for _ in range(len(item.crops))], weights, role)
        if isinstance(item, Rows)
        else pb.InferenceResponse(error=item)
        for item in decoded
    ]


def _rows(pb: Any, request: Any, to_numpy: Callable[[Any], np.ndarray]) -> Rows | Any:
    tensor = pb.get_input_tensor_by_name(request, IMAGE)
    if tensor is None:
        return _invalid(pb, f"missing input {IMAGE}")
    image = to_numpy(tensor)
    if image.dtype != np.uint8:
        return _invalid(pb, f"{IMAGE} must be UINT8, got {image.dtype}")
    if image.ndim != 4 or image.shape[1:] != IMAGE_SHAPE:
        return _invalid(pb, f"{IMAGE} must be [n, {CROP_SIZE}, {CROP_SIZE}, 3], got {list(image.shape)}")
    return Rows(np.ascontiguousarray(image))


def _response(pb: Any, answers: list[Answer], weights: str, role: Role) -> Any:
    def strings(values: list[str]) -> np.ndarray:
        return np.array([[v.encode("utf-8")] for v in values], dtype=np.object_)

    tensors = [
        pb.Tensor("SCORE", np.array([[a.score] for a in answers], dtype=np.float32)),
        pb.Tensor("LABEL", strings([a.label for a in answers])),
    ]
    if role == "explain":
        tensors += [
            pb.Tensor("EXPLANATION", strings([a.explanation or "" for a in answers])),
            pb.Tensor("ANSWER_LABEL", strings([a.answer_label or "" for a in answers])),
        ]
    return pb.InferenceResponse(output_tensors=[*tensors, pb.Tensor("WEIGHTS", strings([weights] * len(answers)))])


def _invalid(pb: Any, message: str) -> Any:
    return pb.TritonError(message, pb.TritonError.INVALID_ARG)
