"""Prometheus metrics of the worker and its HTTP endpoints: /metrics, /live and /ready.

/live never looks at dependencies, so Kubernetes does not restart a worker that waits for a slow
Triton; it turns red only when the worker itself is stuck (events pending, no ack for
MODERATION_ACK_STALL_S). /ready answers 200 only while Kafka, S3 and the model answer.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from aiohttp import web
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)

from moderation.events import DeadLetter, Verdict

log = logging.getLogger(__name__)
disable_created_metrics()  # the *_created series double the scrape size for nothing a dashboard uses

REGISTRY = CollectorRegistry()
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)

EVENTS_IN = Counter("moderation_events_in", "Upload events taken from the stream.", registry=REGISTRY)
OUTCOMES = Counter(
    "moderation_outcomes",
    "Outcomes published, by kind and dead-letter reason.",
    ["outcome", "reason"],
    registry=REGISTRY,
)
VERDICTS = Counter("moderation_verdicts", "Verdicts by label and action.", ["label", "action"], registry=REGISTRY)
END_TO_END = Histogram(
    "moderation_end_to_end_seconds",
    "From the event's uploaded_at to its verdict.",
    buckets=LATENCY_BUCKETS,
    registry=REGISTRY,
)
S3_FETCH = Histogram("moderation_s3_fetch_seconds", "S3 GET latency.", buckets=LATENCY_BUCKETS, registry=REGISTRY)
INFERENCE = Histogram(
    "moderation_inference_seconds", "Detector latency per image.", buckets=LATENCY_BUCKETS, registry=REGISTRY
)
BATCH_SIZE = Histogram(
    "moderation_batch_size", "Events per batch.", buckets=(1, 2, 4, 8, 16, 32, 64, 128), registry=REGISTRY
)
CACHE_HITS = Counter("moderation_cache_hits", "Verdicts served from the verdict cache.", registry=REGISTRY)
INFLIGHT = Gauge("moderation_inflight_requests", "Detector requests in flight.", registry=REGISTRY)
CONSUMER_LAG = Gauge(
    "moderation_consumer_lag",
    "Messages behind the end of each assigned partition.",
    ["topic", "partition"],
    registry=REGISTRY,
)
DISAGREEMENTS = Counter(
    "moderation_answer_disagreements",
    "Verdicts whose explanation, read with FakeVLM's rule, states the other label than the score.",
    registry=REGISTRY,
)
RETRIES = Counter("moderation_retries", "Transient faults retried, by reason.", ["reason"], registry=REGISTRY)
READY = Gauge("moderation_ready", "1 while Kafka, S3 and the model answer.", registry=REGISTRY)
EVENTS_PENDING = Gauge(
    "moderation_events_pending", "Events taken from the stream whose offsets are not yet acked.", registry=REGISTRY
)
CACHE_REFUSED = Counter(
    "moderation_cache_entries_refused",
    "Verdict cache entries not stored, by reason (key_mismatch, future, unknown_weights...).",
    ["reason"],
    registry=REGISTRY,
)
DECISIONS_BANKED = Counter(
    "moderation_decisions_banked",
    "Reviewer decisions turned into bank entries, by decision.",
    ["decision"],
    registry=REGISTRY,
)
DECISIONS_REFUSED = Counter(
    "moderation_decisions_refused", "Records on the decisions topic that are not a valid Decision.", registry=REGISTRY
)
CACHE_PUBLISH_FAILURES = Counter(
    "moderation_cache_publish_failures",
    "Verdict cache entries not published to the cache topic (best effort: their verdicts went out).",
    registry=REGISTRY,
)
BANK_REFUSED = Counter(
    "moderation_bank_records_refused",
    "Hash-bank records skipped, by reason (unreadable, key_mismatch).",
    ["reason"],
    registry=REGISTRY,
)
BANK_ENTRIES = Gauge("moderation_bank_entries", "Known images in this worker's near-duplicate bank.", registry=REGISTRY)
EVENT_LOOP_LAG_MAX = Gauge(
    "moderation_event_loop_lag_max_seconds",
    "Longest the event loop was late to wake a timer since the worker's clients started (a stall of every task).",
    registry=REGISTRY,
)
EXPLAIN_REQUESTS = Counter(
    "moderation_explain_requests",
    "Explanations asked for, published with their verdicts (worker).",
    registry=REGISTRY,
)
EXPLANATIONS = Counter(
    "moderation_explanations",
    "Explain requests answered (explainer), by outcome (explained, dead_letter) and dead-letter detail reason.",
    ["outcome", "reason"],
    registry=REGISTRY,
)
EXPLANATIONS_PENDING = Gauge(
    "moderation_explanations_pending",
    "Explain requests taken by this explainer whose offsets are not committed yet.",
    registry=REGISTRY,
)
EXPLANATION_LATENCY = Histogram(
    "moderation_explanation_seconds",
    "From the verdict's decision to its explanation's publication (explainer).",
    buckets=(*LATENCY_BUCKETS, 600, 1200, 1800, 3600),  # a backlog of explanations is minutes, not a verdict's seconds
    registry=REGISTRY,
)
POLICY_INFO = Gauge(
    "moderation_policy_info", "1 for the version of the per-tenant policy in force.", ["version"], registry=REGISTRY
)
POLICY_FILE_REFUSED = Gauge(
    "moderation_policy_file_refused",
    "1 while the policy file as it now is was refused (unreadable or invalid) and an older policy is in force.",
    registry=REGISTRY,
)
POLICY_RELOAD_FAILURES = Counter(
    "moderation_policy_reload_failures",
    "Edits of the policy file refused (unreadable or invalid): the previous policy stayed in force.",
    registry=REGISTRY,
)


def record(outcomes: Iterable[Verdict | DeadLetter]) -> None:
    """Count a batch of published outcomes (called after the broker acknowledged them): counters once a
    label set, as prometheus-client takes a lock an increment."""
    counts: collections.Counter[tuple[Any, ...]] = collections.Counter()
    for outcome in outcomes:
        if isinstance(outcome, DeadLetter):
            counts[OUTCOMES, "dead_letter", str(outcome.reason)] += 1
            continue
        counts[OUTCOMES, "verdict", ""] += 1
        counts[VERDICTS, outcome.label, outcome.action] += 1
        if outcome.answer_label is not None and outcome.answer_label != outcome.label:
            counts[(DISAGREEMENTS,)] += 1
        if outcome.explanation_requested:
            counts[(EXPLAIN_REQUESTS,)] += 1
        if outcome.cached:
            counts[(CACHE_HITS,)] += 1
        else:
            S3_FETCH.observe(outcome.timings.fetch_ms / 1000)
            INFERENCE.observe(outcome.timings.inference_ms / 1000)
        if outcome.uploaded_at is not None:
            END_TO_END.observe(max(0.0, (outcome.decided_at - outcome.uploaded_at).total_seconds()))
    for (counter, *labels), count in counts.items():
        (counter.labels(*labels) if labels else counter).inc(count)


Check = Callable[[], Awaitable[dict[str, bool]]]


class HealthServer:
    """aiohttp on the worker's event loop; `check` (readiness) is probed at most every `cache_s` seconds,
    `live` (no I/O, only the worker's own state) on every probe."""

    def __init__(
        self,
        port: int,
        check: Check,
        *,
        live: Callable[[], dict[str, bool]] = dict,
        cache_s: float = 2.0,
        timeout_s: float = 5.0,
    ) -> None:
        self._port, self._check, self._cache_s, self._timeout_s = port, check, cache_s, timeout_s
        self._live_check = live
        self._last: tuple[float, dict[str, bool]] = (0.0, {})
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/live", self._live)
        app.router.add_get("/ready", self._ready)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "0.0.0.0", self._port).start()  # noqa: S104 - probes and scrapes come from outside
        log.info("metrics and health on :%d", self._port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def readiness(self) -> dict[str, bool]:
        stamp, result = self._last
        if time.monotonic() - stamp > self._cache_s:
            try:
                result = await asyncio.wait_for(self._check(), self._timeout_s)
            except Exception as exc:  # a probe that fails or hangs means "not ready", never a crash
                log.warning("readiness check failed: %s", exc)
                result = {"check": False}
            self._last = (time.monotonic(), result)
            READY.set(1 if result and all(result.values()) else 0)
        return result

    async def _metrics(self, _: web.Request) -> web.Response:
        return web.Response(body=generate_latest(REGISTRY), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _live(self, _: web.Request) -> web.Response:
        checks = self._live_check()
        ok = all(checks.values())
        return web.json_response({"live": ok, "checks": checks}, status=200 if ok else 503)

    async def _ready(self, _: web.Request) -> web.Response:
        result = await self.readiness()
        ok = bool(result) and all(result.values())
        return web.json_response({"ready": ok, "checks": result}, status=200 if ok else 503)


STALL_WARNING_S = 0.1


async def watch_loop_lag(interval_s: float) -> None:
    """Sleep `interval_s` again and again; whatever more the loop took to wake this task, every task
    waited too. The longest such stall goes to moderation_event_loop_lag_max_seconds."""
    worst = 0.0
    while True:
        started = time.perf_counter()
        await asyncio.sleep(interval_s)
        lag = time.perf_counter() - started - interval_s
        if lag > worst:
            worst = lag
            EVENT_LOOP_LAG_MAX.set(lag)
            if lag >= STALL_WARNING_S:  # a new longest stall over this: at most a few lines a run
                log.warning("the event loop stalled for %.3f s", lag)
