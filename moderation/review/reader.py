"""Follow the review, explanations and decisions topics from their start into a `ReviewQueue`, without a
consumer group.

Every console replica reads both topics whole (the queue is small next to the verdicts topic) and
commits nothing: it only shows state, the decisions topic is the record. A record that is neither a
Verdict nor a Decision is logged with its `topic[partition]@offset` and skipped, never fatal.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import ConsumerRecord
from pydantic import ValidationError

from moderation.adapters.kafka import reader, where
from moderation.events import Decision, Explanation, Verdict
from moderation.review.queue import ReviewQueue
from moderation.settings import Settings

log = logging.getLogger(__name__)


class QueueReader:
    """The background task that keeps the queue current; `caught_up` once a fetch came back empty."""

    def __init__(self, settings: Settings, queue: ReviewQueue) -> None:
        self._settings = settings
        self._queue = queue
        self.caught_up = asyncio.Event()
        self.failure: BaseException | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="review-queue-reader")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)

    @property
    def alive(self) -> bool:
        return self._task is not None and not self._task.done()

    async def _run(self) -> None:
        topics = (self._settings.topic_review, self._settings.topic_decisions, self._settings.topic_explanations)
        # metadata_max_age_ms: topics created after the console started show up within this
        consumer = reader(self._settings, *topics, metadata_max_age_ms=30_000)
        try:
            await consumer.start()
            while True:
                batches = await consumer.getmany(timeout_ms=1000)
                for records in batches.values():
                    for record in records:
                        self.apply(record)
                if not batches:
                    self.caught_up.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # recorded for /healthz, which turns red so that the pod restarts
            self.failure = exc
            log.exception("the review queue reader stopped")
        finally:
            await consumer.stop()

    def apply(self, record: ConsumerRecord[bytes, bytes]) -> None:
        if record.value is None:
            return  # a tombstone: nothing to show
        try:
            if record.topic == self._settings.topic_decisions:
                self._queue.add_decision(Decision.model_validate_json(record.value))
            elif record.topic == self._settings.topic_explanations:
                self._queue.add_explanation(Explanation.model_validate_json(record.value))
            else:
                self._queue.add_verdict(Verdict.model_validate_json(record.value))
        except ValidationError as exc:
            log.warning(
                "skipped a record that is not a %s: %s",
                _kind(record.topic, self._settings),
                exc.errors()[:3],
                extra={"where": where(record.topic, record.partition, record.offset)},
            )


def _kind(topic: str, settings: Settings) -> str:
    kinds = {settings.topic_decisions: "Decision", settings.topic_explanations: "Explanation"}
    return kinds.get(topic, "Verdict")
