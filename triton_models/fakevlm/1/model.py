"""Triton Python-backend model for FakeVLM: decode tensors, call moderation.fakevlm, encode tensors.

All model logic lives in `moderation.fakevlm.FakeVLM`; this file only adapts Triton requests to one
`FakeVLM.score` call per dynamic batch and keeps every error attached to the request that caused it.
"""

from __future__ import annotations

import gc
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from moderation.fakevlm import FakeVLM, Scored, checkpoint_relative_to
from moderation.imaging import CROP_SIZE

_PIXEL_SHAPE = (3, CROP_SIZE, CROP_SIZE)


@dataclass(frozen=True)
class _Rows:
    pixels: np.ndarray  # (n, 3, 336, 336) float32
    explain_above: np.ndarray  # (n,) float32, inf = never explain


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self._threshold = float(params.get("threshold", "0.5"))
        self._max_new_tokens = int(params.get("max_new_tokens", "128"))
        checkpoint = checkpoint_relative_to(params.get("checkpoint", "weights"), Path(args["model_repository"]))
        device = _device(args)
        try:
            self._model: FakeVLM | None = FakeVLM.load(checkpoint, device=device)
        except Exception as exc:
            # Raising here makes Triton mark the model unavailable with this message, instead of
            # serving a model that fails every request.
            raise RuntimeError(f"fakevlm: cannot load the model on {device}: {exc}") from exc
        pb_utils.Logger.log_info(f"fakevlm: loaded {self._model.model_id} from {checkpoint} on {device}")

    def execute(self, requests: list[Any]) -> list[Any]:
        decoded = [_decode(request) for request in requests]
        batches = [item for item in decoded if isinstance(item, _Rows)]
        try:
            scored = iter(self._score(batches))
        except Exception as exc:  # one failed forward pass fails this batch, never the server
            pb_utils.Logger.log_error(f"fakevlm: inference failed: {exc!r}")
            error = pb_utils.TritonError(f"fakevlm inference failed: {exc}", pb_utils.TritonError.UNAVAILABLE)
            return [
                pb_utils.InferenceResponse(error=item if isinstance(item, pb_utils.TritonError) else error)
                for item in decoded
            ]
        return [
            pb_utils.InferenceResponse(error=item)
            if isinstance(item, pb_utils.TritonError)
            else _response([next(scored) for _ in range(len(item.pixels))])
            for item in decoded
        ]

    def finalize(self) -> None:
        self._model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _score(self, batches: list[_Rows]) -> list[Scored]:
        if not batches:
            return []
        if self._model is None:
            raise RuntimeError("the model has been finalized")
        # ONE forward pass for the whole dynamic batch, whatever each request's own row count.
        return self._model.score(
            np.concatenate([b.pixels for b in batches]),
            np.concatenate([b.explain_above for b in batches]).tolist(),
            threshold=self._threshold,
            max_new_tokens=self._max_new_tokens,
        )


def _decode(request: Any) -> _Rows | Any:
    """The request's rows, or a TritonError that belongs to this request alone."""
    try:
        return _rows(request)
    except Exception as exc:  # an unreadable tensor must not fail the other requests of the batch
        return _invalid(f"cannot read the request's inputs: {exc}")


def _rows(request: Any) -> _Rows | Any:
    pixels_tensor = pb_utils.get_input_tensor_by_name(request, "PIXEL_VALUES")
    if pixels_tensor is None:
        return _invalid("missing input PIXEL_VALUES")
    pixels = pixels_tensor.as_numpy()
    if pixels.ndim != 4 or pixels.shape[1:] != _PIXEL_SHAPE:
        return _invalid(f"PIXEL_VALUES must be [n, 3, {CROP_SIZE}, {CROP_SIZE}], got {list(pixels.shape)}")
    if pixels.dtype != np.float32 or not np.isfinite(pixels).all():
        return _invalid("PIXEL_VALUES must be finite float32 values")
    rows = pixels.shape[0]
    explain_tensor = pb_utils.get_input_tensor_by_name(request, "EXPLAIN_ABOVE")
    if explain_tensor is None:
        return _Rows(pixels, np.full(rows, math.inf, dtype=np.float32))
    explain = explain_tensor.as_numpy().astype(np.float32).reshape(-1)
    if explain.shape[0] != rows:
        return _invalid(f"EXPLAIN_ABOVE has {explain.shape[0]} values for {rows} images")
    if np.isnan(explain).any():
        return _invalid("EXPLAIN_ABOVE must not be NaN")
    return _Rows(pixels, explain)


def _response(rows: list[Scored]) -> Any:
    def strings(values: list[str]) -> np.ndarray:
        return np.array([[v.encode("utf-8")] for v in values], dtype=np.object_)

    return pb_utils.InferenceResponse(
        output_tensors=[
            pb_utils.Tensor("SCORE", np.array([[r.score] for r in rows], dtype=np.float32)),
            pb_utils.Tensor("LABEL", strings([r.label for r in rows])),
            pb_utils.Tensor("EXPLANATION", strings([r.explanation or "" for r in rows])),
            pb_utils.Tensor("ANSWER_LABEL", strings([r.answer_label or "" for r in rows])),
        ]
    )


def _invalid(message: str) -> Any:
    return pb_utils.TritonError(message, pb_utils.TritonError.INVALID_ARG)


def _device(args: dict[str, str]) -> str:
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"
