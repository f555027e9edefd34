"""The production backend: Triton over gRPC, many requests in flight, merged into batches by Triton's
dynamic batcher. Each request carries one uint8 crop (IMAGE [1, 336, 336, 3], 339 KB).
Triton's model hashes its weights at load and returns the identity with every answer
(the WEIGHTS output), so a Triton that was rolled out to other weights is noticed on its next answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass

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
VERDICT_OUTPUTS = ("SCORE", "LABEL")
EXPLAIN_OUTPUTS = ("SCORE", "LABEL", "EXPLANATION", "ANSWER_LABEL")
WEIGHTS = "WEIGHTS"  # the output that names the weights that answered


@dataclass
class _Served:
    """One Triton model as this client knows it: what to ask it, its deadline, and which weights answer."""

    name: str
    timeout_s: float
    outputs: tuple[str, ...]
    info: ModelInfo
    known: bool = False  # its config was read (the explain model may come later than the worker)


class TritonDetector:
    """One gRPC request per image: Triton's dynamic batcher merges concurrent requests into one pass. Verdicts
    go to `settings.triton_model`, explanations to `settings.triton_explain_model`: separate models, so an
    explanation never delays a verdict."""

    def __init__(self, settings: Settings) -> None:
        self._url = settings.triton_url
        self._model_name = settings.triton_model
        self._startup_timeout_s = settings.triton_startup_timeout_s
        self._tls = _tls_options(settings)
        self._client: grpcclient.InferenceServerClient | None = None
        self._verdict = _Served(
            settings.triton_model,
            settings.triton_timeout_s,
            VERDICT_OUTPUTS,
            ModelInfo(name=settings.triton_model, version="unknown"),
        )
        self._explainer = _Served(
            settings.triton_explain_model,
            settings.triton_explain_timeout_s,
            EXPLAIN_OUTPUTS,
            ModelInfo(name=settings.triton_explain_model, version="unknown"),
        )
        self._learning: asyncio.Task[None] | None = None

    @property
    def model(self) -> ModelInfo:
        return self._verdict.info

    @property
    def explain_model(self) -> ModelInfo:
        return self._explainer.info

    async def start(self) -> None:
        # round_robin spreads requests over every address the name resolves to: with a headless Service
        # (dns:///triton-headless:8001) new Triton replicas get traffic without reconnecting workers.
        self._client = grpcclient.InferenceServerClient(
            self._url, channel_args=[("grpc.lb_policy_name", "round_robin")], **self._tls
        )
        await self._wait_until_ready()
        try:
            await self._read_config(self._verdict)
        except InferenceServerException as exc:
            raise ModelError(f"Triton at {self._url} does not serve {self._model_name!r}: {exc}") from exc
        await self._learn_weights()
        # A Triton without the explain model still serves verdicts: `explain` says why it cannot, and the
        # explain model's weights are learned in the background (a generation takes seconds).
        if await self._explain_known():
            self._learning = asyncio.create_task(self._learn_explain_weights(), name="triton-explain-weights")

    async def _read_config(self, served: _Served) -> None:
        assert self._client is not None
        config = (await self._client.get_model_config(served.name, as_json=True))["config"]
        checkpoint = config.get("parameters", {}).get("checkpoint", {}).get("string_value", "?")
        versions = config.get("version_policy", {}).get("specific", {}).get("versions", ["latest"])
        outputs = {output.get("name") for output in config.get("output", [])}
        wanted = VERDICT_OUTPUTS if served is self._verdict else EXPLAIN_OUTPUTS
        served.outputs = (*wanted, WEIGHTS) if WEIGHTS in outputs else wanted
        served.info = ModelInfo(name=served.name, version=f"{versions[0]} ({checkpoint})")
        served.known = True
        if WEIGHTS not in outputs:
            log.warning("Triton %s does not say which weights it runs: nothing is served from the cache", served.name)

    async def _learn_weights(self) -> None:
        """One answer, to a blank image, says which weights give verdicts before the first event."""
        if WEIGHTS not in self._verdict.outputs:
            return
        try:
            await self.detect(np.zeros((CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8))
        except Rejected as exc:
            log.warning("Triton %s: weights unknown until its first answer (%s)", self._model_name, exc.detail)
        log.info("Triton %s runs weights %s", self._model_name, self.model.weights)

    async def _learn_explain_weights(self) -> None:
        if WEIGHTS not in self._explainer.outputs:
            return
        try:
            await self.explain(np.zeros((CROP_SIZE, CROP_SIZE, 3), dtype=np.uint8))
        except Rejected as exc:
            log.warning("Triton %s: weights unknown until its first answer (%s)", self._explainer.name, exc.detail)

    async def _explain_known(self) -> bool:
        """Whether the explain model's config is read: read on first need, so one loaded after the worker
        started is found."""
        if not self._explainer.known:
            try:
                await self._read_config(self._explainer)
            except InferenceServerException as exc:
                log.warning("Triton at %s lacks %s: no explanations (%s)", self._url, self._explainer.name, exc)
        return self._explainer.known

    async def stop(self) -> None:
        if self._learning is not None:
            self._learning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._learning
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
        """Whether the verdict model is ready: explanations are optional, verdicts are not."""
        assert self._client is not None
        try:
            return bool(await self._client.is_model_ready(self._model_name))
        except InferenceServerException:
            return False

    async def explain_ready(self) -> bool:
        """Whether the explain model is ready (the explainer's readiness)."""
        return await self._model_ready(self._explainer.name)

    async def detect(self, crop: np.ndarray) -> Detection:
        return await self._infer(self._verdict, crop)

    async def explain(self, crop: np.ndarray) -> Detection:
        if not await self._explain_known():
            raise Rejected(
                Reason.INFERENCE_UNAVAILABLE,
                f"Triton at {self._url} does not serve the explain model {self._explainer.name!r} "
                "(MODERATION_TRITON_EXPLAIN_MODEL): explanations are unavailable until it does",
            )
        return await self._infer(self._explainer, crop)

    async def detect_batch(self, pixels: np.ndarray, *, explain_above: float | Sequence[float]) -> list[Detection]:
        """N images as N concurrent requests: Triton's dynamic batcher merges them into its batches."""
        return await detect_each(self, pixels, explain_above)

    async def _infer(self, served: _Served, crop: np.ndarray) -> Detection:
        assert self._client is not None, "start() first"
        image = grpcclient.InferInput("IMAGE", [1, *crop.shape], "UINT8")
        image.set_data_from_numpy(np.ascontiguousarray(crop, dtype=np.uint8)[np.newaxis])
        outputs = [grpcclient.InferRequestedOutput(n) for n in served.outputs]
        try:
            result = await self._client.infer(
                served.name, [image], outputs=outputs, client_timeout=served.timeout_s, headers=_traced()
            )
        except InferenceServerException as exc:
            # A (re)starting Triton answers "unknown model" until the model is loaded: that is an
            # outage to wait out, not a verdict on this image.
            down = exc.status() in _UNAVAILABLE or not await self._model_ready(served.name)
            reason = Reason.INFERENCE_UNAVAILABLE if down else Reason.INFERENCE_FAILED
            raise Rejected(reason, f"Triton {served.name}: {exc.message()}") from exc
        if WEIGHTS in served.outputs:
            self._answered_by(served, _text(result.as_numpy(WEIGHTS)))
        explained = served is self._explainer
        return Detection.of(
            float(result.as_numpy("SCORE").reshape(-1)[0]),
            _text(result.as_numpy("LABEL")),
            _text(result.as_numpy("EXPLANATION")) if explained else None,
            _text(result.as_numpy("ANSWER_LABEL")) if explained else None,
        )

    async def _model_ready(self, name: str) -> bool:
        assert self._client is not None
        try:
            return bool(await self._client.is_model_ready(name))
        except InferenceServerException:
            return False

    def _answered_by(self, served: _Served, weights: str | None) -> None:
        # Set before the call returns, so the caller's cache entry names the weights that gave this answer.
        if weights != served.info.weights:
            if served.info.weights is not None:
                log.warning("Triton %s now answers with weights %s (was %s)", served.name, weights, served.info.weights)
            served.info = served.info.model_copy(update={"weights": weights})
        verdict, explain = self._verdict.info.weights, self._explainer.info.weights
        if served is self._explainer and verdict and explain and verdict != explain:
            log.error(
                "Triton's %s runs weights %s but %s runs %s: explanations come from other weights than verdicts",
                self._verdict.name,
                verdict,
                self._explainer.name,
                explain,
            )


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
