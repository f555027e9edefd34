"""The worker, assembled in this one place, and its Faust topology, top to bottom: uploads -> moderate a
batch -> verdicts / flagged / dead letters.

`create_app` declares the topics and the agent; `start` opens the clients (`moderation.worker.clients`) and
builds the pipeline with its policy, cache and decode pool; `moderate_and_publish` is one batch's step;
`moderation.worker.routing` says where each outcome goes, by the policy that decided it.

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
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, cast

import faust
from faust.types import TP, EventT
from PIL import Image

from moderation.events import DeadLetter, utcnow
from moderation.model import imaging
from moderation.model.frames import FrameLimits
from moderation.settings import Settings
from moderation.worker import cache, metrics, neardup, provenance, routing, tracing
from moderation.worker.acks import OrderedAcks
from moderation.worker.banking import bank_record, hashes_of, letter_record, parse_decision
from moderation.worker.budget import ByteBudget, return_large_frees
from moderation.worker.clients import Clients
from moderation.worker.crashonly import crash
from moderation.worker.pipeline import Backoff, Incoming, Pipeline
from moderation.worker.policies import Policies
from moderation.worker.transport import faust_credentials, faust_transport

log = logging.getLogger(__name__)

Header = tuple[str, bytes | None]

LOOP_LAG_PROBE_S = 0.05  # how often the loop-lag probe wakes: a stall is measured to within this


def create_app(settings: Settings) -> faust.App:
    app = faust.App(settings.kafka_consumer_group, **faust_options(settings))
    app.transport = transport = faust_transport(settings, app)
    if settings.fast_preprocess:
        imaging.require_fast_path()
    clients = Clients(settings)
    policies = Policies.load(settings)  # an invalid policy file stops the worker here, before it consumes
    running: list[Running] = []  # once the agent started the worker: readiness reads it
    acking: list[OrderedAcks] = []  # the agent's, once it runs: /live reads it

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
    review, decisions = topic(settings.topic_review), topic(settings.topic_decisions)
    cache_topic, bank = topic(settings.topic_cache, compacting=True), topic(settings.topic_bank, compacting=True)
    explain_requests, explanations = topic(settings.topic_explain_requests), topic(settings.topic_explanations)
    started = asyncio.Event()  # the clients are open: the uploads agent opens them

    @app.agent(uploads, concurrency=1)
    async def moderate_uploads(stream: faust.StreamT[bytes]) -> None:
        try:
            await moderate(stream)
        except asyncio.CancelledError:
            raise  # the worker is stopping: `moderate` drained what it could
        except BaseException as exc:  # never Faust's in-process restart on the same stream
            crash("the uploads agent failed", exc)

    async def moderate(stream: faust.StreamT[bytes]) -> None:
        # faust-streaming types noack_take as yielding values; it yields the events, acked by OrderedAcks.
        batches: AsyncIterator[list[EventT]] = cast(Any, stream).noack_take(
            settings.batch_size, within=settings.batch_wait_s
        )
        for output in (
            (verdicts, flagged, dead_letters, review, cache_topic, bank, explain_requests, explanations)
            if settings.kafka_declare_topics
            else ()
        ):
            await output.maybe_declare()
        worker = await start(settings, clients, policies)
        running.append(worker)
        started.set()
        in_flight = OrderedAcks(
            stream.ack, settings.max_inflight_batches, on_failure=lambda exc: crash("outcomes not published", exc)
        )
        acking.append(in_flight)

        async def handle(events: list[EventT], moderated: Callable[[], None]) -> None:
            await moderate_and_publish(settings, worker, clients, [incoming(event) for event in events], moderated)

        try:
            async for events in batches:
                metrics.EVENTS_IN.inc(len(events))
                metrics.BATCH_SIZE.observe(len(events))
                await in_flight.submit(events, functools.partial(handle, events))
                record_lag(app, events)
        except asyncio.CancelledError:
            left = await in_flight.drain(transport.shutdown.left())
            log.log(
                logging.WARNING if left else logging.INFO,
                "stopping: %d events left un-acked after the %.0f s grace (the group re-delivers them)",
                left,
                settings.shutdown_grace_s,
            )
            await worker.stop()
            await clients.stop()
            raise

    @app.agent(decisions, concurrency=1)
    async def bank_decisions(stream: faust.StreamT[bytes]) -> None:
        """Each reviewer decision becomes its image's bank entry, published before the decision is acked."""
        try:
            await started.wait()
            async for event in stream.events():
                message = incoming(event)
                decision = parse_decision(message, utcnow())
                if isinstance(decision, DeadLetter):
                    await clients.publisher.publish([letter_record(settings, decision, message)])
                    continue
                hashes = await hashes_of(decision, clients.store, _decoded_for(settings))
                if (out := bank_record(settings, decision, hashes)) is not None:
                    await clients.publisher.publish([out])
                    metrics.DECISIONS_BANKED.labels(decision.decision).inc()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:
            crash("the decisions agent failed", exc)

    @app.on_partitions_revoked.connect  # type: ignore[arg-type]  # faust's signal typing wants a `signal` kwarg
    async def forget_lag(sender: Any, revoked: set[TP], **_: Any) -> None:
        # A partition another worker now owns must not keep reporting this worker's last lag.
        for tp in revoked:
            with contextlib.suppress(KeyError):
                metrics.CONSUMER_LAG.remove(tp.topic, str(tp.partition))

    async def readiness() -> dict[str, bool]:
        return await clients.readiness() if running else {"started": False}

    def liveness() -> dict[str, bool]:
        return {"acking": not any(a.stalled(settings.ack_stall_s) for a in acking)}

    if settings.metrics_port:

        @app.task
        async def serve_metrics_and_health() -> None:
            server = metrics.HealthServer(settings.metrics_port, readiness, live=liveness)
            await server.start()
            try:
                await asyncio.Event().wait()  # until the worker stops and cancels this task
            finally:
                await server.stop()

    return app


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
    worker.tasks.append(_supervised(policies.watch(s.policy_reload_s), "policy-reload"))
    # Start-up's objects (some 240,000, torch's and botocore's) live as long as the worker: out of the
    # collector's reach, a full collection no longer walks them and stalls the loop 130 ms.
    gc.collect()
    gc.freeze()
    # From here on: start-up's own stalls (botocore loading its models on the loop, torch's import holding
    # the GIL in a decode thread) come before the first event and are not counted.
    worker.tasks.append(asyncio.create_task(metrics.watch_loop_lag(LOOP_LAG_PROBE_S), name="loop-lag-probe"))
    return worker


def _decoded_for(settings: Settings) -> Callable[[bytes], Image.Image]:
    """Decode an image under the worker's own limits (formats, pixel cap, structure budgets)."""
    formats = imaging.readable(settings.image_formats)
    return lambda data: imaging.decode(data, max_pixels=settings.max_image_pixels, formats=formats).image


def _supervised(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """A background task whose unexpected failure ends the worker (crash-only), as a failing agent would."""

    def done(task: asyncio.Task[None]) -> None:
        if not task.cancelled() and (exc := task.exception()) is not None:
            crash(f"the {name} task failed", exc)

    task = asyncio.create_task(work, name=name)
    task.add_done_callback(done)
    return task


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
