"""Publish records to Kafka at once (a batch's outcomes, a reviewer's decision, a replayed letter, the demo's
uploads) and wait for the broker to acknowledge every one of them.

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
from aiokafka.structs import RecordMetadata

from moderation.adapters.kafka import aiokafka_options
from moderation.errors import ModerationError
from moderation.settings import Settings

log = logging.getLogger(__name__)

ATTEMPTS = 5
MAX_BATCH_BYTES = 1 << 20  # per partition and request: a batch of verdicts fits in one request


class PublishError(ModerationError):
    """The broker did not acknowledge a record after every attempt."""


@dataclass(frozen=True)
class Record:
    topic: str
    key: bytes | None
    value: bytes | None
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

    async def publish(self, records: Sequence[Record]) -> list[RecordMetadata]:
        """Every record acknowledged by the broker (acks=all) within the publish timeout, or PublishError;
        where the broker put each, in the order given."""
        timeout_s = self._settings.publish_timeout_s
        try:
            async with asyncio.timeout(timeout_s):
                return await self._publish(records)
        except TimeoutError as exc:
            raise PublishError(f"{len(records)} records not all acknowledged within {timeout_s:.0f} s") from exc

    async def _publish(self, records: Sequence[Record]) -> list[RecordMetadata]:
        acked: dict[int, RecordMetadata] = {}
        pending, attempt = list(enumerate(records)), 1
        while True:
            results = await asyncio.gather(*[await self._send(r) for _, r in pending], return_exceptions=True)
            failed = []
            for (index, record), result in zip(pending, results, strict=True):
                if isinstance(result, BaseException):
                    failed.append(((index, record), result))
                else:
                    acked[index] = result
            if not failed:
                return [acked[index] for index in range(len(records))]
            pending = [sent for sent, _ in failed]
            first = failed[0][1]
            if attempt == ATTEMPTS:
                raise PublishError(
                    f"{len(failed)} records to {pending[0][1].topic} not acknowledged: {first}"
                ) from first
            log.warning("%d records not acknowledged (%s); attempt %d of %d", len(failed), first, attempt + 1, ATTEMPTS)
            await asyncio.sleep(min(0.2 * 2**attempt, 5.0))
            attempt += 1

    async def _send(self, record: Record) -> asyncio.Future[RecordMetadata]:
        assert self._producer is not None, "start() first"
        try:
            future: asyncio.Future[RecordMetadata] = await self._producer.send(
                record.topic, key=record.key, value=record.value, headers=record.headers
            )
        except KafkaError as exc:  # refused before it was queued (buffer full, no metadata): a failed ack
            future = asyncio.get_running_loop().create_future()
            future.set_exception(exc)
        return future
