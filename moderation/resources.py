"""The worker's clients (S3, detector, the outcome publisher, a Kafka metadata client), opened once and
shared by the agent and the readiness probe."""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaClient, AIOKafkaConsumer
from pydantic import ValidationError

from moderation import imaging
from moderation.cache import VerdictCache
from moderation.detector import detector_from_settings
from moderation.events import CacheEntry
from moderation.kafka import aiokafka_options
from moderation.pipeline import Backoff, Pipeline
from moderation.policy import Policy
from moderation.publisher import Publisher
from moderation.settings import Settings
from moderation.storage import S3Store

log = logging.getLogger(__name__)


class Resources:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = S3Store(settings)
        self.detector = detector_from_settings(settings)
        self.publisher = Publisher(settings)
        self._kafka: AIOKafkaClient | None = None  # aiokafka objects must be made inside the event loop
        self.cache = (
            VerdictCache(settings.cache_max_entries, settings.cache_ttl_s) if settings.cache_max_entries else None
        )
        self._cache_reader: asyncio.Task[None] | None = None
        self._started = asyncio.Event()
        self._lock = asyncio.Lock()

    async def start(self) -> Pipeline:
        """Idempotent: the agent calls it on start; the detector waits for its model first."""
        async with self._lock:
            if not self._started.is_set():
                await self.store.start()
                await self.publisher.start()
                self._kafka = AIOKafkaClient(**aiokafka_options(self.settings))
                await self._kafka.bootstrap()
                await self.detector.start()
                if self.settings.fast_preprocess:
                    await asyncio.to_thread(imaging.warm_up)
                if self.cache is not None:
                    self._cache_reader = asyncio.create_task(self._fill_cache(self.cache), name="verdict-cache")
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
        )

    async def stop(self) -> None:
        async with self._lock:
            if self._started.is_set():
                if self._cache_reader is not None:
                    self._cache_reader.cancel()
                await self.detector.stop()
                await self.publisher.stop()
                await self.store.stop()
                if self._kafka is not None:
                    await self._kafka.close()
                self._started.clear()

    async def readiness(self) -> dict[str, bool]:
        if not self._started.is_set():
            return {"started": False}
        kafka, s3, model = await asyncio.gather(self._kafka_ok(), self.store.reachable(), self.detector.ready())
        return {"kafka": kafka, "s3": s3, "model": model}

    async def _fill_cache(self, cache: VerdictCache) -> None:
        """Follow the cache topic from its start for as long as the worker runs: every worker's verdicts."""
        consumer = AIOKafkaConsumer(
            self.settings.topic_cache, group_id=None, auto_offset_reset="earliest", **aiokafka_options(self.settings)
        )
        await consumer.start()
        try:
            async for record in consumer:
                try:
                    cache.put(CacheEntry.model_validate_json(record.value))
                except ValidationError:
                    log.warning("unreadable cache entry at %s[%d]@%d", record.topic, record.partition, record.offset)
        except asyncio.CancelledError:
            raise
        except Exception:  # the cache is an optimisation: losing its feed must not stop the worker
            log.exception("verdict cache feed stopped")
        finally:
            await consumer.stop()

    async def _kafka_ok(self) -> bool:
        try:
            assert self._kafka is not None
            await self._kafka.fetch_all_metadata()
        except Exception:
            return False
        return True
