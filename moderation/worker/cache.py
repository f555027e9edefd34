"""The verdict cache: identical bytes (sha256) reach the same weights once while their entry lives.

Every worker holds the cache in memory, bounded in entries (least recently used first out) and in age,
and fills it from the compacted cache topic that all workers publish to: a global table backed by its
changelog, so it is right across workers, rebalances and restarts.

An entry is keyed by the image's sha256 AND the identity of the weights that judged it
(`moderation.model.identity`), in memory and as the topic's record key, so it never outlives its model: other
weights, or weights of unknown identity, never get a hit. Whoever can write the topic could still try to
poison it, so an entry is refused when its record key is not its own sha256 and model, when it is dated
in the future (beyond a clock-skew allowance: it would never age out), or when it is already too old.

Entries are shared best effort (`CacheFeed`): outside the ack gate, so a cache topic that cannot be
written costs later inferences, never a verdict.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from enum import StrEnum

from aiokafka import AIOKafkaProducer
from pydantic import ValidationError

from moderation.adapters.kafka import aiokafka_options
from moderation.events import CacheEntry, ModelInfo, Verdict
from moderation.settings import Settings
from moderation.worker import metrics, tables

log = logging.getLogger(__name__)


class Refusal(StrEnum):
    """Why an entry was not stored (the label of moderation_cache_entries_refused_total)."""

    UNREADABLE = "unreadable"
    KEY_MISMATCH = "key_mismatch"
    UNKNOWN_WEIGHTS = "unknown_weights"
    FUTURE = "future"
    EXPIRED = "expired"

    @property
    def suspicious(self) -> bool:
        """A sign of a writer that is not a worker of ours (old and pre-identity entries are routine)."""
        return self not in (Refusal.EXPIRED, Refusal.UNKNOWN_WEIGHTS)


def cache_key(sha256: str, model: ModelInfo) -> str:
    """The in-memory key and the cache topic's record key: the image's bytes and the weights that judged them."""
    return f"{sha256}/{model.name}/{model.weights}"


class VerdictCache:
    def __init__(
        self, max_entries: int, ttl_s: float, *, max_skew_s: float = 60.0, clock: Callable[[], float] = time.time
    ) -> None:
        self.max_entries, self.ttl_s, self.max_skew_s, self._clock = max_entries, ttl_s, max_skew_s, clock
        self._entries: OrderedDict[str, CacheEntry] = OrderedDict()

    def __len__(self) -> int:
        return len(self._entries)

    def get(self, sha256: str, *, model: ModelInfo) -> CacheEntry | None:
        """What these weights said about these bytes, explained or not: a verdict never waits for an explanation
        (one that is wanted and missing is asked for apart, `Verdict.explanation_requested`)."""
        if model.weights is None:
            return None
        key = cache_key(sha256, model)
        entry = self._entries.get(key)
        if entry is None:
            return None
        if self._expired(entry):
            del self._entries[key]
            return None
        self._entries.move_to_end(key)
        return entry

    def put(self, entry: CacheEntry) -> Refusal | None:
        """Store the entry, or say why not (and count it)."""
        refusal = self._refusal(entry)
        if refusal is not None:
            metrics.CACHE_REFUSED.labels(str(refusal)).inc()
            return refusal
        key = cache_key(entry.image_sha256, entry.model)
        self._entries[key] = entry
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)
        return None

    def put_record(self, key: bytes | None, value: bytes | None) -> Refusal | None:
        """A record of the cache topic: stored only when its key is the key of the entry it carries."""
        try:
            entry = CacheEntry.model_validate_json(value or b"")
        except ValidationError:
            metrics.CACHE_REFUSED.labels(str(Refusal.UNREADABLE)).inc()
            return Refusal.UNREADABLE
        if entry.model.weights is not None and key != cache_key(entry.image_sha256, entry.model).encode():
            metrics.CACHE_REFUSED.labels(str(Refusal.KEY_MISMATCH)).inc()
            return Refusal.KEY_MISMATCH
        return self.put(entry)

    def _refusal(self, entry: CacheEntry) -> Refusal | None:
        if entry.model.weights is None:
            return Refusal.UNKNOWN_WEIGHTS
        age = self._clock() - entry.decided_at.timestamp()
        if age < -self.max_skew_s:
            return Refusal.FUTURE
        return Refusal.EXPIRED if age > self.ttl_s else None

    def _expired(self, entry: CacheEntry) -> bool:
        return self._clock() - entry.decided_at.timestamp() > self.ttl_s


class CacheFeed:
    """Publishes fresh verdicts to the cache topic in the background, on a producer of its own.

    Best effort, outside the ack gate: `offer` never waits and never raises. A record the broker does not
    acknowledge within `timeout_s` is logged and counted (moderation_cache_publish_failures_total), as is
    a batch offered while `max_pending` batches are still on their way. Losing an entry costs one
    inference later; waiting for it would stall the verdicts behind a cache-topic outage.
    """

    def __init__(self, settings: Settings, *, max_pending: int = 16, timeout_s: float = 10.0) -> None:
        self._settings, self._topic = settings, settings.topic_cache
        self._max_pending, self._timeout_s = max_pending, timeout_s
        self._producer: AIOKafkaProducer | None = None  # aiokafka objects must be made inside the event loop
        self._pending: set[asyncio.Task[None]] = set()
        self._failing = 0  # failures in a row: logged when they start and when they stop

    async def start(self) -> None:
        timeout_ms = int(self._timeout_s * 1000)
        options = aiokafka_options(self._settings) | {"request_timeout_ms": timeout_ms}
        self._producer = AIOKafkaProducer(acks="all", **options)
        await self._producer.start()

    async def stop(self, grace_s: float = 2.0) -> None:
        """Give the pending publishes, then the producer's flush, `grace_s` each; drop (and count) the rest:
        a worker's shutdown never waits on the cache topic."""
        if self._pending:
            await asyncio.wait(set(self._pending), timeout=grace_s)
        for task in list(self._pending):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._producer is not None:
            producer, self._producer = self._producer, None
            try:
                await asyncio.wait_for(producer.stop(), grace_s)
            except TimeoutError:
                log.warning("verdict cache: its producer did not flush within %.0f s", grace_s)

    def offer(self, outcomes: Iterable[object]) -> None:
        """Share the fresh verdicts among `outcomes` (cache hits and dead letters are skipped, and so are verdicts
        whose label someone other than the model decided: the cache holds what the model said)."""
        entries = [
            CacheEntry.of(o)
            for o in outcomes
            if isinstance(o, Verdict) and not o.cached and o.model.weights is not None and o.decided_by == "model"
        ]
        if not entries:
            return
        if self._producer is None:
            self._failed(len(entries), "the cache feed is not started")
            return
        if len(self._pending) >= self._max_pending:
            self._failed(len(entries), f"{len(self._pending)} batches of cache entries still pending")
            return
        task = asyncio.create_task(self._publish(entries), name="cache-feed")
        self._pending.add(task)
        task.add_done_callback(self._pending.discard)

    async def _publish(self, entries: list[CacheEntry]) -> None:
        try:
            results = await asyncio.gather(*(self._send(e) for e in entries), return_exceptions=True)
        except asyncio.CancelledError:
            self._failed(len(entries), "the worker stopped first")
            raise
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            self._failed(len(errors), repr(errors[0]))
        elif self._failing:
            log.info("verdict cache: publishing to %s again, after %d failed entries", self._topic, self._failing)
            self._failing = 0

    async def _send(self, entry: CacheEntry) -> None:
        assert self._producer is not None
        key = cache_key(entry.image_sha256, entry.model).encode()
        async with asyncio.timeout(self._timeout_s):
            await (await self._producer.send(self._topic, key=key, value=entry.to_bytes()))

    def _failed(self, count: int, why: str) -> None:
        metrics.CACHE_PUBLISH_FAILURES.inc(count)
        if not self._failing:
            log.warning(
                "verdict cache: %d entries not published to %s (verdicts are not held up): %s", count, self._topic, why
            )
        self._failing += count


async def load(cache: VerdictCache, settings: Settings, partitions: tables.Partitions) -> asyncio.Task[None]:
    """Follow the verdict cache topic, read to its end first: a restarted worker starts warm."""
    table = tables.Table(
        "verdict cache", settings.topic_cache, settings.cache_load_timeout_s, cache.put_record, cache.__len__
    )
    return await tables.load(table, settings, partitions)
