"""The production backend: Triton over gRPC, many requests in flight, merged into batches by Triton's
dynamic batcher. Triton's model hashes its weights at load and returns the identity with every answer
(the WEIGHTS output), so a Triton that was rolled out to other weights is noticed on its next answer.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence

import numpy as np
import tritonclient.grpc.aio as grpcclient
from opentelemetry import propagate
from tritonclient.utils import InferenceServerException

from moderation.errors import ModelError, Reason, Rejected
from moderation.events import ModelInfo
from moderation.model.detectors.base import Detection, detect_each
from moderation.model.imaging import CROP_SIZE
from moderation.settings import Settings

log = logging.getLogger(__name__)

_UNAVAILABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED")
_OUTPUTS = ("SCORE", "LABEL", "EXPLANATION", "ANSWER_LABEL")
WEIGHTS = "WEIGHTS"  # the output that names the weights that answered


class TritonDetector:
    """One gRPC request per image: Triton's dynamic batcher merges concurrent requests into one pass."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.triton_url
        self._model_name = settings.triton_model
        self._timeout_s = settings.triton_timeout_s
        self._startup_timeout_s = settings.triton_startup_timeout_s
        self._tls = _tls_options(settings)
        self._client: grpcclient.InferenceServerClient | None = None
        self._outputs: tuple[str, ...] = _OUTPUTS
        self.model = ModelInfo(name=settings.triton_model, version="unknown")

    async def start(self) -> None:
        # round_robin spreads requests over every address the name resolves to: with a headless Service
        # (dns:///triton-headless:8001) new Triton replicas get traffic without reconnecting workers.
        self._client = grpcclient.InferenceServerClient(
            self._url, channel_args=[("grpc.lb_policy_name", "round_robin")], **self._tls
        )
        await self._wait_until_ready()
        try:
            config = (await self._client.get_model_config(self._model_name, as_json=True))["config"]
        except InferenceServerException as exc:
            raise ModelError(f"Triton at {self._url} does not serve {self._model_name!r}: {exc}") from exc
        checkpoint = config.get("parameters", {}).get("checkpoint", {}).get("string_value", "?")
        versions = config.get("version_policy", {}).get("specific", {}).get("versions", ["latest"])
        self.model = ModelInfo(name=self._model_name, version=f"{versions[0]} ({checkpoint})")
        await self._learn_weights({output.get("name") for output in config.get("output", [])})

    async def _learn_weights(self, outputs: set[str]) -> None:
        """One answer, to a blank image and never explained, says which weights serve before the first event."""
        if WEIGHTS not in outputs:
            log.warning(
                "Triton %s does not say which weights it runs: no verdict is served from the cache", self._model_name
            )
            return
        self._outputs = (*_OUTPUTS, WEIGHTS)
        try:
            await self.detect(np.zeros((3, CROP_SIZE, CROP_SIZE), dtype=np.float32), explain_above=math.inf)
        except Rejected as exc:
            log.warning("Triton %s: weights unknown until its first answer (%s)", self._model_name, exc.detail)
        log.info("Triton %s runs weights %s", self._model_name, self.model.weights)

    async def stop(self) -> None:
        if self._client is not None:
            await self._client.close()

    async def _wait_until_ready(self) -> None:
        deadline = time.monotonic() + self._startup_timeout_s
        while not await self.ready():
            if time.monotonic() > deadline:
                raise ModelError(
                    f"model {self._model_name!r} at {self._url} not ready after {self._startup_timeout_s}s"
                )
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
        outputs = [grpcclient.InferRequestedOutput(n) for n in self._outputs]
        try:
            result = await self._client.infer(
                self._model_name, [pixels, explain], outputs=outputs, client_timeout=self._timeout_s, headers=_traced()
            )
        except InferenceServerException as exc:
            # A (re)starting Triton answers "unknown model" until the model is loaded: that is an
            # outage to wait out, not a verdict on this image.
            down = exc.status() in _UNAVAILABLE or not await self.ready()
            reason = Reason.INFERENCE_UNAVAILABLE if down else Reason.INFERENCE_FAILED
            raise Rejected(reason, f"Triton {self._model_name}: {exc.message()}") from exc
        score = float(result.as_numpy("SCORE").reshape(-1)[0])
        if WEIGHTS in self._outputs:
            self._answered_by(_text(result.as_numpy(WEIGHTS)))
        return Detection.of(
            score,
            _text(result.as_numpy("LABEL")),
            _text(result.as_numpy("EXPLANATION")),
            _text(result.as_numpy("ANSWER_LABEL")),
        )

    async def detect_batch(
        self, pixel_values: np.ndarray, *, explain_above: float | Sequence[float]
    ) -> list[Detection]:
        """N images as N concurrent requests: Triton's dynamic batcher merges them into its batches."""
        return await detect_each(self, pixel_values, explain_above)

    def _answered_by(self, weights: str | None) -> None:
        # Set before `detect` returns, so the caller's cache entry names the weights that gave this answer.
        if weights != self.model.weights:
            if self.model.weights is not None:
                log.warning(
                    "Triton %s now answers with weights %s (was %s)", self._model_name, weights, self.model.weights
                )
            self.model = self.model.model_copy(update={"weights": weights})


def _tls_options(settings: Settings) -> dict[str, object]:
    """gRPC TLS for Triton: the files are read here, once, so a missing one fails at start-up."""
    if not settings.triton_ssl:
        return {}
    files = {
        "root_certificates": settings.triton_ssl_root_certificates,
        "private_key": settings.triton_ssl_private_key,
        "certificate_chain": settings.triton_ssl_certificate_chain,
    }
    return {"ssl": True} | {name: path.read_bytes() for name, path in files.items() if path is not None}


def _traced() -> dict[str, str]:
    """The caller's trace context as gRPC metadata (W3C `traceparent`), for a Triton that traces too."""
    carrier: dict[str, str] = {}
    propagate.inject(carrier)
    return carrier


def _text(array: np.ndarray | None) -> str | None:
    if array is None:
        return None
    value = array.reshape(-1)[0]
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text or None
