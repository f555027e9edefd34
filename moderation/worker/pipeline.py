"""Moderate a batch of raw upload messages: pure orchestration over narrow interfaces, no Faust, no boto.

Every message yields exactly one outcome, a Verdict or a DeadLetter; nothing here raises, so one
bad upload can never take the batch, or the worker, down with it. Here is the I/O of each upload (fetch,
examine, the cache, the bank's lookups, the detector); what its verdict says is the worker's choice
(`labelling.choose`), made once per upload from what that I/O found.
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import logging
import random
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING

from opentelemetry.trace import SpanKind

from moderation.adapters.deadletters import attempts_from
from moderation.adapters.kafka import Received
from moderation.adapters.s3 import ImageStore
from moderation.errors import TRANSIENT, Reason, Rejected
from moderation.events import (
    CacheEntry,
    DeadLetter,
    ImageInfo,
    Provenance,
    Timings,
    UploadEvent,
    Verdict,
    event_id_of,
    parse_upload,
    utcnow,
)
from moderation.model.detectors import Detector
from moderation.model.frames import CAPS, FrameLimits, animated, plan
from moderation.model.imaging import CROP_SIZE, DEFAULT_FORMATS, Header, read_header
from moderation.policy import Policy
from moderation.worker import labelling, metrics, tracing
from moderation.worker.budget import ByteBudget
from moderation.worker.cache import VerdictCache
from moderation.worker.examine import Examined, examine, examine_header
from moderation.worker.neardup import HashBank
from moderation.worker.policies import Policies

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = logging.getLogger(__name__)

Outcome = Verdict | DeadLetter


@dataclass(frozen=True)
class Judged:
    """An outcome and the tenant policy that decided it (None for a dead letter): what is routed and banked
    follows this very policy, never one reloaded since (its version is the verdict's `policy_version`)."""

    outcome: Outcome
    policy: Policy | None = None


# Images no larger than FakeVLM's own 336x336 input are prepared on the event loop: a 336x336 JPEG costs
# ~0.8 ms there (libjpeg-turbo, PDQ, provenance), less than handing it to a thread, whose wake-ups and GIL
# waits (Faust's consumer thread and the decode threads all want it) cost the loop more than the work: with
# the decode threads bench/pipeline.py gave 351 events/s (ratio 0.41, 0.42), on the loop 386-405 (0.44-0.48),
# other sessions paused (2026-12-07). Larger images go to the decode threads, where Pillow, libjpeg-turbo
# and numpy run without the GIL beside the loop. Only objects up to INLINE_MAX_BYTES have their header read
# on the loop, as reading it costs at most a walk of that many bytes within imaging's structure budget;
# every other object, header included, goes to the decode threads.
INLINE_MAX_PIXELS = CROP_SIZE * CROP_SIZE
INLINE_MAX_BYTES = 64 * 1024
# base64 makes this 683 KiB: with the other fields a dead letter stays under Kafka's default 1 MB message cap.
MAX_DEAD_LETTER_PAYLOAD = 512 * 1024


@dataclass(frozen=True)
class Incoming(Received):
    """One record from the uploads topic as the broker gave it, nothing parsed or trusted yet, and the event's
    own span (`tracing.processing`; None: untraced)."""

    trace: Context | None = None

    def earlier_attempts(self) -> int:
        """Deliveries before this one, from the ATTEMPTS_HEADER a replay sets; 0 when absent or unreadable
        (`attempts_from` never raises, whatever a client put in the header)."""
        return attempts_from(self.headers)


@dataclass(frozen=True)
class Backoff:
    """Bounded exponential backoff with full jitter, and the deadline after which a transient fault
    becomes a (retryable) dead letter."""

    deadline_s: float = 600.0
    base_s: float = 0.5
    cap_s: float = 30.0

    def delay(self, attempt: int) -> float:
        return random.uniform(0, min(self.cap_s, self.base_s * 2**attempt))  # noqa: S311 - jitter, not crypto


@dataclass(frozen=True)
class Pipeline:
    store: ImageStore
    detector: Detector
    policies: Policies
    max_image_pixels: int
    backoff: Backoff = Backoff()
    cache: VerdictCache | None = None
    bank: HashBank | None = None  # known images: reviewers' decisions (and, by policy, flags) by sha256 and PDQ
    trust_event_sha256: bool = False  # a cache hit on the event's own sha256 skips the S3 GET
    fast_preprocess: bool = False
    clock: Callable[[], datetime] = utcnow
    image_formats: tuple[str, ...] = DEFAULT_FORMATS
    decode_pool: Executor | None = None  # the worker's bounded pool; None: asyncio's default (tests, tools)
    decode_budget: ByteBudget | None = None  # bytes of decoded pixels in flight; None: unbounded
    # frames of one image judged and decoded at most, whatever a policy asks (MODERATION_MAX_FRAMES and
    # MODERATION_MAX_FRAME_DECODES)
    frame_caps: FrameLimits = CAPS

    async def moderate_batch(self, batch: Sequence[Incoming]) -> list[Outcome]:
        """One outcome per message, in order (`judge_batch` without the policies)."""
        return [judged.outcome for judged in await self.judge_batch(batch)]

    async def judge_batch(self, batch: Sequence[Incoming]) -> list[Judged]:
        """One outcome per message, in order, with the policy that decided it. Transient faults (S3 or Triton
        unavailable) are retried until the deadline; meanwhile the agent takes no new events, which is the
        backpressure."""
        started = time.monotonic()
        outcomes: dict[int, Judged] = {}
        first_errors: dict[int, datetime] = {}
        pending, attempt = list(range(len(batch))), 0
        while pending:
            attempt += 1
            results = await self._attempt([batch[i] for i in pending], [first_errors.get(i) for i in pending])
            retry = []
            for i, judged in zip(pending, results, strict=True):
                outcome = judged.outcome
                if isinstance(outcome, DeadLetter) and outcome.reason in TRANSIENT and not self._late(started):
                    first_errors.setdefault(i, outcome.first_error_at)
                    metrics.RETRIES.labels(str(outcome.reason)).inc()
                    retry.append(i)
                else:
                    outcomes[i] = judged
                    _log_outcome(outcome, batch[i])
            if pending := retry:
                delay = self.backoff.delay(attempt)
                log.warning("%d events hit a transient fault; attempt %d in %.1f s", len(pending), attempt + 1, delay)
                await asyncio.sleep(delay)
        return [outcomes[i] for i in range(len(batch))]

    async def _attempt(self, messages: Sequence[Incoming], first_errors: Sequence[datetime | None]) -> list[Judged]:
        """One try at each message. Those answered without I/O (an unreadable event, a trusted cache hit)
        are answered here and then; only the rest become concurrent tasks."""
        quick = [self._without_io(m, f) for m, f in zip(messages, first_errors, strict=True)]
        slow = [(i, event) for i, event in enumerate(quick) if isinstance(event, UploadEvent)]
        judged = await asyncio.gather(*(self._moderate(messages[i], e, first_errors[i]) for i, e in slow))
        answers = dict(zip((i for i, _ in slow), judged, strict=True))
        return [answers[i] if isinstance(item, UploadEvent) else item for i, item in enumerate(quick)]

    def _without_io(self, message: Incoming, first_error: datetime | None) -> Judged | UploadEvent:
        """The outcome when no I/O is needed, else the parsed event."""
        event: UploadEvent | None = None
        try:
            event = parse_upload(message.value)
            policy = self.policies.for_tenant(event.tenant)
            if self.trust_event_sha256 and event.sha256 and (hit := self._cached(event.sha256, policy)):
                return self._from_cache(event, hit, policy, _timings(time.perf_counter()))
            return event
        except Exception as exc:
            return self._failed(message, event, exc, first_error)

    async def _moderate(self, message: Incoming, event: UploadEvent, first_error: datetime | None) -> Judged:
        try:
            return await self._judge(event, message.trace)
        except Exception as exc:
            return self._failed(message, event, exc, first_error)

    def _failed(self, message: Incoming, event: UploadEvent | None, exc: Exception, first: datetime | None) -> Judged:
        if not isinstance(exc, Rejected):  # a bug must cost one event a dead letter, never the worker
            log.error("unexpected error", exc_info=exc, extra={"where": message.where})
            exc = Rejected(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
        return Judged(self._dead_letter(message, event, exc, first))

    def _late(self, started: float) -> bool:
        return time.monotonic() - started >= self.backoff.deadline_s

    async def _judge(self, event: UploadEvent, trace: Context | None) -> Judged:
        policy = self.policies.for_tenant(event.tenant)
        started = time.perf_counter()
        with tracing.span_in(trace, "s3 fetch", SpanKind.CLIENT):
            data = await self.store.fetch(event.bucket, event.key)
        fetched = time.perf_counter()
        digest = checked_sha256(data, event.sha256)
        if hit := self._cached(digest, policy):
            return self._from_cache(event, hit, policy, _timings(started, fetched))
        with tracing.span_in(trace, "decode"):
            examined = await self._examine(data, self._frames(policy))
        decoded = time.perf_counter()
        evidence = self._evidence(digest, examined.image, examined.provenance, policy)
        said = await self._score(digest, examined, trace) if labelling.needs_model(policy, evidence) else None
        return self._verdict(event, policy, evidence, said, cached=False, timings=_timings(started, fetched, decoded))

    async def _score(self, digest: str, examined: Examined, trace: Context | None) -> CacheEntry:
        """What the model says about the examined image, remembered in the cache for the same bytes: every
        frame judged at once (concurrent requests: one batch for the detector); the highest P(fake) is the
        image's, and its frame is named when the image has more than one."""
        with metrics.INFLIGHT.track_inprogress(), tracing.span_in(trace, "inference", SpanKind.CLIENT):
            if len(examined.frames) == 1:  # a still image: no task to schedule, as before frames were judged
                detections = [await self.detector.detect(examined.frames[0].pixels)]
            else:
                detections = await asyncio.gather(*(self.detector.detect(f.pixels) for f in examined.frames))
        worst = max(range(len(detections)), key=lambda i: detections[i].score)
        detection = detections[worst]
        entry = CacheEntry(
            image_sha256=digest,
            label=detection.label,
            score=detection.score,
            frame=examined.frames[worst].index if examined.image.frames > 1 else None,
            explanation=detection.explanation,
            answer_label=detection.answer_label,
            model=self.detector.model,
            image=examined.image,
            decided_at=self.clock(),
            provenance=examined.provenance,
        )
        if self.cache is not None:
            self.cache.put(entry)
        return entry

    def _frames(self, policy: Policy) -> FrameLimits:
        caps = self.frame_caps
        return FrameLimits(judged=min(policy.frames, caps.judged), decodes=caps.decodes)

    async def _examine(self, data: bytes, frames: FrameLimits) -> Examined:
        read: bytes | Header = data
        if len(data) <= INLINE_MAX_BYTES:
            read = read_header(data, max_pixels=self.max_image_pixels, formats=self.image_formats)
            if read.pixels <= INLINE_MAX_PIXELS and not animated(read):  # frames: the decode threads' work
                return examine_header(read, plan(read, frames, self.max_image_pixels), fast=self.fast_preprocess)
        work = functools.partial(
            examine,
            read,
            self.max_image_pixels,
            fast=self.fast_preprocess,
            formats=self.image_formats,
            budget=self.decode_budget,
            frames=frames,
        )
        return await asyncio.get_running_loop().run_in_executor(self.decode_pool, work)

    def _cached(self, sha256: str, policy: Policy) -> CacheEntry | None:
        """The cached entry, if it judged as many frames as this policy asks (of those the image has)."""
        if self.cache is None:
            return None
        hit = self.cache.get(sha256, model=self.detector.model)
        if hit is None or len(hit.image.frames_judged) < min(self._frames(policy).judged, hit.image.frames):
            return None
        return hit

    def _evidence(
        self, sha256: str, image: ImageInfo, provenance: Provenance | None, policy: Policy
    ) -> labelling.Evidence:
        """The image as examined (or cached) and what the bank knows of it: one lookup by its sha256, one by its
        PDQ hash when the policy matches near-duplicates and the hash is good enough."""
        if self.bank is None:
            return labelling.Evidence(sha256, image, provenance)
        rule, nearest = policy.match, None
        if rule.enabled and image.pdq is not None and (image.pdq_quality or 0) >= rule.min_quality:
            nearest = self.bank.nearest(image.pdq, rule.max_distance, rule.min_quality, quality=image.pdq_quality or 0)
        return labelling.Evidence(sha256, image, provenance, self.bank.by_sha256(sha256), nearest)

    def _from_cache(self, event: UploadEvent, hit: CacheEntry, policy: Policy, timings: Timings) -> Judged:
        evidence = self._evidence(hit.image_sha256, hit.image, hit.provenance, policy)
        return self._verdict(event, policy, evidence, hit, cached=True, timings=timings)

    def _verdict(
        self,
        event: UploadEvent,
        policy: Policy,
        evidence: labelling.Evidence,
        said: CacheEntry | None,
        *,
        cached: bool,
        timings: Timings,
    ) -> Judged:
        """The upload's verdict, by the worker's choice from its evidence and what the model said (None: not
        asked), with the policy that made the choice."""
        choice = labelling.choose(policy, evidence, said)
        verdict = Verdict(
            event_id=event.event_id,
            bucket=event.bucket,
            key=event.key,
            tenant=event.tenant,
            image_sha256=evidence.image_sha256,
            label=choice.label,
            score=choice.score,
            frame=choice.frame,
            action=choice.action,
            explanation=choice.explanation,
            answer_label=choice.answer_label,
            explanation_requested=choice.explanation_requested,
            model=choice.model,
            cached=cached,
            image=evidence.image,
            timings=timings,
            uploaded_at=event.uploaded_at,
            decided_at=self.clock(),
            attributes=event.attributes,
            decided_by=choice.decided_by,
            provenance=evidence.provenance,
            match=choice.match,
            policy_version=choice.policy.version,
        )
        return Judged(verdict, choice.policy)

    def _dead_letter(
        self, message: Incoming, event: UploadEvent | None, exc: Rejected, first: datetime | None
    ) -> DeadLetter:
        event_id = event.event_id if event else event_id_of(message.value)
        return dead_letter(message, event_id, exc, first, self.clock())


def dead_letter(
    message: Incoming, event_id: str | None, exc: Rejected, first: datetime | None, now: datetime
) -> DeadLetter:
    """The letter for a record no outcome came of: why, whence, and its value byte for byte (cut to fit)."""
    payload, detail, retryable = message.value or b"", exc.detail[:2000], exc.retryable
    if len(payload) > MAX_DEAD_LETTER_PAYLOAD:  # a dead letter the broker refuses would stop the worker
        detail += f" (payload cut to its first {MAX_DEAD_LETTER_PAYLOAD} of {len(payload)} bytes)"
        payload, retryable = payload[:MAX_DEAD_LETTER_PAYLOAD], False
    return DeadLetter(
        event_id=event_id,
        reason=exc.reason,
        detail=detail,
        retryable=retryable,
        attempts=message.earlier_attempts() + 1,  # deliveries: retries inside one delivery do not count
        first_error_at=first or now,
        last_error_at=now,
        source_topic=message.topic,
        source_partition=message.partition,
        source_offset=message.offset,
        payload_base64=base64.b64encode(payload).decode(),
        payload_null=message.value is None,
    )


def _log_outcome(outcome: Outcome, message: Incoming) -> None:
    context = {"event_id": outcome.event_id, "where": message.where}
    if isinstance(outcome, DeadLetter):
        context["reason"] = str(outcome.reason)
        log.warning("dead letter %s: %s", outcome.reason, outcome.detail, extra=context)
    else:  # the verdicts topic is the record: a line per verdict only at DEBUG
        log.debug("verdict %s %.3f %s", outcome.label, outcome.score, outcome.action, extra=context)


def checked_sha256(data: bytes, expected: str | None) -> str:
    digest = hashlib.sha256(data).hexdigest()
    if expected is not None and digest != expected:
        raise Rejected(Reason.CHECKSUM_MISMATCH, f"object sha256 is {digest}, the event says {expected}")
    return digest


def _timings(started: float, fetched: float | None = None, decoded: float | None = None) -> Timings:
    """Stage timings up to now; a stage that did not run (a cache hit) took 0 ms."""
    now = time.perf_counter()
    fetch_end = fetched if fetched is not None else started
    decode_end = decoded if decoded is not None else fetch_end
    return Timings(
        fetch_ms=_ms(started, fetch_end),
        decode_ms=_ms(fetch_end, decode_end),
        inference_ms=_ms(decode_end, now) if decoded is not None else 0.0,
        total_ms=_ms(started, now),
    )


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)
