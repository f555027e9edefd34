"""Publish a batch's outcomes to Kafka at once and wait for the broker to acknowledge every one of them.

One aiokafka producer per worker (acks=all). A batch is enqueued whole, so the producer packs it into a
few requests, and only the acks are awaited: no task per record. Records the broker did not acknowledge
are sent again with backoff, within MODERATION_PUBLISH_TIMEOUT_S in all; after that `PublishError` leaves
the batch un-acked in the stream, so its offsets are never committed and another worker (or this one,
restarted: the worker exits on it) redoes it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from dataclasses import dataclass

from aiokafka import AIOKafkaProducer
from aiokafka.errors import KafkaError

from moderation.errors import ModerationError
from moderation.settings import Settings
from moderation.worker.kafka import aiokafka_options

log = logging.getLogger(__name__)

ATTEMPTS = 5
MAX_BATCH_BYTES = 1 << 20  # per partition and request: a batch of verdicts fits in one request


class PublishError(ModerationError):
    """The broker did not acknowledge a record after every attempt."""


@dataclass(frozen=True)
class Record:
    topic: str
    key: bytes | None
    value: bytes
    headers: list[tuple[str, bytes | None]] | None = None


class Publisher:
    def __init__(self, settings: Settings) -> None:
        self._settings = settings
        self._producer: AIOKafkaProducer | None = None  # aiokafka objects must be made inside the event loop

    async def start(self) -> None:
        self._producer = AIOKafkaProducer(
            acks="all", max_batch_size=MAX_BATCH_BYTES, **aiokafka_options(self._settings)
        )
        await self._producer.start()

    async def stop(self) -> None:
        if self._producer is not None:
            await self._producer.stop()

    async def publish(self, records: Sequence[Record]) -> None:
        """Every record acknowledged by the broker (acks=all) within the publish timeout, or PublishError."""
        timeout_s = self._settings.publish_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                await self._publish(records)
        except TimeoutError as exc:
            raise PublishError(f"{len(records)} records not all acknowledged within {timeout_s:.0f} s") from exc

    async def _publish(self, records: Sequence[Record]) -> None:
        pending = list(records)
        for attempt in range(1, ATTEMPTS + 1):
            results = await asyncio.gather(*[await self._send(r) for r in pending], return_exceptions=True)
            failed = [(r, e) for r, e in zip(pending, results, strict=True) if isinstance(e, BaseException)]
            if not failed:
                return
            pending = [r for r, _ in failed]
            first = failed[0][1]
            if attempt == ATTEMPTS:
                raise PublishError(f"{len(failed)} records to {pending[0].topic} not acknowledged: {first}") from first
            log.warning("%d records not acknowledged (%s); attempt %d of %d", len(failed), first, attempt + 1, ATTEMPTS)
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))

    async def _send(self, record: Record) -> asyncio.Future[object]:
        assert self._producer is not None, "start() first"
        try:
            future: asyncio.Future[object] = await self._producer.send(
                record.topic, key=record.key, value=record.value, headers=record.headers
            )
        except KafkaError as exc:  # refused before it was queued (buffer full, no metadata): a failed ack
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        return future
