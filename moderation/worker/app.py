"""The worker, assembled in this one place, and its Faust topology, top to bottom: uploads -> moderate a
batch -> verdicts / flagged / dead letters.

`create_app` wires the topics, the two agents and the health server; `Agents` is what the agents do. The
uploads agent runs `start` (the clients of `moderation.worker.clients`, the pipeline with its policy, cache
and decode pool) and then `moderate_and_publish`, one batch's step, where `moderation.worker.routing` says
where each outcome goes, by the policy that decided it. The decisions agent hands each reviewer's decision
to `moderation.worker.banking`.

Offsets: the agent takes batches without acking (`noack_take`) and acks an event only after the
broker acknowledged every outcome published for it, so a committed offset always means a delivered
outcome. Up to MODERATION_MAX_INFLIGHT_BATCHES batches are moderated at once (while one waits on S3 or
Triton, the next is already fetched), and a batch whose images are judged gives its slot to the next while
it waits for the broker (at most twice as many batches taken and not acked), but acks go out strictly in
the order the batches were taken (`moderation.worker.acks`). For the same reason agent concurrency stays 1.

Crash-only: anything that escapes a batch (a bug, outcomes the broker would not take after every retry)
ends the process (`moderation.worker.crashonly`); on SIGTERM the batches in flight get MODERATION_SHUTDOWN_GRACE_S
to be published and acked, and whatever is left un-acked is re-delivered to the group.

Outcomes go out through the worker's own aiokafka producer (`moderation.adapters.publisher`), a batch at a time;
the output topics are still declared here, through Faust, when the agent starts.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import gc
import logging
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import faust
from faust.types import TP, EventT

from moderation.model import imaging
from moderation.model.frames import FrameLimits
from moderation.settings import Settings
from moderation.worker import cache, metrics, neardup, provenance, routing, tracing
from moderation.worker.acks import OrderedAcks
from moderation.worker.banking import DecisionBanker
from moderation.worker.budget import ByteBudget, return_large_frees
from moderation.worker.clients import Clients
from moderation.worker.crashonly import crash, crash_only, supervised
from moderation.worker.pipeline import Backoff, Incoming, Pipeline
from moderation.worker.policies import Policies
from moderation.worker.transport import faust_credentials, faust_transport

log = logging.getLogger(__name__)

LOOP_LAG_PROBE_S = 0.05  # how often the loop-lag probe wakes: a stall is measured to within this


def create_app(settings: Settings) -> faust.App:
    """The worker's topology: its topics, the uploads and decisions agents, and the health server."""
    app = faust.App(settings.kafka_consumer_group, **faust_options(settings))
    app.transport = transport = faust_transport(settings, app)
    if settings.fast_preprocess:
        imaging.require_fast_path()
    topics = Topics.of(app, settings)
    agents = Agents(settings, app, transport.shutdown.left, Policies.load(settings))  # a bad policy file stops it

    @app.agent(topics.uploads, concurrency=1)
    async def moderate_uploads(stream: faust.StreamT[bytes]) -> None:
        await crash_only(agents.moderate_uploads(stream, topics.outputs), "the uploads agent failed")

    @app.agent(topics.decisions, concurrency=1)
    async def bank_decisions(stream: faust.StreamT[bytes]) -> None:
        await crash_only(agents.bank_decisions(stream), "the decisions agent failed")

    app.on_partitions_revoked.connect(forget_lag)  # type: ignore[arg-type]  # faust's typing wants a `signal` kwarg

    if settings.metrics_port:

        @app.task
        async def serve_metrics_and_health() -> None:
            await serve_health(metrics.HealthServer(settings.metrics_port, agents.readiness, live=agents.liveness))

    return app


@dataclass(frozen=True)
class Topics:
    """The worker's topics, raw bytes both ways: the two its agents consume, and those it publishes to, which
    the uploads agent declares as it starts (MODERATION_KAFKA_DECLARE_TOPICS)."""

    uploads: faust.TopicT
    decisions: faust.TopicT
    outputs: tuple[faust.TopicT, ...]

    @classmethod
    def of(cls, app: faust.App, settings: Settings) -> Topics:
        s = settings
        outputs = [_topic(app, s, name) for name in (s.topic_verdicts, s.topic_flagged, s.topic_dlq, s.topic_review)]
        outputs += [_topic(app, s, name, compacting=True) for name in (s.topic_cache, s.topic_bank)]
        outputs += [_topic(app, s, name) for name in (s.topic_explain_requests, s.topic_explanations)]
        return cls(_topic(app, s, s.topic_uploads), _topic(app, s, s.topic_decisions), tuple(outputs))


def _topic(app: faust.App, settings: Settings, name: str, *, compacting: bool | None = None) -> faust.TopicT:
    return app.topic(
        name,
        key_type=bytes,
        value_type=bytes,
        partitions=settings.kafka_topic_partitions,
        replicas=settings.kafka_replication_factor,
        config={"min.insync.replicas": str(settings.kafka_min_insync_replicas)},
        compacting=compacting,
    )


class Agents:
    """What the worker's two agents do, and what they share. The uploads agent opens the clients and starts the
    pipeline, then moderates batch after batch, each acked in order once its outcomes are published; the
    decisions agent waits for the clients, then banks each reviewer's decision (`DecisionBanker`). Readiness
    and liveness read how the uploads agent is doing."""

    def __init__(self, settings: Settings, app: faust.App, grace_left: Callable[[], float], policies: Policies) -> None:
        self.settings, self.app, self.policies = settings, app, policies
        self.grace_left = grace_left  # seconds of MODERATION_SHUTDOWN_GRACE_S left, once the shutdown began
        self.clients = Clients(settings)
        self.banker = DecisionBanker(settings, self.clients.store, self.clients.publisher)
        self.started = asyncio.Event()  # the clients are open and the pipeline is built
        self.running: Running | None = None
        self.acks: OrderedAcks | None = None

    async def moderate_uploads(self, stream: faust.StreamT[bytes], outputs: Sequence[faust.TopicT]) -> None:
        s = self.settings
        # faust-streaming types noack_take as yielding values; it yields the events, acked by OrderedAcks.
        batches: AsyncIterator[list[EventT]] = cast(Any, stream).noack_take(s.batch_size, within=s.batch_wait_s)
        for output in outputs if s.kafka_declare_topics else ():
            await output.maybe_declare()
        self.running = worker = await start(s, self.clients, self.policies)
        self.started.set()
        self.acks = in_flight = OrderedAcks(stream.ack, s.max_inflight_batches, on_failure=_unpublished)
        try:
            async for events in batches:
                metrics.EVENTS_IN.inc(len(events))
                metrics.BATCH_SIZE.observe(len(events))
                await in_flight.submit(events, functools.partial(self._moderate, worker, events))
                record_lag(self.app, events)
        except asyncio.CancelledError:
            left = await in_flight.drain(self.grace_left())
            log.log(
                logging.WARNING if left else logging.INFO,
                "stopping: %d events left un-acked after the %.0f s grace (the group re-delivers them)",
                left,
                s.shutdown_grace_s,
            )
            await worker.stop()
            await self.clients.stop()
            raise

    async def _moderate(self, worker: Running, events: list[EventT], moderated: Callable[[], None]) -> None:
        messages = [incoming(event) for event in events]
        await moderate_and_publish(self.settings, worker, self.clients, messages, moderated)

    async def bank_decisions(self, stream: faust.StreamT[bytes]) -> None:
        """Each reviewer decision becomes its image's bank entry, published before the decision is acked."""
        await self.started.wait()
        async for event in stream.events():
            await self.banker.take(incoming(event))

    async def readiness(self) -> dict[str, bool]:
        return await self.clients.readiness() if self.running is not None else {"started": False}

    def liveness(self) -> dict[str, bool]:
        return {"acking": self.acks is None or not self.acks.stalled(self.settings.ack_stall_s)}


def _unpublished(exc: BaseException) -> None:
    crash("outcomes not published", exc)


async def serve_health(server: metrics.HealthServer) -> None:
    """/metrics, /live and /ready until the worker stops and cancels the task."""
    await server.start()
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


async def forget_lag(sender: Any, revoked: set[TP], **_: Any) -> None:
    """A partition another worker now owns must not keep reporting this worker's last lag."""
    for tp in revoked:
        with contextlib.suppress(KeyError):
            metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))


async def moderate_and_publish(
    settings: Settings,
    worker: Running,
    clients: Clients,
    messages: list[Incoming],
    moderated: Callable[[], None] = lambda: None,
) -> None:
    """One batch: moderate it, offer its verdicts to the cache topic, publish its outcomes (each event traced).
    `moderated()` once its images are judged and let go: the next batch may start while this one publishes."""
    with tracing.processing(messages) as contexts:
        traced = [dataclasses.replace(m, trace=c) for m, c in zip(messages, contexts, strict=True)]
        judged = await worker.pipeline.judge_batch(traced)
        moderated()
        outcomes = [j.outcome for j in judged]
        tracing.record_outcomes(contexts, outcomes)
        if worker.pipeline.cache is not None:  # a worker with the cache off neither reads nor feeds its topic
            clients.cache_feed.offer(outcomes)
        with tracing.publishing(contexts):
            await clients.publisher.publish(
                [r for j, m in zip(judged, traced, strict=True) for r in routing.records(settings, j, m)]
            )
    metrics.record(outcomes)


@dataclass
class Running:
    """What runs beside the agent once the worker started: the pipeline and its decode threads, the verdict
    cache's reader and the event-loop probe."""

    pipeline: Pipeline
    decode_pool: ThreadPoolExecutor
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def stop(self) -> None:
        for task in self.tasks:
            task.cancel()
        self.decode_pool.shutdown(wait=False, cancel_futures=True)  # idle: every batch is done


async def start(settings: Settings, clients: Clients, policies: Policies) -> Running:
    """Open the clients, build the pipeline, warm what needs warming; the verdict cache and the bank of known
    images are read to their ends; the policy file is watched for edits."""
    s = settings
    provenance.use_trust_anchors(provenance.trust_anchors(s.c2pa_trust_anchors) if s.c2pa_trust_anchors else None)
    if not return_large_frees():
        log.warning("not glibc: freed pixel buffers may stay resident beyond the decode budget")
    decode_pool = ThreadPoolExecutor(s.decode_threads, thread_name_prefix="decode")
    verdicts = cache.VerdictCache(s.cache_max_entries, s.cache_ttl_s, max_skew_s=s.cache_clock_skew_s)
    pipeline = Pipeline(
        clients.store,
        clients.detector,
        policies,
        s.max_image_pixels,
        Backoff(deadline_s=s.event_deadline_s, cap_s=s.retry_backoff_max_s),
        cache=verdicts if s.cache_max_entries else None,
        bank=neardup.HashBank(),
        trust_event_sha256=s.cache_trust_event_sha256,
        fast_preprocess=s.fast_preprocess,
        image_formats=imaging.readable(s.image_formats),
        decode_pool=decode_pool,
        decode_budget=ByteBudget(s.decode_budget_mib * 1024 * 1024),
        frame_caps=FrameLimits(judged=s.max_frames, decodes=s.max_frame_decodes),
    )
    worker = Running(pipeline, decode_pool)
    await clients.start()
    if s.fast_preprocess:
        await asyncio.get_running_loop().run_in_executor(decode_pool, imaging.warm_up)
    if pipeline.cache is not None:
        worker.tasks.append(await cache.load(pipeline.cache, s, clients.partitions))
    assert pipeline.bank is not None
    worker.tasks.append(await neardup.load(pipeline.bank, s, clients.partitions))
    worker.tasks.append(supervised(policies.watch(s.policy_reload_s), "policy-reload"))
    # Start-up's objects (some 240,000, torch's and botocore's) live as long as the worker: out of the
    # collector's reach, a full collection no longer walks them and stalls the loop 130 ms.
    gc.collect()
    gc.freeze()
    # From here on: start-up's own stalls (botocore loading its models on the loop, torch's import holding
    # the GIL in a decode thread) come before the first event and are not counted.
    worker.tasks.append(asyncio.create_task(metrics.watch_loop_lag(LOOP_LAG_PROBE_S), name="loop-lag-probe"))
    return worker


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
    """The record as the broker gave it: reading its content (even its headers) is the pipeline's job,
    where a bad record becomes a dead letter."""
    message = event.message
    headers = message.headers
    return Incoming(
        value=event.value,
        topic=message.topic,
        partition=message.partition,
        offset=message.offset,
        key=message.key,
        headers=tuple(headers.items()) if isinstance(headers, Mapping) else tuple(headers or ()),
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
        # Faust pauses fetching while its buffer is full and resumes a fetch round trip later: the buffer holds
        # two full windows of taken batches (upload events are a few hundred bytes), so that the agent never
        # waits for it (bench/pipeline.py: 375-425 events/s with 4 batches buffered, 448-451 with 16).
        "stream_buffer_maxsize": max(4 * settings.max_inflight_batches * settings.batch_size, 64),
    }
