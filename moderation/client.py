"""The producer side and the outcome reader: what a platform team (and the demo, and the tests) use.

`upload_images` stores images in S3 and returns their upload events, `publish` sends them (keyed by
event_id, `event_message`), and `read_outcomes` reads the verdicts and dead-letter topics back until every
expected event_id has its outcome.
"""

from __future__ import annotations

import hashlib
import mimetypes
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from aiokafka.structs import RecordMetadata

from moderation.adapters.kafka import reader
from moderation.adapters.publisher import Publisher, Record
from moderation.adapters.s3 import s3_client_args
from moderation.errors import Reason
from moderation.events import DeadLetter, Explanation, UploadEvent, Verdict, utcnow
from moderation.settings import Settings

Outcome = Verdict | DeadLetter


async def upload_images(
    settings: Settings,
    files: Sequence[Path],
    *,
    bucket: str,
    prefix: str = "uploads/",
    tenant: str | None = None,
) -> list[UploadEvent]:
    """Put each file in S3 under a fresh key and return the upload event that describes it."""
    events = []
    async with get_session().create_client("s3", **s3_client_args(settings, AioConfig)) as s3:
        for path in files:
            data = path.read_bytes()
            event_id = uuid.uuid4().hex
            key = f"{prefix}{event_id}/{path.name}"
            content_type = mimetypes.guess_type(path.name)[0]
            await s3.put_object(
                Bucket=bucket, Key=key, Body=data, ContentType=content_type or "application/octet-stream"
            )
            events.append(
                UploadEvent(
                    schema_version=1,
                    event_id=event_id,
                    bucket=bucket,
                    key=key,
                    content_type=content_type,
                    size_bytes=len(data),
                    sha256=hashlib.sha256(data).hexdigest(),
                    tenant=tenant,
                    uploaded_at=utcnow(),
                    attributes={"filename": path.name[:1024]},
                )
            )
    return events


async def publish(
    settings: Settings, messages: Iterable[tuple[bytes | None, bytes]], *, topic: str | None = None
) -> list[RecordMetadata]:
    """Publish (key, value) pairs to the uploads topic; returns where the broker acknowledged each."""
    publisher = Publisher(settings)
    await publisher.start()
    try:
        return await publisher.publish([Record(topic or settings.topic_uploads, k, v) for k, v in messages])
    finally:
        await publisher.stop()


def event_message(event: UploadEvent) -> tuple[bytes, bytes]:
    return event.event_id.encode(), event.to_bytes()


@dataclass
class Outcomes:
    """Everything read back from the output topics, grouped by event_id."""

    verdicts: dict[str, list[Verdict]] = field(default_factory=lambda: defaultdict(list))
    dead_letters: dict[str | None, list[DeadLetter]] = field(default_factory=lambda: defaultdict(list))
    flagged: dict[str, list[Verdict]] = field(default_factory=lambda: defaultdict(list))

    def decided(self) -> set[str]:
        return set(self.verdicts) | {k for k in self.dead_letters if k is not None}

    def add(self, topic: str, value: bytes, settings: Settings) -> None:
        if topic == settings.topic_dlq:
            letter = DeadLetter.model_validate_json(value)
            self.dead_letters[letter.event_id].append(letter)
        else:
            verdict = Verdict.model_validate_json(value)
            (self.flagged if topic == settings.topic_flagged else self.verdicts)[verdict.event_id].append(verdict)


async def read_outcomes(
    settings: Settings,
    expected: set[str],
    *,
    expected_anonymous: int = 0,
    timeout_s: float = 300.0,
    on_progress: Callable[[int, int], None] | None = None,
) -> Outcomes:
    """Read the output topics from the start until every expected event_id (and the given number of
    dead letters without an event_id) has an outcome, or the timeout passes."""
    topics = (settings.topic_verdicts, settings.topic_flagged, settings.topic_dlq)
    consumer = reader(settings, *topics)
    outcomes = Outcomes()
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not _complete(outcomes, expected, expected_anonymous):
            batches = await consumer.getmany(timeout_ms=500)
            for records in batches.values():
                for record in records:
                    outcomes.add(record.topic, record.value, settings)
            if on_progress:
                on_progress(len(expected & outcomes.decided()), len(expected))
    finally:
        await consumer.stop()
    return outcomes


async def read_explanations(
    settings: Settings, expected: set[str], *, timeout_s: float = 300.0
) -> tuple[dict[str, Explanation], dict[str, DeadLetter]]:
    """Read the explanations topic (and the explanation_failed dead letters) from the start until every expected
    event_id has one or the other, or the timeout passes."""
    consumer = reader(settings, settings.topic_explanations, settings.topic_dlq)
    explained: dict[str, Explanation] = {}
    failed: dict[str, DeadLetter] = {}
    await consumer.start()
    try:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and not expected <= set(explained) | set(failed):
            for records in (await consumer.getmany(timeout_ms=500)).values():
                for record in records:
                    if record.topic == settings.topic_explanations:
                        explanation = Explanation.model_validate_json(record.value)
                        explained[explanation.event_id] = explanation
                    elif (letter := DeadLetter.model_validate_json(record.value)).reason == Reason.EXPLANATION_FAILED:
                        failed[letter.event_id or ""] = letter
    finally:
        await consumer.stop()
    return explained, failed


def _complete(outcomes: Outcomes, expected: set[str], anonymous: int) -> bool:
    return expected <= outcomes.decided() and len(outcomes.dead_letters.get(None, [])) >= anonymous
