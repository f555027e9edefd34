"""The detector interface and its two backends, one scoring implementation (`moderation.fakevlm`):

- `TritonDetector`: gRPC, many requests in flight, merged into batches by Triton's dynamic batcher;
- `InProcessDetector`: FakeVLM loaded in this process (CPU or GPU), concurrent calls micro-batched here.

`detector.model` says which weights answer (`ModelInfo.weights`, see `moderation.identity`): the in-process
backend hashes its checkpoint at start; Triton's model does so at load and returns it with every answer
(the WEIGHTS output), so a Triton that was rolled out to other weights is noticed on its next answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol, TypeVar

import numpy as np
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from moderation.errors import ModelError, Reason, Rejected
from moderation.events import ModelInfo
from moderation.identity import weights_identity
from moderation.imaging import CROP_SIZE
from moderation.settings import Settings

if TYPE_CHECKING:  # torch and transformers load only with the in-process backend
    import torch

    from moderation.fakevlm import FakeVLM

log = logging.getLogger(__name__)

IN_PROCESS = "fakevlm-in-process"  # ModelInfo.name of the in-process backend
_UNAVAILABLE = ("StatusCode.UNAVAILABLE", "StatusCode.DEADLINE_EXCEEDED", "StatusCode.RESOURCE_EXHAUSTED")
_OUTPUTS = ("SCORE", "LABEL", "EXPLANATION", "ANSWER_LABEL")
WEIGHTS = "WEIGHTS"  # the output that names the weights that answered


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
                self._model_name, [pixels, explain], outputs=outputs, client_timeout=self._timeout_s
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
        return Detection(
            score=score,
            label=_text(result.as_numpy("LABEL")) or ("fake" if score >= 0.5 else "real"),
            explanation=_text(result.as_numpy("EXPLANATION")),
            answer_label=_text(result.as_numpy("ANSWER_LABEL")),
        )

    async def detect_batch(
        self, pixel_values: np.ndarray, *, explain_above: float | Sequence[float]
    ) -> list[Detection]:
        """N images as N concurrent requests: Triton's dynamic batcher merges them into its batches."""
        return await _detect_each(self, pixel_values, explain_above)

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


def _text(array: np.ndarray | None) -> str | None:
    if array is None:
        return None
    value = array.reshape(-1)[0]
    text = value.decode() if isinstance(value, bytes) else str(value)
    return text or None


class BatchDetector(Detector, Protocol):
    """A detector that also takes many images at once (what the scan and eval commands use)."""

    async def detect_batch(
        self, pixel_values: np.ndarray, *, explain_above: float | Sequence[float]
    ) -> list[Detection]: ...


@dataclass
class _Request:
    pixels: np.ndarray  # (3, 336, 336) float32
    explain_above: float
    future: asyncio.Future[Detection]


class InProcessDetector:
    """FakeVLM in this process (transformers, CPU or GPU) behind the same interface as Triton.

    Concurrent `detect` calls are micro-batched like Triton's dynamic batcher does: a queue is
    drained up to `batch_size` requests or `batch_wait_s` after the first one, and each batch is
    ONE `FakeVLM.score` call in a worker thread, so the event loop never waits on the model.
    """

    def __init__(
        self,
        checkpoint: str | Path,
        *,
        device: str = "cpu",
        batch_size: int = 16,
        batch_wait_s: float = 0.01,
        threshold: float = 0.5,
        max_new_tokens: int = 128,
        dtype: torch.dtype | str | None = None,  # a torch.dtype or its name ("bfloat16")
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self._checkpoint = checkpoint
        self._device = device
        self._dtype = dtype
        self._batch_size = batch_size
        self._batch_wait_s = batch_wait_s
        self._threshold = threshold
        self._max_new_tokens = max_new_tokens
        self._vlm: FakeVLM | None = None
        self._queue: asyncio.Queue[_Request] | None = None
        self._batcher: asyncio.Task[None] | None = None
        self._inflight: list[_Request] = []  # taken from the queue, not answered yet
        self.model = ModelInfo(name=IN_PROCESS, version=f"unloaded ({checkpoint})")

    async def start(self) -> None:
        """Load the model (in a thread: seconds to minutes) and start the batching task."""
        from moderation.fakevlm import FakeVLM

        if self._vlm is None:
            self._vlm = await asyncio.to_thread(FakeVLM.load, self._checkpoint, device=self._device, dtype=self._dtype)
        location = self._checkpoint if not Path(self._checkpoint).exists() else Path(self._checkpoint).resolve()
        weights = await asyncio.to_thread(_identity_or_none, self._checkpoint)
        version = f"{self._vlm.model_id} ({location}) on {self._device}"
        self.model = ModelInfo(name=IN_PROCESS, version=version, weights=weights)
        if self._batcher is None or self._batcher.done():
            self._queue = asyncio.Queue()
            self._batcher = asyncio.create_task(self._run(), name="fakevlm-batcher")

    async def stop(self) -> None:
        if self._batcher is not None:
            self._batcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._batcher
            self._batcher = None
        stopped = Rejected(Reason.INFERENCE_UNAVAILABLE, "the detector stopped")
        for request in self._inflight:
            _fail(request, stopped)
        self._inflight = []
        if self._queue is not None:
            while not self._queue.empty():
                _fail(self._queue.get_nowait(), stopped)
            self._queue = None
        self._vlm = None

    @property
    def vlm(self) -> FakeVLM:
        """The loaded model, for offline tools that also generate freely (eval): loaded once, shared."""
        if self._vlm is None:
            raise ModelError("the in-process detector is not started")
        return self._vlm

    async def ready(self) -> bool:
        return self._vlm is not None and self._batcher is not None and not self._batcher.done()

    async def detect(self, pixel_values: np.ndarray, *, explain_above: float) -> Detection:
        if self._queue is None or not await self.ready():
            raise ModelError("InProcessDetector: start() first")
        pixels = _checked_pixels(pixel_values)
        if math.isnan(explain_above):
            raise Rejected(Reason.INFERENCE_FAILED, "explain_above must not be NaN")
        future: asyncio.Future[Detection] = asyncio.get_running_loop().create_future()
        await self._queue.put(_Request(pixels, float(explain_above), future))
        return await future

    async def detect_batch(
        self, pixel_values: np.ndarray, *, explain_above: float | Sequence[float]
    ) -> list[Detection]:
        """N images through the same queue: the batcher cuts them into batches of `batch_size`."""
        return await _detect_each(self, pixel_values, explain_above)

    async def _run(self) -> None:
        assert self._queue is not None
        while True:
            self._inflight = []
            await self._collect(self._queue, self._inflight)
            batch = [r for r in self._inflight if not r.future.done()]  # callers that gave up
            if batch:
                await self._score(batch)

    async def _collect(self, queue: asyncio.Queue[_Request], batch: list[_Request]) -> None:
        batch.append(await queue.get())
        deadline = asyncio.get_running_loop().time() + self._batch_wait_s
        while len(batch) < self._batch_size:
            with contextlib.suppress(asyncio.QueueEmpty):
                batch.append(queue.get_nowait())
                continue
            remaining = deadline - asyncio.get_running_loop().time()
            if remaining <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(queue.get(), remaining))
            except TimeoutError:
                break

    async def _score(self, batch: list[_Request]) -> None:
        vlm = self._vlm
        try:
            if vlm is None:
                raise ModelError("the model was unloaded")
            scored = await asyncio.to_thread(
                vlm.score,
                np.stack([r.pixels for r in batch]),
                [r.explain_above for r in batch],
                threshold=self._threshold,
                max_new_tokens=self._max_new_tokens,
            )
        except Exception as exc:  # one failed pass fails its batch, never the batcher
            log.error("in-process inference failed for a batch of %d: %r", len(batch), exc)
            for request in batch:
                _fail(request, Rejected(Reason.INFERENCE_FAILED, f"in-process FakeVLM: {exc}"))
            return
        for request, row in zip(batch, scored, strict=True):
            if not request.future.done():
                request.future.set_result(
                    Detection(
                        score=row.score, label=row.label, explanation=row.explanation, answer_label=row.answer_label
                    )
                )


class NullDetector:
    """Costs nothing and says "real" (P(fake) = 0): for benchmarking everything around the model."""

    model = ModelInfo(name="null", version="0 (no model: benchmarking only)", weights="null")

    async def start(self) -> None: ...

    async def stop(self) -> None: ...

    async def ready(self) -> bool:
        return True

    async def detect(self, pixel_values: np.ndarray, *, explain_above: float) -> Detection:
        return Detection(score=0.0, label="real", explanation=None, answer_label=None)


def detector_from_settings(settings: Settings) -> TritonDetector | InProcessDetector | NullDetector:
    """The worker's detector, by MODERATION_DETECTOR."""
    if settings.detector == "null":
        return NullDetector()
    if settings.detector == "inprocess":
        checkpoint = settings.checkpoint or default_checkpoint(settings.data_dir)[0]
        return InProcessDetector(
            checkpoint, device=settings.device, batch_size=settings.batch_size, threshold=settings.label_threshold
        )
    return TritonDetector(settings)


def open_detector(
    *,
    checkpoint: str | Path | None = None,
    triton_url: str | None = None,
    triton_model: str = "fakevlm",
    device: str = "cpu",
    dtype: str | None = None,
    batch_size: int = 16,
    threshold: float = 0.5,
    max_new_tokens: int = 128,
    home: Path = Path(".moderation"),
    warn: Callable[[str], None] | None = None,
) -> InProcessDetector | TritonDetector:
    """A detector without a Settings object: Triton when `triton_url` is given, else in-process on
    `checkpoint`, by default the trained tiny model or else the random one (`warn` is told)."""
    if checkpoint is not None and triton_url is not None:
        raise ValueError("give a checkpoint or a Triton URL, not both")
    if triton_url is not None:
        return TritonDetector(Settings.model_validate({"triton_url": triton_url, "triton_model": triton_model}))
    if checkpoint is None:
        checkpoint, trained = default_checkpoint(home)
        if not trained and warn is not None:
            warn(f"no checkpoint given: using the random tiny model at {checkpoint}; its verdicts mean nothing")
    return InProcessDetector(
        checkpoint,
        device=device,
        dtype=dtype,
        batch_size=batch_size,
        threshold=threshold,
        max_new_tokens=max_new_tokens,
    )


@contextlib.asynccontextmanager
async def running(detector: _D) -> AsyncIterator[_D]:
    """start() ... stop(), whatever happens in between."""
    await detector.start()
    try:
        yield detector
    finally:
        await detector.stop()


_D = TypeVar("_D", bound="InProcessDetector | TritonDetector")


def default_checkpoint(home: Path) -> tuple[Path, bool]:
    """The trained tiny checkpoint when the repository has one (True), else the random tiny one under
    `home`/models/fakevlm-tiny, built on first use (False: its verdicts mean nothing)."""
    trained = _trained_checkpoint()
    if trained is not None:
        return trained, True
    from moderation.tinymodel import build_tiny_checkpoint

    return build_tiny_checkpoint(Path(home) / "models" / "fakevlm-tiny"), False


def _trained_checkpoint() -> Path | None:
    from moderation.training import trained_checkpoint

    try:
        return trained_checkpoint()
    except ModelError:  # not built (yet): `moderation model train-tiny`
        return None


async def _detect_each(
    detector: Detector, pixel_values: np.ndarray, explain_above: float | Sequence[float]
) -> list[Detection]:
    """Every image through `detector.detect` at once, each with its own (or the shared) explain limit."""
    limits = _per_row(explain_above, len(pixel_values))
    return list(
        await asyncio.gather(*(detector.detect(p, explain_above=e) for p, e in zip(pixel_values, limits, strict=True)))
    )


def _per_row(explain_above: float | Sequence[float], rows: int) -> list[float]:
    if isinstance(explain_above, int | float):
        return [float(explain_above)] * rows
    limits = [float(e) for e in explain_above]
    if len(limits) != rows:
        raise ValueError(f"{rows} images but {len(limits)} explain_above values")
    return limits


def _checked_pixels(pixel_values: np.ndarray) -> np.ndarray:
    # The checks Triton's model.py makes per request, so a bad request fails alone, not its batch.
    pixels = np.asarray(pixel_values)
    if pixels.shape != (3, CROP_SIZE, CROP_SIZE):
        raise Rejected(
            Reason.INFERENCE_FAILED, f"pixel_values must be (3, {CROP_SIZE}, {CROP_SIZE}), got {pixels.shape}"
        )
    pixels = pixels.astype(np.float32, copy=False)
    if not np.isfinite(pixels).all():
        raise Rejected(Reason.INFERENCE_FAILED, "pixel_values must be finite float32 values")
    return pixels


def _identity_or_none(checkpoint: str | Path) -> str | None:
    try:
        return weights_identity(checkpoint)
    except ModelError as exc:  # verdicts still flow; none is served from the cache
        log.warning("%s", exc)
        return None


def _fail(request: _Request, exc: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
