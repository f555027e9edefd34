"""The worker's clients (S3, detector, the outcome publisher, a Kafka metadata client), opened once and
shared by the agent and the readiness probe."""

from __future__ import annotations

import asyncio
import gc
import logging
import time
from concurrent.futures import ThreadPoolExecutor

from aiokafka import AIOKafkaClient, AIOKafkaConsumer, TopicPartition

from moderation import imaging, metrics
from moderation.budget import ByteBudget, return_large_frees
from moderation.cache import CacheFeed, VerdictCache
from moderation.detector import detector_from_settings
from moderation.kafka import aiokafka_options
from moderation.pipeline import Backoff, Pipeline
from moderation.policy import Policy
from moderation.publisher import Publisher
from moderation.settings import Settings
from moderation.storage import S3Store

log = logging.getLogger(__name__)

LOOP_LAG_PROBE_S = 0.05  # how often the loop-lag probe wakes: a stall is measured to within this
STALL_WARNING_S = 0.1


class Resources:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = S3Store(settings)
        self.detector = detector_from_settings(settings)
        self.publisher = Publisher(settings)
        self._kafka: AIOKafkaClient | None = None  # aiokafka objects must be made inside the event loop
        self.cache = (
            VerdictCache(settings.cache_max_entries, settings.cache_ttl_s, max_skew_s=settings.cache_clock_skew_s)
            if settings.cache_max_entries
            else None
        )
        self.cache_feed = CacheFeed(settings)  # started only with the cache on: its verdicts feed the topic
        self._cache_reader: asyncio.Task[None] | None = None
        self._lag_probe: asyncio.Task[None] | None = None
        self._decode_pool: ThreadPoolExecutor | None = None
        self.decode_budget = ByteBudget(settings.decode_budget_mib * 1024 * 1024)
        self._started = asyncio.Event()
        self._lock = asyncio.Lock()

    async def start(self) -> Pipeline:
        """Idempotent: the agent calls it on start; the detector waits for its model first."""
        async with self._lock:
            if not self._started.is_set():
                if not return_large_frees():
                    log.warning("not glibc: freed pixel buffers may stay resident beyond the decode budget")
                self._decode_pool = ThreadPoolExecutor(self.settings.decode_threads, thread_name_prefix="decode")
                await self.store.start()
                await self.publisher.start()
                self._kafka = AIOKafkaClient(**aiokafka_options(self.settings))
                await self._kafka.bootstrap()
                await self.detector.start()
                if self.settings.fast_preprocess:
                    await asyncio.get_running_loop().run_in_executor(self._decode_pool, imaging.warm_up)
                if self.cache is not None:
                    await self.cache_feed.start()
                    await self._load_cache(self.cache)
                # Start-up's objects (some 240,000, torch's and botocore's) live as long as the worker: out of
                # the collector's reach, a full collection no longer walks them and stalls the loop 130 ms.
                gc.collect()
                gc.freeze()
                # From here on: start-up's own stalls (botocore loading its models on the loop, torch's
                # import holding the GIL in a decode thread) come before the first event and are not counted.
                self._lag_probe = asyncio.create_task(watch_loop_lag(LOOP_LAG_PROBE_S), name="loop-lag-probe")
                self._started.set()
        s = self.settings
        backoff = Backoff(deadline_s=s.event_deadline_s, cap_s=s.retry_backoff_max_s)
        return Pipeline(
            self.store,
            self.detector,
            Policy.from_settings(s),
            s.max_image_pixels,
            backoff,
            cache=self.cache,
            trust_event_sha256=s.cache_trust_event_sha256,
            fast_preprocess=s.fast_preprocess,
            image_formats=imaging.readable(s.image_formats),
            decode_pool=self._decode_pool,
            decode_budget=self.decode_budget,
        )

    async def stop(self) -> None:
        async with self._lock:
            if self._started.is_set():
                if self._cache_reader is not None:
                    self._cache_reader.cancel()
                await self.detector.stop()
                await self.cache_feed.stop()
                await self.publisher.stop()
                await self.store.stop()
                if self._kafka is not None:
                    await self._kafka.close()
                if self._decode_pool is not None:
                    self._decode_pool.shutdown(wait=False, cancel_futures=True)  # idle: every batch is done
                if self._lag_probe is not None:
                    self._lag_probe.cancel()
                self._started.clear()

    async def readiness(self) -> dict[str, bool]:
        if not self._started.is_set():
            return {"started": False}
        kafka, s3, model = await asyncio.gather(self._kafka_ok(), self.store.reachable(), self.detector.ready())
        return {"kafka": kafka, "s3": s3, "model": model}

    async def _load_cache(self, cache: VerdictCache) -> None:
        """Follow the cache topic; wait until it is read to its end, so a restarted worker starts warm."""
        loaded = asyncio.Event()
        self._cache_reader = asyncio.create_task(self._fill_cache(cache, loaded), name="verdict-cache")
        started = time.monotonic()
        timeout_s = self.settings.cache_load_timeout_s
        try:
            await asyncio.wait_for(loaded.wait(), timeout_s)
        except TimeoutError:
            log.warning("verdict cache: %d entries after %.0f s, consuming before the rest", len(cache), timeout_s)
        else:
            log.info("verdict cache: %d entries loaded in %.1f s", len(cache), time.monotonic() - started)

    async def _fill_cache(self, cache: VerdictCache, loaded: asyncio.Event) -> None:
        """Read the cache topic from its start for as long as the worker runs: every worker's verdicts."""
        topic = self.settings.topic_cache
        consumer = AIOKafkaConsumer(group_id=None, auto_offset_reset="earliest", **aiokafka_options(self.settings))
        await consumer.start()
        try:
            partitions = [TopicPartition(topic, p) for p in sorted(await self._partitions(topic))]
            if not partitions:
                log.warning("verdict cache: topic %s has no partitions, so this worker's cache is its own", topic)
            consumer.assign(partitions)
            ends = await consumer.end_offsets(partitions)
            while True:
                if not loaded.is_set() and all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                    loaded.set()
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    for record in records:
                        if refusal := cache.put_record(record.key, record.value):
                            where = f"{record.topic}[{record.partition}]@{record.offset}"
                            level = logging.WARNING if refusal.suspicious else logging.DEBUG
                            log.log(level, "verdict cache: entry refused (%s) at %s", refusal, where)
        except asyncio.CancelledError:
            raise
        except Exception:  # the cache is an optimisation: losing its feed must not stop the worker
            log.exception("verdict cache feed stopped")
        finally:
            loaded.set()
            await consumer.stop()

    async def _partitions(self, topic: str) -> set[int]:
        assert self._kafka is not None
        await self._kafka.fetch_all_metadata()
        return self._kafka.cluster.partitions_for_topic(topic) or set()

    async def _kafka_ok(self) -> bool:
        try:
            assert self._kafka is not None
            await self._kafka.fetch_all_metadata()
        except Exception:
            return False
        return True


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
            metrics.EVENT_LOOP_LAG_MAX.set(lag)
            if lag >= STALL_WARNING_S:  # a new longest stall over this: at most a few lines a run
                log.warning("the event loop stalled for %.3f s", lag)
