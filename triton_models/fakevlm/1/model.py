"""Triton Python-backend model for FakeVLM: decode tensors, call moderation.model.fakevlm, encode tensors.

All model logic lives in `moderation.model.fakevlm.FakeVLM`; this file only adapts Triton requests to one
`FakeVLM.score` call per dynamic batch and keeps every error attached to the request that caused it.
"""

from __future__ import annotations

import gc
import json
from pathlib import Path
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from moderation.errors import ModelError
from moderation.model import triton_io
from moderation.model.fakevlm import FakeVLM, Scored, checkpoint_relative_to
from moderation.model.identity import weights_identity


class TritonPythonModel:
    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self._threshold = float(params.get("threshold", "0.5"))
        self._max_new_tokens = int(params.get("max_new_tokens", "128"))
        checkpoint = checkpoint_relative_to(params.get("checkpoint", "weights"), Path(args["model_repository"]))
        device = _device(args)
        try:
            compile = params.get("compile", "false").lower() == "true"  # worth it on a GPU only
            self._model: FakeVLM | None = FakeVLM.load(checkpoint, device=device, compile=compile)
        except Exception as exc:
            # Raising here makes Triton mark the model unavailable with this message, instead of
            # serving a model that fails every request.
            raise RuntimeError(f"fakevlm: cannot load the model on {device}: {exc}") from exc
        self._weights = _identity(checkpoint)
        identity = self._weights or "weights unknown"
        pb_utils.Logger.log_info(f"fakevlm: loaded {self._model.model_id} ({identity}) from {checkpoint} on {device}")

    def execute(self, requests: list[Any]) -> list[Any]:
        decoded = [triton_io.decode(pb_utils, request) for request in requests]
        try:
            scored: list[Scored] | Exception = self._score(triton_io.readable(decoded))
        except Exception as exc:  # one failed forward pass fails this batch, never the server
            scored = exc
        return triton_io.responses(pb_utils, decoded, scored, self._weights)

    def finalize(self) -> None:
        self._model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _score(self, batches: list[triton_io.Rows]) -> list[Scored]:
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


def _identity(checkpoint: str) -> str:
    # Unknown weights still serve verdicts: the workers only stop serving them from their cache.
    try:
        return weights_identity(checkpoint)
    except ModelError as exc:
        pb_utils.Logger.log_warn(f"fakevlm: {exc}")
        return ""


def _device(args: dict[str, str]) -> str:
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"
