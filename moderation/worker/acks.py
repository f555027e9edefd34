"""Batches in flight, acked strictly in the order they were taken, and how the acking is doing.

faust-streaming commits the highest run of consecutive acked offsets and misses a gap of one right after
its last commit (`Consumer._new_offset`; faust-streaming issue 606), so an out-of-order ack could commit
past an event whose outcome was never published: hence one acker that acks batch after batch.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from faust.types import EventT

from moderation.worker import metrics

log = logging.getLogger(__name__)


class OrderedAcks:
    """Batches in flight, each acked once its work is done and every batch taken before it is acked.

    `submit` waits while `limit` batches are at work (the backpressure), or twice that many are taken and
    not yet acked, and raises what stopped the acking: a batch whose outcomes could not be published leaves
    it and every later batch un-acked, and `on_failure` (the worker's crash) hears of it at once, even while
    the agent waits for new events. A batch's work may give its slot back early (`release`, handed to
    `start`): once its images are judged and only the broker's acknowledgements are awaited, the next batch
    may start, so the event loop is not left idle on a round trip (bench/pipeline.py).
    """

    def __init__(
        self,
        ack: Callable[[EventT], Awaitable[Any]],
        limit: int,
        *,
        on_failure: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._ack, self._clock = ack, clock
        self._slots = asyncio.Semaphore(limit)
        self._taken = asyncio.Semaphore(2 * limit)
        self._queue: asyncio.Queue[tuple[list[EventT], asyncio.Future[None], Callable[[], None]] | None] = (
            asyncio.Queue()
        )
        self._pending = 0  # events taken and not yet acked
        self._last_progress = clock()
        self._acker = asyncio.create_task(self._ack_in_order(), name="ordered-acks")
        if on_failure is not None:
            self._acker.add_done_callback(lambda task: _report(task, on_failure))

    @property
    def pending(self) -> int:
        return self._pending

    def stalled(self, limit_s: float) -> bool:
        """Events are waiting and no ack went out for `limit_s`: the worker is stuck, not slow."""
        return self._pending > 0 and self._clock() - self._last_progress > limit_s

    async def submit(self, events: list[EventT], start: Callable[[Callable[[], None]], Awaitable[None]]) -> None:
        """Wait for a free slot, then run `start(release)` for `events` in the background; `release()` gives
        the slot back before the batch is acked (at most once; the acker does it otherwise)."""
        await self._acquire(self._taken)
        await self._acquire(self._slots)
        if self._pending == 0:
            self._last_progress = self._clock()  # an idle worker was not stalled
        self._count(len(events))
        released = False

        def release() -> None:
            nonlocal released
            if not released:
                released = True
                self._slots.release()

        self._queue.put_nowait((events, asyncio.ensure_future(start(release)), release))

    async def _acquire(self, semaphore: asyncio.Semaphore) -> None:
        """Take one of the semaphore's slots, or raise what stopped the acking while waiting for one."""
        slot = asyncio.ensure_future(semaphore.acquire())
        try:
            await asyncio.wait({slot, self._acker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            slot.cancel()  # a no-op once acquired; on cancellation, no slot is taken later for nothing
        if self._acker.done():
            if slot.done() and not slot.cancelled():
                semaphore.release()
            await self._acker  # raises the failed batch's exception
            raise RuntimeError("acking stopped")

    async def close(self) -> None:
        """Wait until every submitted batch is done and acked (or re-raise what stopped the acking)."""
        if not self._acker.done():
            self._queue.put_nowait(None)
        await self._acker

    async def drain(self, timeout_s: float) -> int:
        """`close`, for at most `timeout_s`; then stop the work left and return how many events stayed
        un-acked (the group re-delivers them). Never raises: this is the way out."""
        with contextlib.suppress(Exception):
            await asyncio.wait_for(asyncio.shield(self.close()), timeout_s)
        self._acker.cancel()
        while not self._queue.empty():
            if (item := self._queue.get_nowait()) is not None:
                item[1].cancel()
        return self._pending

    async def _ack_in_order(self) -> None:
        while (item := await self._queue.get()) is not None:
            events, work, release = item
            await work
            for event in events:
                await self._ack(event)
            self._last_progress = self._clock()
            self._count(-len(events))
            release()
            self._taken.release()

    def _count(self, change: int) -> None:
        self._pending += change
        metrics.EVENTS_PENDING.set(self._pending)


def _report(task: asyncio.Task[None], on_failure: Callable[[BaseException], None]) -> None:
    if not task.cancelled() and (exc := task.exception()) is not None:
        on_failure(exc)
