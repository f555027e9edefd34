"""FakeVLM loaded in this process (transformers, CPU or GPU): concurrent calls micro-batched here, verdicts
and explanations in separate queues.
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
    crop: np.ndarray  # (336, 336, 3) uint8
    future: asyncio.Future[Detection]


class _Lane:
    """One micro-batch queue and the task that drains it: verdicts and explanations each have their own, so a
    verdict never waits behind a generation."""

    def __init__(self, name: str, explain_above: float) -> None:
        self.name = name
        self.explain_above = explain_above  # inf: never explain; 0: explain every row
        self.queue: asyncio.Queue[_Request] = asyncio.Queue()
        self.task: asyncio.Task[None] | None = None
        self.inflight: list[_Request] = []  # taken from the queue, not answered yet

    def running(self) -> bool:
        return self.task is not None and not self.task.done()

    async def stop(self, why: Exception) -> None:
        if self.task is not None:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
            self.task = None
        for request in self.inflight:
            _fail(request, why)
        self.inflight = []
        while not self.queue.empty():
            _fail(self.queue.get_nowait(), why)


class InProcessDetector:
    """FakeVLM in this process (transformers, CPU or GPU) behind the same interface as Triton.

    Concurrent calls are micro-batched like Triton's dynamic batcher does: a queue is drained up to
    `batch_size` requests or `batch_wait_s` after the first one, and each batch is ONE `FakeVLM.score` call in
    a worker thread, so the event loop never waits on the model. `detect` and `explain` have a queue and a
    batcher each (as Triton has two models), so verdicts keep flowing while an explained batch generates.
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
        self._lanes: dict[str, _Lane] = {}
        self.model = ModelInfo(name=IN_PROCESS, version=f"unloaded ({checkpoint})")
        self.explain_model = self.model

    async def start(self) -> None:
        """Load the model (in a thread: seconds to minutes) and start the batching tasks."""
        from moderation.model.fakevlm import FakeVLM

        if self._vlm is None:
            self._vlm = await asyncio.to_thread(FakeVLM.load, self._checkpoint, device=self._device, dtype=self._dtype)
        location = self._checkpoint if not Path(self._checkpoint).exists() else Path(self._checkpoint).resolve()
        weights = await asyncio.to_thread(_identity_or_none, self._checkpoint)
        version = f"{self._vlm.model_id} ({location}) on {self._device}"
        self.model = ModelInfo(name=IN_PROCESS, version=version, weights=weights)
        self.explain_model = self.model  # one loaded model answers both
        for name, limit in (("verdict", math.inf), ("explain", 0.0)):
            lane = self._lanes.get(name)
            if lane is None or not lane.running():
                lane = self._lanes[name] = _Lane(name, limit)
                lane.task = asyncio.create_task(self._run(lane), name=f"fakevlm-{name}-batcher")

    async def stop(self) -> None:
        stopped = Rejected(Reason.INFERENCE_UNAVAILABLE, "the detector stopped")
        for lane in self._lanes.values():
            await lane.stop(stopped)
        self._lanes = {}
        self._vlm = None

    @property
    def vlm(self) -> FakeVLM:
        """The loaded model, for offline tools that also generate freely (eval): loaded once, shared."""
        if self._vlm is None:
            raise ModelError("the in-process detector is not started")
        return self._vlm

    async def ready(self) -> bool:
        return self._vlm is not None and len(self._lanes) == 2 and all(lane.running() for lane in self._lanes.values())

    async def explain_ready(self) -> bool:
        return await self.ready()  # one model in this process answers both

    async def detect(self, crop: np.ndarray) -> Detection:
        return await self._ask("verdict", crop)

    async def explain(self, crop: np.ndarray) -> Detection:
        return await self._ask("explain", crop)

    async def detect_batch(self, pixels: np.ndarray, *, explain_above: float | Sequence[float]) -> list[Detection]:
        """N images through the queues: the batchers cut them into batches of `batch_size`."""
        return await detect_each(self, pixels, explain_above)

    async def _ask(self, lane_name: str, crop: np.ndarray) -> Detection:
        lane = self._lanes.get(lane_name)
        if lane is None or not await self.ready():
            raise ModelError("InProcessDetector: start() first")
        future: asyncio.Future[Detection] = asyncio.get_running_loop().create_future()
        await lane.queue.put(_Request(_checked_crop(crop), future))
        return await future

    async def _run(self, lane: _Lane) -> None:
        while True:
            lane.inflight = []
            await self._collect(lane.queue, lane.inflight)
            batch = [r for r in lane.inflight if not r.future.done()]  # callers that gave up
            if batch:
                await self._score(batch, lane.explain_above)

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

    async def _score(self, batch: list[_Request], explain_above: float) -> None:
        vlm = self._vlm
        try:
            if vlm is None:
                raise ModelError("the model was unloaded")
            scored = await asyncio.to_thread(
                vlm.score,
                np.stack([r.crop for r in batch]),
                [explain_above] * len(batch),
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


def _checked_crop(crop: np.ndarray) -> np.ndarray:
    # The checks Triton's model makes per request, so a bad request fails alone, not its batch.
    array = np.asarray(crop)
    if array.dtype != np.uint8 or array.shape != (CROP_SIZE, CROP_SIZE, 3):
        expected = f"uint8 ({CROP_SIZE}, {CROP_SIZE}, 3)"
        raise Rejected(Reason.INFERENCE_FAILED, f"the crop must be {expected}, got {array.dtype} {array.shape}")
    return array


def _identity_or_none(checkpoint: str | Path) -> str | None:
    try:
        return weights_identity(checkpoint)
    except ModelError as exc:  # verdicts still flow; none is served from the cache
        log.warning("%s", exc)
        return None


def _fail(request: _Request, exc: Exception) -> None:
    if not request.future.done():
        request.future.set_exception(exc)
