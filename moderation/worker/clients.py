"""The worker's clients: S3, the detector, the outcome publisher, the cache topic's producer and a Kafka
metadata client. Opened once, closed once, shared by the agent and the readiness probe; what is built
from them is assembled in `moderation.worker.app`."""

from __future__ import annotations

import asyncio

from aiokafka import AIOKafkaClient

from moderation.adapters.kafka import aiokafka_options
from moderation.adapters.publisher import Publisher
from moderation.adapters.s3 import S3Store
from moderation.errors import ModelError
from moderation.model.detectors import InProcessDetector, NullDetector, TritonDetector
from moderation.settings import Settings
from moderation.worker.cache import CacheFeed


class Clients:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.store = S3Store(settings)
        self.detector = detector_from_settings(settings)
        self.publisher = Publisher(settings)
        self.cache_feed = CacheFeed(settings)  # opened only with the cache on: its verdicts feed the topic
        self._kafka: AIOKafkaClient | None = None  # aiokafka objects must be made inside the event loop

    async def start(self) -> None:
        """Open every client; the detector waits for its model (Triton's readiness, or loading it here)."""
        await self.store.start()
        await self.publisher.start()
        self._kafka = AIOKafkaClient(**aiokafka_options(self.settings))
        await self._kafka.bootstrap()
        await self.detector.start()
        if self.settings.cache_max_entries:
            await self.cache_feed.start()

    async def stop(self) -> None:
        await self.detector.stop()
        await self.cache_feed.stop()
        await self.publisher.stop()
        await self.store.stop()
        if self._kafka is not None:
            await self._kafka.close()

    async def readiness(self) -> dict[str, bool]:
        kafka, s3, model = await asyncio.gather(self._kafka_ok(), self.store.reachable(), self.detector.ready())
        return {"kafka": kafka, "s3": s3, "model": model}

    async def explainer_readiness(self) -> dict[str, bool]:
        """The explainer's: the explain model instead of the verdict model."""
        checks = self._kafka_ok(), self.store.reachable(), self.detector.explain_ready()
        kafka, s3, model = await asyncio.gather(*checks)
        return {"kafka": kafka, "s3": s3, "explain_model": model}

    async def partitions(self, topic: str) -> set[int]:
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


def detector_from_settings(settings: Settings) -> TritonDetector | InProcessDetector | NullDetector:
    """The worker's detector, by MODERATION_DETECTOR. The in-process one needs MODERATION_CHECKPOINT: a
    worker never falls back to a test model, whose verdicts would mean nothing."""
    if settings.detector == "null":
        return NullDetector()
    if settings.detector == "inprocess":
        if not settings.checkpoint:
            raise ModelError(
                "MODERATION_DETECTOR=inprocess needs MODERATION_CHECKPOINT: the FakeVLM weights, a path or a hub id "
                "such as lingcco/fakeVLM (the worker never serves a test model)"
            )
        return InProcessDetector(
            settings.checkpoint,
            device=settings.device,
            batch_size=settings.batch_size,
            threshold=settings.label_threshold,
        )
    return TritonDetector(settings)
