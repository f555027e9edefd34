"""Shared steps of the stream tests: publish a mix of uploads, read what came out, check commits."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition

from moderation.client import Outcomes, event_message, publish, read_outcomes, upload_images
from moderation.devkit.demo import put_objects
from moderation.devkit.samples import BadUpload, bad_uploads, write_samples
from moderation.events import DeadLetter, UploadEvent, Verdict
from moderation.settings import Settings
from moderation.worker.kafka import aiokafka_options


@dataclass
class Published:
    events: list[UploadEvent]
    bad: list[BadUpload]
    ends: dict[int, int]  # partition -> offset after the last message, from the produce acks

    @property
    def expected(self) -> set[str]:
        return {e.event_id for e in self.events} | {c.event_id for c in self.bad if c.event_id}

    @property
    def anonymous(self) -> int:
        return sum(1 for c in self.bad if c.event_id is None)

    @property
    def count(self) -> int:
        return len(self.events) + len(self.bad)

    def add(self, more: Published) -> None:
        """Another wave into the same topic: its events, and the ends its acks reached."""
        self.events += more.events
        self.bad += more.bad
        for partition, end in more.ends.items():
            self.ends[partition] = max(end, self.ends.get(partition, 0))


def publish_uploads(
    settings: Settings,
    directory: Path,
    good: int,
    *,
    with_bad: bool = True,
    seed: int = 0,
    between: Callable[[], object] | None = None,
) -> Published:
    """Store `good` fresh images (and the bad cases' objects) in S3, then publish their events;
    `between` runs after the uploads and before the events are published (e.g. a fault)."""
    bucket = settings.s3_allowed_buckets[0]
    images = write_samples(directory, good, seed=seed)
    events = asyncio.run(upload_images(settings, images, bucket=bucket, tenant="t1"))
    bad = bad_uploads(bucket) if with_bad else []
    for case in bad:
        put_objects(settings, bucket, case.objects)
    if between is not None:
        between()
    acked = asyncio.run(publish(settings, [event_message(e) for e in events] + [c.message for c in bad]))
    # End offsets from the produce acks: Tansu 0.6's ListOffsets answers per record batch, not per record.
    ends = {p: 1 + max(m.offset for m in acked if m.partition == p) for p in {m.partition for m in acked}}
    return Published(events, bad, ends)


def outcomes_for(settings: Settings, published: Published, timeout_s: float = 420) -> Outcomes:
    return asyncio.run(
        read_outcomes(settings, published.expected, expected_anonymous=published.anonymous, timeout_s=timeout_s)
    )


def disagreements(outcomes: Outcomes) -> dict[str, list[str]]:
    """event_ids whose outcomes (after de-duplication by event_id) do not all say the same thing."""
    seen: dict[str, set[str]] = {}
    for event_id, verdicts in outcomes.verdicts.items():
        seen.setdefault(event_id, set()).update(_gist(v) for v in verdicts)
    for letter_id, letters in outcomes.dead_letters.items():
        if letter_id is not None:
            seen.setdefault(letter_id, set()).update(_gist(d) for d in letters)
    return {k: sorted(v) for k, v in seen.items() if len(v) > 1}


def duplicates(outcomes: Outcomes) -> int:
    counts = Counter({k: len(v) for k, v in outcomes.verdicts.items()})
    counts.update({k: len(v) for k, v in outcomes.dead_letters.items() if k is not None})
    return sum(n - 1 for n in counts.values())


def _gist(outcome: Verdict | DeadLetter) -> str:
    if isinstance(outcome, DeadLetter):
        return f"dead letter {outcome.reason}"
    return f"{outcome.label} {outcome.score:.4f} {outcome.action}"


async def raw_messages(settings: Settings, topic: str) -> list[bytes]:
    consumer = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings))
    await consumer.start()
    try:
        values: list[bytes] = []
        while batch := await consumer.getmany(timeout_ms=1500):
            values += [record.value for records in batch.values() for record in records]
        return values
    finally:
        await consumer.stop()


async def committed_offsets(settings: Settings) -> dict[int, int]:
    """The worker group's committed offsets on the uploads topic, read without joining the group."""
    consumer = AIOKafkaConsumer(
        group_id=settings.kafka_consumer_group, enable_auto_commit=False, **aiokafka_options(settings)
    )
    await consumer.start()
    try:
        await consumer.topics()
        partitions = sorted(consumer.partitions_for_topic(settings.topic_uploads) or ())
        committed = {p: await consumer.committed(TopicPartition(settings.topic_uploads, p)) for p in partitions}
        return {p: offset for p, offset in committed.items() if offset is not None}
    finally:
        await consumer.stop()


def wait_for_commits(settings: Settings, ends: dict[int, int], timeout_s: float = 60.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while (committed := asyncio.run(committed_offsets(settings))) != ends and time.monotonic() < deadline:
        time.sleep(1.0)
    return committed
