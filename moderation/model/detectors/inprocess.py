"""FakeVLM loaded in this process (transformers, CPU or GPU): concurrent calls micro-batched here.
The checkpoint is hashed at start (`moderation.model.identity`)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from moderation.errors import ModelError, Reason, Rejected
from moderation.events import ModelInfo
from moderation.model import require_model_extra
from moderation.model.detectors.base import Detection, detect_each
from moderation.model.identity import weights_identity
from moderation.model.imaging import CROP_SIZE

if TYPE_CHECKING:  # torch and transformers load only with the in-process backend
    import torch

    from moderation.model.fakevlm import FakeVLM

log = logging.getLogger(__name__)

IN_PROCESS = "fakevlm-in-process"  # ModelInfo.name of the in-process backend


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
        require_model_extra("the in-process detector (MODERATION_DETECTOR=inprocess)")
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
        from moderation.model.fakevlm import FakeVLM

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
        return await detect_each(self, pixel_values, explain_above)

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
                request.future.set_result(Detection.of(row.score, row.label, row.explanation, row.answer_label))


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
