"""The dead-letter topic: inspect it, and replay the retryable letters with an attempt count and a cap.

A replayed upload carries the number of attempts so far in the `moderation-attempts` header; the
worker adds to it, so a letter that keeps failing stops being replayed at `--max-attempts`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

from aiokafka import AIOKafkaConsumer, AIOKafkaProducer

from moderation.events import DeadLetter
from moderation.kafka import aiokafka_options
from moderation.settings import Settings

ATTEMPTS_HEADER = "moderation-attempts"
REPLAY_GROUP_SUFFIX = "-dlq-replay"


def attempts_from(headers: Mapping[str, bytes] | Iterable[tuple[str, bytes]] | None) -> int:
    """Attempts recorded on a replayed message; 0 for a first delivery or an unreadable header."""
    pairs = headers.items() if isinstance(headers, Mapping) else (headers or ())
    for name, value in pairs:
        if name == ATTEMPTS_HEADER:
            try:
                return max(0, int(value))
            except ValueError:
                return 0
    return 0


async def read_dead_letters(settings: Settings, *, limit: int | None = None) -> list[DeadLetter]:
    """Every dead letter on the topic, oldest first (no consumer group: reading commits nothing)."""
    consumer = AIOKafkaConsumer(
        settings.topic_dlq, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings)
    )
    await consumer.start()
    try:
        letters: list[DeadLetter] = []
        while (batch := await consumer.getmany(timeout_ms=1000)) and (limit is None or len(letters) < limit):
            letters += [DeadLetter.model_validate_json(r.value) for records in batch.values() for r in records]
        return letters[:limit]
    finally:
        await consumer.stop()


@dataclass
class ReplayReport:
    replayed: int = 0
    skipped: int = 0
    exhausted: int = 0


async def replay(
    settings: Settings,
    *,
    max_attempts: int,
    reasons: set[str] | None = None,
    dry_run: bool = False,
    on_letter: Callable[[DeadLetter, str], None] | None = None,
) -> ReplayReport:
    """Re-publish retryable dead letters (under `max_attempts`) to the uploads topic, byte for byte.

    A consumer group remembers how far replay got, so running it again replays only newer letters.
    """
    group = settings.kafka_consumer_group + REPLAY_GROUP_SUFFIX
    consumer = AIOKafkaConsumer(
        settings.topic_dlq,
        group_id=group,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        **aiokafka_options(settings),
    )
    producer = AIOKafkaProducer(acks="all", **aiokafka_options(settings))
    report = ReplayReport()
    await consumer.start()
    await producer.start()
    try:
        while batch := await consumer.getmany(timeout_ms=2000):
            for records in batch.values():
                for record in records:
                    letter = DeadLetter.model_validate_json(record.value)
                    verdict = _decide(letter, max_attempts, reasons)
                    setattr(report, verdict, getattr(report, verdict) + 1)
                    if on_letter:
                        on_letter(letter, verdict)
                    if verdict == "replayed" and not dry_run:
                        await _republish(producer, settings, letter)
            if not dry_run:
                await consumer.commit()
    finally:
        await producer.stop()
        await consumer.stop()
    return report


def _decide(letter: DeadLetter, max_attempts: int, reasons: set[str] | None) -> str:
    if not letter.retryable or (reasons is not None and letter.reason not in reasons):
        return "skipped"
    return "exhausted" if letter.attempts >= max_attempts else "replayed"


async def _republish(producer: AIOKafkaProducer, settings: Settings, letter: DeadLetter) -> None:
    key = letter.event_id.encode() if letter.event_id else None
    headers = [(ATTEMPTS_HEADER, str(letter.attempts).encode())]
    await producer.send_and_wait(settings.topic_uploads, value=letter.payload(), key=key, headers=headers)
