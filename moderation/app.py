"""The Faust topology, top to bottom: uploads -> moderate a batch -> verdicts / flagged / dead letters.

Offsets: the agent takes batches without acking (`noack_take`) and acks an event only after the
broker acknowledged every outcome published for it, so a committed offset always means a delivered
outcome. Up to MODERATION_MAX_INFLIGHT_BATCHES batches are moderated and published at once (while one
waits on S3, Triton or the broker, the next is already fetched), but acks go out strictly in the
order the batches were taken: faust-streaming commits the highest run of consecutive acked offsets
and misses a gap of one right after its last commit (`Consumer._new_offset`; faust-streaming issue
606), so an out-of-order ack could commit past an event whose outcome was never published. For the
same reason agent concurrency stays 1.

Outcomes go out through the worker's own aiokafka producer (`moderation.publisher`), a batch at a time;
the output topics are still declared here, through Faust, when the agent starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, cast

import faust
from faust.types import TP, EventT

from moderation import metrics
from moderation.dlq import attempts_from
from moderation.events import DeadLetter
from moderation.kafka import faust_credentials, faust_transport
from moderation.pipeline import Incoming, Outcome
from moderation.publisher import Record
from moderation.resources import Resources
from moderation.settings import Settings

log = logging.getLogger(__name__)


def create_app(settings: Settings) -> faust.App:
    app = faust.App(settings.kafka_consumer_group, **faust_options(settings))
    app.transport = faust_transport(settings, app)
    resources = Resources(settings)

    def topic(name: str, *, compacting: bool | None = None) -> faust.TopicT:
        return app.topic(
            name,
            key_type=bytes,
            value_type=bytes,
            partitions=settings.kafka_topic_partitions,
            replicas=settings.kafka_replication_factor,
            config={"min.insync.replicas": str(settings.kafka_min_insync_replicas)},
            compacting=compacting,
        )

    uploads, verdicts = topic(settings.topic_uploads), topic(settings.topic_verdicts)
    flagged, dead_letters = topic(settings.topic_flagged), topic(settings.topic_dlq)
    cache_topic = topic(settings.topic_cache, compacting=True)

    def records(outcome: Outcome) -> list[Record]:
        """Where one outcome goes: every verdict to verdicts (and flagged), a dead letter to the dlq. Cache
        entries are not among them: they go out best effort (`CacheFeed`), never holding up an ack."""
        key, value = outcome.event_id.encode() if outcome.event_id else None, outcome.to_bytes()
        if isinstance(outcome, DeadLetter):
            return [Record(settings.topic_dlq, key, value)]
        out = [Record(settings.topic_verdicts, key, value)]
        if outcome.action == "flag":
            out.append(Record(settings.topic_flagged, key, value))
        return out

    @app.agent(uploads, concurrency=1)
    async def moderate_uploads(stream: faust.StreamT[bytes]) -> None:
        # faust-streaming types noack_take as yielding values; it yields the events, acked by OrderedAcks.
        batches: AsyncIterator[list[EventT]] = cast(Any, stream).noack_take(
            settings.batch_size, within=settings.batch_wait_s
        )
        for output in (verdicts, flagged, dead_letters, cache_topic) if settings.kafka_declare_topics else ():
            await output.maybe_declare()
        pipeline = await resources.start()
        in_flight = OrderedAcks(stream.ack, settings.max_inflight_batches)
        sharing = resources.cache is not None  # a worker with the cache off neither reads nor feeds its topic

        async def moderate_and_publish(events: list[EventT]) -> None:
            outcomes = await pipeline.moderate_batch([incoming(event) for event in events])
            if sharing:
                resources.cache_feed.offer(outcomes)
            await resources.publisher.publish([r for outcome in outcomes for r in records(outcome)])
            metrics.record(outcomes)

        try:
            async for events in batches:
                metrics.EVENTS_IN.inc(len(events))
                metrics.BATCH_SIZE.observe(len(events))
                await in_flight.submit(events, functools.partial(moderate_and_publish, events))
                record_lag(app, events)
        finally:
            await in_flight.close()  # every batch taken is published and acked before the clients close
            await resources.stop()

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # faust's signal typing wants a `signal` kwarg
    async def forget_lag(sender: Any, revoked: set[TP], **_: Any) -> None:
        # A partition another worker now owns must not keep reporting this worker's last lag.
        for tp in revoked:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))

    if settings.metrics_port:

        @app.task
        async def serve_metrics_and_health() -> None:
            server = metrics.HealthServer(settings.metrics_port, resources.readiness)
            await server.start()
            try:
                await asyncio.Event().wait()  # until the worker stops and cancels this task
            finally:
                await server.stop()

    return app


class OrderedAcks:
    """Batches in flight, each acked once its work is done and every batch taken before it is acked.

    `submit` waits while `limit` batches are in flight (the backpressure) and raises what stopped the
    acking: a batch whose outcomes could not be published leaves it and every later batch un-acked.
    """

    def __init__(self, ack: Callable[[EventT], Awaitable[Any]], limit: int) -> None:
        self._ack = ack
        self._slots = asyncio.Semaphore(limit)
        self._queue: asyncio.Queue[tuple[list[EventT], asyncio.Future[None]] | None] = asyncio.Queue()
        self._acker = asyncio.create_task(self._ack_in_order(), name="ordered-acks")

    async def submit(self, events: list[EventT], start: Callable[[], Awaitable[None]]) -> None:
        """Wait for a free slot, then run `start()` for `events` in the background."""
        slot = asyncio.ensure_future(self._slots.acquire())
        try:
            await asyncio.wait({slot, self._acker}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            slot.cancel()  # a no-op once acquired; on cancellation, no slot is taken later for nothing
        if self._acker.done():
            await self._acker  # raises the failed batch's exception
            raise RuntimeError("acking stopped")
        self._queue.put_nowait((events, asyncio.ensure_future(start())))

    async def close(self) -> None:
        """Wait until every submitted batch is done and acked (or re-raise what stopped the acking)."""
        if not self._acker.done():
            self._queue.put_nowait(None)
        await self._acker

    async def _ack_in_order(self) -> None:
        while (item := await self._queue.get()) is not None:
            events, work = item
            await work
            for event in events:
                await self._ack(event)
            self._slots.release()


def record_lag(app: faust.App, events: list[EventT]) -> None:
    """Lag per partition after a batch: the partition's high watermark minus the next offset to process."""
    last: dict[tuple[str, int], int] = {}
    for event in events:
        last[(event.message.topic, event.message.partition)] = event.message.offset
    for (topic, partition), offset in last.items():
        try:
            highwater = app.consumer.highwater(TP(topic, partition))
        except Exception:  # noqa: S112 - not known before the first fetch response: skip this round
            continue
        if highwater is not None:
            metrics.CONSUMER_LAG.labels(topic, str(partition)).set(max(0, highwater - offset - 1))


def incoming(event: EventT) -> Incoming:
    message = event.message
    return Incoming(
        value=event.value,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        earlier_attempts=attempts_from(message.headers),
    )


def faust_options(settings: Settings) -> dict[str, Any]:
    return {
        "broker": [f"kafka://{server.strip()}" for server in settings.kafka_bootstrap_servers.split(",")],
        "broker_credentials": faust_credentials(settings),
        "key_serializer": "raw",
        "value_serializer": "raw",
        "store": "memory://",
        "web_enabled": False,
        "datadir": str(settings.data_dir),
        "producer_acks": -1,
        "consumer_auto_offset_reset": "earliest",
        "topic_partitions": settings.kafka_topic_partitions,
        "topic_replication_factor": settings.kafka_replication_factor,
        "topic_disable_leader": True,  # no on_leader tasks: no `<group>-__assignor-__leader` topic to create
        "broker_rebalance_timeout": settings.kafka_rebalance_timeout_s,
        "broker_session_timeout": settings.kafka_session_timeout_s,
        "broker_heartbeat_interval": settings.kafka_heartbeat_interval_s,
        "broker_max_poll_interval": settings.kafka_max_poll_interval_s,
        "broker_commit_interval": 1.0,
        "stream_buffer_maxsize": max(4 * settings.batch_size, 64),
    }
