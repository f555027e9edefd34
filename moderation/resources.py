"""The worker's clients (S3, detector, a Kafka metadata client), opened once and shared by the agent
and the readiness probe."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaClient

from moderation.detector import detector_from_settings
from moderation.kafka import aiokafka_options
from moderation.pipeline import Backoff, Pipeline
from moderation.policy import Policy
from moderation.settings import Settings
from moderation.storage import S3Store


class Resources:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = S3Store(settings)
        self.detector = detector_from_settings(settings)
        self._kafka: AIOKafkaClient | None = None  # aiokafka objects must be made inside the event loop
        self._started = asyncio.Event()
        self._lock = asyncio.Lock()

    async def start(self) -> Pipeline:
        """Idempotent: the agent calls it on start; the detector waits for its model first."""
        async with self._lock:
            if not self._started.is_set():
                await self.store.start()
                self._kafka = AIOKafkaClient(**aiokafka_options(self.settings))
                await self._kafka.bootstrap()
                await self.detector.start()
                self._started.set()
        s = self.settings
        backoff = Backoff(deadline_s=s.event_deadline_s, cap_s=s.retry_backoff_max_s)
        return Pipeline(self.store, self.detector, Policy.from_settings(s), s.max_image_pixels, backoff)

    async def stop(self) -> None:
        async with self._lock:
            if self._started.is_set():
                await self.detector.stop()
                await self.store.stop()
                if self._kafka is not None:
                    await self._kafka.close()
                self._started.clear()

    async def readiness(self) -> dict[str, bool]:
        if not self._started.is_set():
            return {"started": False}
        kafka, s3, model = await asyncio.gather(self._kafka_ok(), self.store.reachable(), self.detector.ready())
        return {"kafka": kafka, "s3": s3, "model": model}

    async def _kafka_ok(self) -> bool:
        try:
            assert self._kafka is not None
            await self._kafka.fetch_all_metadata()
        except Exception:
            return False
        return True
