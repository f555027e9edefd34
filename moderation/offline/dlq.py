"""The dead-letter topic: inspect it, and replay the retryable letters with an attempt count and a cap.

A replayed upload carries the number of deliveries so far in the `moderation-attempts` header; the
worker's dead letter for it counts one more, so a letter that keeps failing stops being replayed once
its `attempts` reaches `--max-attempts`.

Replay never hides a letter. Its progress is kept per reason code, in one consumer group per
retryable reason (`<group>-dlq-replay.<reason>`), committed without joining the group. A replay of
reasons R reads each partition from the lowest committed offset among R's groups, up to the end
offsets it saw when it started, and moves only R's groups, to the end it read: every letter of a
reason in R below that point was replayed, or can never be (not retryable, or at the cap). Letters of
other reasons are read and skipped, but their groups do not move, so a later replay for their reason
still finds them. A letter at the cap stays final for replay (a higher `--max-attempts` later does not
bring it back: stopping it from being replayed again and again is what the cap is for); `dlq inspect`
still shows it. Run one replay at a time: two at once may replay the same letters twice (duplicates,
never loss).

A record on the topic that is not a dead letter (a null value, bytes that are not JSON, JSON that is not
a DeadLetter, a payload that is not base64) is reported with its `topic[partition]@offset` and why,
and skipped: it never stops `inspect` or `replay`.
"""

from __future__ import annotations

import binascii
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError

from moderation.adapters.deadletters import ATTEMPTS_HEADER, DLQ_HEADER_PREFIX
from moderation.adapters.kafka import Received, aiokafka_options, high_watermarks, partitions, read_range, reader
from moderation.adapters.publisher import Publisher, Record
from moderation.errors import RETRYABLE, Reason
from moderation.events import DeadLetter
from moderation.settings import Settings

log = logging.getLogger(__name__)

REPLAY_GROUP_SUFFIX = "-dlq-replay"


@dataclass(frozen=True)
class Stored(Received):
    """One record of the dead-letter topic: its letter, or why it is not one (`problem`)."""

    letter: DeadLetter | None = None
    problem: str = ""


def parse(record: ConsumerRecord[Any, Any]) -> Stored:
    """The record as a dead letter, or why it is not one. Never raises."""
    letter, problem = None, ""
    if record.value is None:
        problem = "null value (a tombstone), not a dead letter"
    else:
        try:
            letter = DeadLetter.model_validate_json(record.value)
            letter.payload()
        except ValidationError as exc:
            letter, problem = None, f"not a dead letter: {_first_error(exc)}"
        except (binascii.Error, ValueError) as exc:
            letter, problem = None, f"payload_base64 is not base64: {exc}"
    return Stored.of(record, letter=letter, problem=problem)


def _first_error(exc: ValidationError) -> str:
    error = exc.errors(include_url=False, include_input=False)[0]
    where = ".".join(str(part) for part in error["loc"])
    return f"{where}: {error['msg']}" if where else error["msg"]


async def read_dead_letters(settings: Settings, *, limit: int = 100, newest_first: bool = True) -> list[Stored]:
    """At most `limit` records of the dead-letter topic, the newest (or oldest) first, malformed ones
    included with their problem. Reads at most `limit` records per partition; commits nothing."""
    consumer = reader(settings)
    await consumer.start()
    try:
        tps = await partitions(consumer, settings.topic_dlq)
        first, end = await consumer.beginning_offsets(tps), await high_watermarks(consumer, tps)
        start = {tp: max(first[tp], end[tp] - limit) if newest_first else first[tp] for tp in tps}
        stop = {tp: min(end[tp], start[tp] + limit) for tp in tps}
        stored = [parse(r) async for batch in read_range(consumer, start, stop) for r in batch]
    finally:
        await consumer.stop()
    stored.sort(key=lambda s: (s.timestamp_ms, s.partition, s.offset), reverse=newest_first)
    return stored[:limit]


@dataclass
class ReplayReport:
    replayed: int = 0
    skipped: int = 0
    exhausted: int = 0
    malformed: int = 0
    earlier: int = 0  # letters of the chosen reasons that an earlier replay already dealt with


async def replay(
    settings: Settings,
    *,
    max_attempts: int,
    reasons: set[Reason] | None = None,
    dry_run: bool = False,
    on_letter: Callable[[Stored, str], None] | None = None,
) -> ReplayReport:
    """Re-publish retryable dead letters of `reasons` (default: every retryable reason) with fewer than
    `max_attempts` deliveries to where they came from (the uploads topic; an explanation_failed letter's
    explain-requests topic), byte for byte, keyed as on the dead-letter topic.
    Progress per reason: see the module docstring. `on_letter(stored, verdict)` sees every record read,
    verdict one of replayed, skipped, exhausted, malformed, earlier."""
    chosen = sorted(RETRYABLE & reasons if reasons is not None else RETRYABLE)
    report = ReplayReport()
    if not chosen:
        return report
    letters = reader(settings)
    groups = {reason: _progress_consumer(settings, reason) for reason in chosen}
    producer = Publisher(settings)
    for client in (letters, *groups.values(), producer):
        await client.start()
    try:
        tps = await partitions(letters, settings.topic_dlq)
        first, end = await letters.beginning_offsets(tps), await high_watermarks(letters, tps)
        done = {reason: await _committed(group, tps, first) for reason, group in groups.items()}
        start = {tp: min(done[reason][tp] for reason in chosen) for tp in tps}
        async for batch in read_range(letters, start, end):
            for record in batch:
                stored = parse(record)
                verdict = _decide(stored, max_attempts, done, chosen)
                setattr(report, verdict, getattr(report, verdict) + 1)
                if verdict == "malformed":
                    log.warning("skipped %s: %s", stored.where, stored.problem)
                if on_letter:
                    on_letter(stored, verdict)
                if verdict == "replayed" and not dry_run:
                    await _republish(producer, settings, stored)
            if batch and not dry_run:  # each group past what it dealt with, never back
                tp = TopicPartition(batch[0].topic, batch[0].partition)
                reached = batch[-1].offset + 1
                for reason, group in groups.items():
                    if reached > done[reason][tp]:
                        await group.commit({tp: reached})
                        done[reason][tp] = reached
    finally:
        for client in (producer, *groups.values(), letters):
            await client.stop()
    return report


def _decide(
    stored: Stored, max_attempts: int, done: dict[Reason, dict[TopicPartition, int]], chosen: list[Reason]
) -> str:
    letter = stored.letter
    if letter is None:
        return "malformed"
    if letter.reason not in chosen:
        return "skipped"  # its own reason's group does not move: a replay for that reason finds it
    if stored.offset < done[letter.reason][TopicPartition(stored.topic, stored.partition)]:
        return "earlier"
    if not letter.retryable:
        return "skipped"
    return "exhausted" if letter.attempts >= max_attempts else "replayed"


def replay_group(settings: Settings, reason: Reason) -> str:
    return f"{settings.kafka_consumer_group}{REPLAY_GROUP_SUFFIX}.{reason}"


def _progress_consumer(settings: Settings, reason: Reason) -> AIOKafkaConsumer:
    """A consumer that only reads and commits its group's offsets: it is given partitions, never joins."""
    return AIOKafkaConsumer(
        group_id=replay_group(settings, reason), enable_auto_commit=False, **aiokafka_options(settings)
    )


async def _committed(
    group: AIOKafkaConsumer, partitions: list[TopicPartition], first: dict[TopicPartition, int]
) -> dict[TopicPartition, int]:
    group.assign(partitions)
    committed = {tp: await group.committed(tp) for tp in partitions}
    return {tp: max(committed[tp] or 0, first[tp]) for tp in partitions}  # retention may have moved the start


async def _republish(producer: Publisher, settings: Settings, stored: Stored) -> None:
    """The original record again: its key, value and headers (the dead letter's own headers dropped), with the
    deliveries so far in ATTEMPTS_HEADER."""
    letter = stored.letter
    assert letter is not None, "only letters are replayed"
    kept = [(n, v) for n, v in stored.headers if not n.startswith(DLQ_HEADER_PREFIX) and n != ATTEMPTS_HEADER]
    headers = [*kept, (ATTEMPTS_HEADER, str(letter.attempts).encode())]
    value = None if letter.payload_null else letter.payload()
    await producer.publish([Record(replay_topic(settings, letter), stored.key, value, headers)])


def replay_topic(settings: Settings, letter: DeadLetter) -> str:
    """Where a letter's record goes back to: an explanation request to the explainer's queue, anything else
    (whatever topic a letter claims) to the uploads topic, never to a topic a writer of the dlq could pick."""
    if letter.reason == Reason.EXPLANATION_FAILED and letter.source_topic == settings.topic_explain_requests:
        return settings.topic_explain_requests
    return settings.topic_uploads
