"""The detector interface and its Triton backend (gRPC, many requests in flight, merged by Triton)."""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from moderation.errors import ModelError, Reason, Rejected
from moderation.events import ModelInfo
from moderation.settings import Settings

log = logging.getLogger(__name__)

_UNAVAILABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED")


@dataclass(frozen=True)
class Detection:
    score: float  # P(fake)
    label: str
    explanation: str | None
    answer_label: str | None


class Detector(Protocol):
    model: ModelInfo

    async def detect(self, pixel_values: np.ndarray, *, explain_above: float) -> Detection: ...


class TritonDetector:
    """One gRPC request per image: Triton's dynamic batcher merges concurrent requests into one pass."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.triton_url
        self._model_name = settings.triton_model
        self._timeout_s = settings.triton_timeout_s
        self._startup_timeout_s = settings.triton_startup_timeout_s
        self._client: grpcclient.InferenceServerClient | None = None
        self.model = ModelInfo(name=settings.triton_model, version="unknown")

    async def start(self) -> None:
        self._client = grpcclient.InferenceServerClient(self._url)
        await self._wait_until_ready()
        try:
            config = (await self._client.get_model_config(self._model_name, as_json=True))["config"]
        except InferenceServerException as exc:
            raise ModelError(f"Triton at {self._url} does not serve {self._model_name!r}: {exc}") from exc
        checkpoint = config.get("parameters", {}).get("checkpoint", {}).get("string_value", "?")
        versions = config.get("version_policy", {}).get("specific", {}).get("versions", ["latest"])
        self.model = ModelInfo(name=self._model_name, version=f"{versions[0]} ({checkpoint})")

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while not await self.ready():
            if time.monotonic() > deadline:
                raise ModelError(f"model {self._model_name!r} at {self._url} not ready after {self._startup_timeout_s}s")
            log.info("waiting for Triton model %s at %s", self._model_name, self._url)
            await asyncio.sleep(2.0)

    async def ready(self) -> bool:
        assert self._client is not None
        try:
            return bool(await self._client.is_model_ready(self._model_name))
        except InferenceServerException:
            return False

    async def detect(self, pixel_values: np.ndarray, *, explain_above: float) -> Detection:
        assert self._client is not None, "start() first"
        pixels = grpcclient.InferInput("PIXEL_VALUES", [1, *pixel_values.shape], "FP32")
        pixels.set_data_from_numpy(pixel_values[np.newaxis].astype(np.float32, copy=False))
        explain = grpcclient.InferInput("EXPLAIN_ABOVE", [1, 1], "FP32")
        explain.set_data_from_numpy(np.asarray([[explain_above]], dtype=np.float32))
        outputs = [grpcclient.InferRequestedOutput(n) for n in ("SCORE", "LABEL", "EXPLANATION", "ANSWER_LABEL")]
        try:
            result = await self._client.infer(
                self._model_name, [pixels, explain], outputs=outputs, client_timeout=self._timeout_s
            )
        except InferenceServerException as exc:
            reason = Reason.INFERENCE_UNAVAILABLE if exc.status() in _UNAVAILABLE else Reason.INFERENCE_FAILED
            raise Rejected(reason, f"Triton {self._model_name}: {exc.message()}") from exc
        score = float(result.as_numpy("SCORE").reshape(-1)[0])
        return Detection(
            score=score,
            label=_text(result.as_numpy("LABEL")) or ("fake" if score >= 0.5 else "real"),
            explanation=_text(result.as_numpy("EXPLANATION")),
            answer_label=_text(result.as_numpy("ANSWER_LABEL")),
        )


def _text(array: np.ndarray | None) -> str | None:
    if array is None:
        return None
    value = array.reshape(-1)[0]
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text or None
