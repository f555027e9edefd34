"""The explainer: FakeVLM's explanations, apart from the verdicts they explain.

The worker publishes an ExplainRequest with each verdict the policy wants explained, in the verdict's own batch,
so the request is on the broker before the upload's offset is committed. The explainer (`moderation explainer`,
a process and consumer group of its own, `<group>-explainer`) takes requests a batch at a time, fetches each
image again (its sha256 must still be the verdict's), asks the explain model (Triton's `fakevlm_explain`, with its
own queue, batching and timeout) and publishes an Explanation keyed by event_id; only then are the batch's offsets
committed. At least once: a killed explainer's batch is re-delivered and explained again (greedy decoding gives
the same text). Transient faults (S3 or the explain model unavailable) are retried with backoff until
MODERATION_EXPLAIN_DEADLINE_S; after that, or at once for a permanent fault, the request becomes an
`explanation_failed` dead letter with its bytes, which `moderation dlq replay` sends back here. A verdict is never
touched: it was published before its request.

A process of its own rather than an agent of the worker's Faust app: Faust hands every fetched record to its
stream and waits while that stream's buffer is full, so a slow explanation agent would hold up the uploads
agent's fetches too, which is what taking explanations apart is for.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import signal
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import numpy as np
from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from aiokafka.errors import CommitFailedError

from moderation.adapters.deadletters import dead_letter_headers
from moderation.adapters.kafka import aiokafka_options
from moderation.adapters.publisher import Record
from moderation.adapters.s3 import ImageStore
from moderation.errors import TRANSIENT, Reason, Rejected
from moderation.events import DeadLetter, ExplainRequest, Explanation, Verdict, parse_explain_request, utcnow
from moderation.model import imaging
from moderation.model.detectors import Detector
from moderation.model.frames import STILL, FrameLimits
from moderation.settings import Settings
from moderation.worker import metrics, tracing
from moderation.worker.budget import ByteBudget
from moderation.worker.clients import Clients
from moderation.worker.crashonly import crash
from moderation.worker.examine import examine
from moderation.worker.pipeline import Backoff, Incoming, checked_sha256, dead_letter

log = logging.getLogger(__name__)

GROUP_SUFFIX = "-explainer"


def explainer_group(settings: Settings) -> str:
    return f"{settings.kafka_consumer_group}{GROUP_SUFFIX}"


@dataclass
class Explainer:
    """One explain request in, one Explanation or dead letter out: no Kafka here, only the stores it needs."""

    settings: Settings
    store: ImageStore
    detector: Detector
    backoff: Backoff
    decode_pool: ThreadPoolExecutor | None = None
    decode_budget: ByteBudget | None = None
    clock: Callable[[], datetime] = utcnow

    async def answer(self, message: Incoming) -> Explanation | DeadLetter:
        """Retry transient faults until the deadline; never raises."""
        started, first_error, attempt = time.monotonic(), None, 0
        request: ExplainRequest | None = None
        while True:
            try:
                request = parse_explain_request(message.value)
                return await self._explain(request, started)
            except Exception as exc:  # a bug costs this request a dead letter, never the explainer
                failure = _as_rejected(exc, message)
            late = time.monotonic() - started >= self.settings.explain_deadline_s
            if failure.reason not in TRANSIENT or late:
                return self._dead_letter(message, request, failure, first_error)
            first_error = first_error or self.clock()
            attempt += 1
            metrics.RETRIES.labels(str(failure.reason)).inc()
            await asyncio.sleep(self.backoff.delay(attempt))

    async def _explain(self, request: ExplainRequest, started: float) -> Explanation:
        verdict = request.verdict
        data = await self.store.fetch(verdict.bucket, verdict.key)
        checked_sha256(data, verdict.image_sha256)  # the object was replaced since: its verdict is not about it
        crop = await self._crop(data, verdict.frame)
        detection = await self.detector.explain(crop)
        if detection.explanation is None:
            raise Rejected(Reason.INFERENCE_FAILED, "the explain model answered without an explanation")
        return Explanation(
            event_id=request.event_id,
            image_sha256=verdict.image_sha256,
            tenant=verdict.tenant,
            verdict_label=verdict.label,
            verdict_score=verdict.score,
            verdict_action=verdict.action,
            verdict_decided_at=verdict.decided_at,
            frame=verdict.frame,
            explanation=detection.explanation,
            answer_label=detection.answer_label,
            model=self.detector.explain_model,
            requested_at=request.requested_at,
            explained_at=self.clock(),
            explain_ms=round((time.monotonic() - started) * 1000, 3),
        )

    async def _crop(self, data: bytes, frame: int | None) -> np.ndarray:
        """The crop the verdict scored: of its frame, for an animated or multi-page image."""
        work = functools.partial(
            examine,
            data,
            self.settings.max_image_pixels,
            budget=self.decode_budget,
            fast=self.settings.fast_preprocess,
            formats=imaging.readable(self.settings.image_formats),
            hashing=False,
            frames=STILL if frame is None else FrameLimits(decodes=self.settings.max_frame_decodes, at=frame),
        )
        [judged] = (await asyncio.get_running_loop().run_in_executor(self.decode_pool, work)).frames
        return judged.pixels

    def _dead_letter(
        self, message: Incoming, request: ExplainRequest | None, failure: Rejected, first: datetime | None
    ) -> DeadLetter:
        why = failure if failure.reason == Reason.INVALID_EVENT else _explanation_failed(failure)
        event_id = request.event_id if request is not None else None
        letter = dead_letter(message, event_id, why, first, self.clock())
        # Replayed only when its own fault may pass (an outage, a bug): never a missing or replaced object.
        return letter if failure.retryable or not letter.retryable else letter.model_copy(update={"retryable": False})

    def records(self, outcome: Explanation | DeadLetter, message: Incoming) -> list[Record]:
        """An explanation to its topic, keyed by event_id; a dead letter as the worker's are (original key and
        headers plus why and whence)."""
        if isinstance(outcome, DeadLetter):
            key = message.key if message.key is not None else (outcome.event_id or "").encode() or None
            headers = dead_letter_headers(outcome, tracing.without_trace_headers(message.headers))
            return [Record(self.settings.topic_dlq, key, outcome.to_bytes(), headers)]
        traced = tracing.header_values(tracing.extracted(message.headers))  # the upload's trace goes on
        return [Record(self.settings.topic_explanations, outcome.event_id.encode(), outcome.to_bytes(), traced)]


def _as_rejected(exc: Exception, message: Incoming) -> Rejected:
    if isinstance(exc, Rejected):
        return exc
    log.error("unexpected error explaining", exc_info=exc, extra={"where": message.where})
    return Rejected(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")


def _explanation_failed(failure: Rejected) -> Rejected:
    """One reason for every request no explanation came of; the detail starts with the fault's own code."""
    return Rejected(Reason.EXPLANATION_FAILED, f"{failure.reason}: {failure.detail}")


def explained_verdict(request: ExplainRequest, explanation: Explanation) -> Verdict | None:
    """The verdict with its explanation, for the verdict cache: only when the verdict's own weights explained it,
    so the next upload of these bytes gets the text at once and no second generation."""
    verdict = request.verdict
    if explanation.model.weights is None or explanation.model.weights != verdict.model.weights:
        return None
    return verdict.model_copy(
        update={
            "explanation": explanation.explanation,
            "answer_label": explanation.answer_label,
            "explanation_requested": False,
            "cached": False,
        }
    )


@dataclass
class Running:
    """The explainer process: its consumer and clients, and what /live, /ready and /metrics read."""

    settings: Settings
    explainer: Explainer
    clients: Clients
    consumer: AIOKafkaConsumer
    busy_since: float | None = None
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def run(self, stopping: asyncio.Event) -> None:
        """Batches until `stopping` is set; a batch in hand is finished (the caller bounds how long)."""
        while not stopping.is_set():
            fetched = await self.consumer.getmany(timeout_ms=1000, max_records=self.settings.explain_batch_size)
            records = [r for part in fetched.values() for r in part]
            if records:
                await self.handle(records)
            await self._record_lag()

    async def handle(self, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        """Answer every request, publish every answer, then commit: a request is never committed unanswered."""
        self.busy_since = time.monotonic()
        metrics.EXPLANATIONS_PENDING.set(len(records))
        messages = [Incoming.of(r) for r in records]
        outcomes = await asyncio.gather(*(self.explainer.answer(m) for m in messages))
        await self.clients.publisher.publish(
            [r for o, m in zip(outcomes, messages, strict=True) for r in self.explainer.records(o, m)]
        )
        self._offer_to_cache(outcomes, messages)
        await self._commit(records)
        _count(outcomes)
        metrics.EXPLANATIONS_PENDING.set(0)
        self.busy_since = None

    def _offer_to_cache(self, outcomes: Sequence[Explanation | DeadLetter], messages: Sequence[Incoming]) -> None:
        if not self.settings.cache_max_entries:
            return
        verdicts = [
            explained_verdict(parse_explain_request(m.value), o)
            for o, m in zip(outcomes, messages, strict=True)
            if isinstance(o, Explanation)
        ]
        self.clients.cache_feed.offer(v for v in verdicts if v is not None)

    async def _commit(self, records: Sequence[ConsumerRecord[Any, Any]]) -> None:
        ends: dict[TopicPartition, int] = {}
        for r in records:
            tp = TopicPartition(r.topic, r.partition)
            ends[tp] = max(ends.get(tp, 0), r.offset + 1)
        try:
            await self.consumer.commit(ends)
        except CommitFailedError as exc:  # the group moved the partitions on: their new owner explains again
            log.warning("explanations published but not committed (%s): they may be explained twice", exc)

    async def _record_lag(self) -> None:
        for tp in self.consumer.assignment():
            highwater = self.consumer.highwater(tp)
            if highwater is not None:
                behind = highwater - await self.consumer.position(tp)
                metrics.CONSUMER_LAG.labels(tp.topic, str(tp.partition)).set(max(0, behind))

    def liveness(self) -> dict[str, bool]:
        stuck = self.busy_since is not None and time.monotonic() - self.busy_since > self.settings.ack_stall_s
        return {"explaining": not stuck}


def _count(outcomes: Sequence[Explanation | DeadLetter]) -> None:
    for outcome in outcomes:
        if isinstance(outcome, DeadLetter):
            metrics.EXPLANATIONS.labels("dead_letter", _fault(outcome)).inc()
            log.warning(
                "explanation dead letter %s: %s", outcome.reason, outcome.detail, extra={"event_id": outcome.event_id}
            )
            continue
        metrics.EXPLANATIONS.labels("explained", "").inc()
        waited = (outcome.explained_at - outcome.verdict_decided_at).total_seconds()
        metrics.EXPLANATION_LATENCY.observe(max(0.0, waited))


def _fault(letter: DeadLetter) -> str:
    """The fault's own reason code (the letter's detail starts with it), never free text in a metric label."""
    code = letter.detail.split(":", 1)[0] if letter.reason == Reason.EXPLANATION_FAILED else str(letter.reason)
    return code if code in Reason.__members__.values() else str(letter.reason)


def explain_consumer(settings: Settings) -> AIOKafkaConsumer:
    return AIOKafkaConsumer(
        settings.topic_explain_requests,
        group_id=explainer_group(settings),
        enable_auto_commit=False,
        auto_offset_reset="earliest",
        max_poll_interval_ms=int(settings.kafka_max_poll_interval_s * 1000),
        rebalance_timeout_ms=int(settings.kafka_rebalance_timeout_s * 1000),
        session_timeout_ms=int(settings.kafka_session_timeout_s * 1000),
        heartbeat_interval_ms=int(settings.kafka_heartbeat_interval_s * 1000),
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        **aiokafka_options(settings),
    )


async def serve(settings: Settings) -> None:
    """The explainer process until SIGTERM: a batch in hand gets MODERATION_SHUTDOWN_GRACE_S to be published and
    committed, else it is left to the group (explained again); anything unexpected ends the process."""
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    running = await _start(settings)
    try:
        work = asyncio.create_task(running.run(stopping), name="explainer")
        stop_wait = asyncio.create_task(stopping.wait())
        await asyncio.wait({work, stop_wait}, return_when=asyncio.FIRST_COMPLETED)
        if not work.done():
            done, _ = await asyncio.wait({work}, timeout=settings.shutdown_grace_s)
            if not done:
                work.cancel()
                log.warning("stopping: a batch was left uncommitted after the grace (the group re-delivers it)")
        stop_wait.cancel()
        if work.done() and not work.cancelled() and (exc := work.exception()) is not None:
            crash("the explainer failed", exc)
    finally:
        await _stop(running)


async def _start(settings: Settings) -> Running:
    clients = Clients(settings)
    explainer = Explainer(
        settings,
        clients.store,
        clients.detector,
        Backoff(deadline_s=settings.explain_deadline_s, cap_s=settings.retry_backoff_max_s),
        decode_pool=ThreadPoolExecutor(settings.decode_threads, thread_name_prefix="decode"),
        decode_budget=ByteBudget(settings.decode_budget_mib * 1024 * 1024),
    )
    running = Running(settings, explainer, clients, explain_consumer(settings))
    await clients.start()
    await running.consumer.start()
    if settings.metrics_port:
        server = metrics.HealthServer(settings.metrics_port, clients.explainer_readiness, live=running.liveness)
        await server.start()
        running.tasks.append(asyncio.create_task(_serve_until_cancelled(server), name="health"))
    log.info("explainer: group %s on %s", explainer_group(settings), settings.topic_explain_requests)
    return running


async def _serve_until_cancelled(server: metrics.HealthServer) -> None:
    try:
        await asyncio.Event().wait()
    finally:
        await server.stop()


async def _stop(running: Running) -> None:
    for task in running.tasks:
        task.cancel()
    await running.consumer.stop()
    await running.clients.stop()
    if running.explainer.decode_pool is not None:
        running.explainer.decode_pool.shutdown(wait=False, cancel_futures=True)
