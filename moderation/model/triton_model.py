"""The Triton Python-backend model for FakeVLM (transformers, CPU or one GPU), written once for both models.

`triton_models/fakevlm` (role verdict) answers SCORE, LABEL and WEIGHTS and never generates;
`triton_models/fakevlm_explain` (role explain) explains every row. They are separate models so that a
generation never holds a verdict of the same dynamic batch hostage. Their model.py files only hand this class
the stub's `triton_python_backend_utils`, which exists only inside Triton (the tests and bench/gpu_bls_check.py
hand in moderation.devkit.pb_utils, a stand-in).
"""

from __future__ import annotations

import gc
import json
import math
import os
from pathlib import Path
from typing import Any

from moderation.errors import ModelError
from moderation.model import triton_io
from moderation.model.fakevlm import FakeVLM, FastPath, Scored, checkpoint_relative_to
from moderation.model.identity import weights_identity


class FakeVLMTritonModel:
    """`initialize`, `execute`, `finalize` as Triton's Python backend calls them: one `FakeVLM.score` call per
    dynamic batch, one response per request, every error attached to the request that caused it."""

    def __init__(self, pb: Any) -> None:
        self._pb = pb
        self._model: FakeVLM | None = None
        self._role: triton_io.Role = "verdict"
        self._weights = ""

    def initialize(self, args: dict[str, str]) -> None:
        config = json.loads(args["model_config"])
        params = {key: value["string_value"] for key, value in config.get("parameters", {}).items()}
        self._role = triton_io.role_of(params)
        _lower_cpu_priority(int(params.get("nice", "0")), int(params.get("threads", "0")))
        self._threshold = float(params.get("threshold", "0.5"))
        self._max_new_tokens = int(params.get("max_new_tokens", "128"))
        checkpoint = checkpoint_relative_to(params.get("checkpoint", "weights"), Path(args["model_repository"]))
        device = _device(args)
        try:
            self._model = FakeVLM.load(checkpoint, device=device, dtype=params.get("dtype"), fast=fast_path(params))
        except Exception as exc:
            # Raising here makes Triton mark the model unavailable with this message, instead of
            # serving a model that fails every request.
            raise RuntimeError(f"fakevlm ({self._role}): cannot load the model on {device}: {exc}") from exc
        self._weights = self._identity(checkpoint)
        identity = self._weights or "weights unknown"
        self._pb.Logger.log_info(
            f"fakevlm ({self._role}): loaded {self._model.model_id} ({identity}) from {checkpoint} on {device}"
        )

    def execute(self, requests: list[Any]) -> list[Any]:
        decoded = [triton_io.decode(self._pb, request) for request in requests]
        try:
            scored: list[Scored] | Exception = self._score(triton_io.crops(decoded))
        except Exception as exc:  # one failed forward pass fails this batch, never the server
            scored = exc
        return triton_io.responses(self._pb, decoded, scored, self._weights, self._role)

    def finalize(self) -> None:
        self._model = None
        gc.collect()
        try:
            import torch

            if torch.cuda.is_available():
                torch.cuda.empty_cache()
        except ImportError:
            pass

    def _score(self, crops: Any) -> list[Scored]:
        if len(crops) == 0:
            return []
        if self._model is None:
            raise RuntimeError("the model has been finalized")
        # Scores never exceed 1: inf never explains (no KV cache kept), 0 explains every row.
        limit = 0.0 if self._role == "explain" else math.inf
        # ONE forward pass for the whole dynamic batch, whatever each request's own row count.
        return self._model.score(
            crops, [limit] * len(crops), threshold=self._threshold, max_new_tokens=self._max_new_tokens
        )

    def _identity(self, checkpoint: str) -> str:
        # Unknown weights still serve verdicts: the workers only stop serving them from their cache.
        try:
            return weights_identity(checkpoint)
        except ModelError as exc:
            self._pb.Logger.log_warn(f"fakevlm ({self._role}): {exc}")
            return ""


def fast_path(params: dict[str, str]) -> FastPath:
    """The config's speed parameters (configs/gpu.pbtxt sets them; the CPU config.pbtxt leaves the eager defaults):
    `compile` (true/false), `compile_mode` (torch.compile's mode), `batch_buckets` ("1,8,16,32,64"),
    `static_cache` (true/false)."""
    buckets = tuple(sorted(int(b) for b in params.get("batch_buckets", "").split(",") if b.strip()))
    return FastPath(
        compile=params.get("compile", "false").lower() == "true",
        compile_mode=params.get("compile_mode", "default"),
        batch_buckets=buckets,
        static_cache=params.get("static_cache", "false").lower() == "true",
    )


def _lower_cpu_priority(increment: int, threads: int) -> None:
    """This instance's process yields the CPU to the others (`nice`, and at most `threads` torch threads, whose
    idle OpenMP workers would otherwise spin on every core): the explain model's generation must not starve the
    verdict model's forward passes where both share cores (the CPU here; the GPU's Python side)."""
    if increment > 0:
        os.nice(increment)
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _device(args: dict[str, str]) -> str:
    if args.get("model_instance_kind") == "GPU":
        return f"cuda:{args.get('model_instance_device_id', '0')}"
    return "cpu"
