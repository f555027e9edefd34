"""Dead-letter tooling on the real broker: retryable letters go back byte for byte with their attempt
count, the cap holds, a second replay repeats nothing, a replay for one reason hides no letter of
another, records that are not dead letters are reported and skipped, inspect shows the newest first,
and a transient letter from a real worker is replayable with the defaults and then gets its verdict."""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import re
import time

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

from moderation.adapters.deadletters import ATTEMPTS_HEADER, attempts_from
from moderation.adapters.kafka import aiokafka_options
from moderation.cli.dlq import replay_letters
from moderation.client import event_message, publish, read_outcomes, upload_images
from moderation.devkit.demo import stop_worker
from moderation.devkit.lanes import free_port, wait_for_commits
from moderation.devkit.samples import write_samples
from moderation.errors import Reason
from moderation.events import DeadLetter, Verdict, utcnow
from moderation.offline.dlq import read_dead_letters, replay, replay_group

pytestmark = pytest.mark.integration


def letter(event_id: str, reason: Reason, retryable: bool, attempts: int, payload: bytes) -> tuple[bytes, bytes]:
    now = utcnow()
    value = DeadLetter(
        event_id=event_id,
        reason=reason,
        detail="test",
        retryable=retryable,
        attempts=attempts,
        first_error_at=now,
        last_error_at=now,
        source_topic="uploads",
        source_partition=0,
        source_offset=0,
        payload_base64=base64.b64encode(payload).decode(),
    )
    return event_id.encode(), value.to_bytes()


async def uploads(settings) -> list[tuple[bytes, list[tuple[str, bytes]]]]:
    consumer = AIOKafkaConsumer(
        settings.topic_uploads, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings)
    )
    await consumer.start()
    try:
        got = []
        while batch := await consumer.getmany(timeout_ms=1500):
            got += [(r.value, list(r.headers)) for records in batch.values() for r in records]
        return got
    finally:
        await consumer.stop()


def letters_of(settings, event_id: str) -> list[DeadLetter]:
    """The dead letters of one event, oldest first."""
    stored = asyncio.run(read_dead_letters(settings, limit=10_000, newest_first=False))
    return [s.letter for s in stored if s.letter is not None and s.letter.event_id == event_id]


async def verdicts_for(settings, event_id: str, timeout_s: float) -> list[Verdict]:
    """The verdicts of one event, once there is one (or none after the timeout)."""
    consumer = AIOKafkaConsumer(
        settings.topic_verdicts, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings)
    )
    await consumer.start()
    try:
        found: list[Verdict] = []
        deadline = time.monotonic() + timeout_s
        while not found and time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=1000)
            verdicts = [Verdict.model_validate_json(r.value) for records in batch.values() for r in records]
            found += [v for v in verdicts if v.event_id == event_id]
        return found
    finally:
        await consumer.stop()


async def publish_raw(settings, records: list[tuple[bytes, bytes | None]]) -> None:
    """Records as any client may write them to the dead-letter topic, null values included, in order."""
    producer = AIOKafkaProducer(acks="all", **aiokafka_options(settings))
    await producer.start()
    try:
        for key, value in records:
            await producer.send_and_wait(settings.topic_dlq, value=value, key=key)
    finally:
        await producer.stop()


def test_replay_republishes_retryable_letters_under_the_cap_once(lane) -> None:
    settings = lane.settings
    missing = json.dumps(
        {"schema_version": 1, "event_id": "replayed-1", "bucket": settings.s3_allowed_buckets[0], "key": "nowhere.jpg"}
    ).encode()
    letters = [
        letter("replayed-1", Reason.STORAGE_UNAVAILABLE, True, 1, missing),
        letter("too-often", Reason.INFERENCE_UNAVAILABLE, True, 5, b"x"),
        letter("permanent", Reason.INVALID_IMAGE, False, 1, b"y"),
    ]
    asyncio.run(publish(settings, letters, topic=settings.topic_dlq))
    assert len(asyncio.run(read_dead_letters(settings))) == 3

    report = asyncio.run(replay(settings, max_attempts=5))
    assert (report.replayed, report.skipped, report.exhausted) == (1, 1, 1)
    [(value, headers)] = asyncio.run(uploads(settings))
    assert value == missing, "replay keeps the original bytes"
    assert attempts_from(headers) == 1 and (ATTEMPTS_HEADER, b"1") in headers
    assert asyncio.run(replay(settings, max_attempts=5)).replayed == 0, "a second replay repeats nothing"

    worker = lane.worker()
    try:
        deadline = time.monotonic() + 180
        while len(mine := letters_of(settings, "replayed-1")) < 2:
            assert time.monotonic() < deadline, lane.log()[-2000:]
            time.sleep(1)
    finally:
        stop_worker(worker)
    final = mine[-1]
    assert final.reason == Reason.OBJECT_MISSING and final.attempts == 2, "attempts add up across replays"


def test_an_oversized_message_gets_a_dead_letter_the_broker_accepts_and_the_worker_goes_on(lane) -> None:
    settings = lane.settings
    huge = b'{"schema_version": 1, "event_id": "huge", "padding": "' + b"x" * 900_000 + b'"}'
    after = json.dumps({"schema_version": 1, "event_id": "after", "bucket": "nope-bucket", "key": "k"}).encode()
    asyncio.run(publish(settings, [(b"huge", huge), (b"after", after)]))
    worker = lane.worker()
    try:
        outcomes = asyncio.run(read_outcomes(settings, {"huge", "after"}, timeout_s=120))
    finally:
        stop_worker(worker)
    [letter] = outcomes.dead_letters["huge"]
    assert letter.reason == Reason.INVALID_EVENT and not letter.retryable
    assert letter.payload() == huge[: len(letter.payload())] and len(letter.payload()) < len(huge)
    assert "payload cut to its first" in letter.detail
    [after_letter] = outcomes.dead_letters["after"]
    assert after_letter.reason == Reason.FORBIDDEN_BUCKET, "the worker kept going after the oversized message"


async def committed(settings, group: str) -> dict[int, int | None]:
    consumer = AIOKafkaConsumer(group_id=group, enable_auto_commit=False, **aiokafka_options(settings))
    await consumer.start()
    try:
        partitions = [TopicPartition(settings.topic_dlq, p) for p in range(settings.kafka_topic_partitions)]
        consumer.assign(partitions)
        return {tp.partition: await consumer.committed(tp) for tp in partitions}
    finally:
        await consumer.stop()


def test_a_replay_for_one_reason_hides_no_letter_of_another(lane) -> None:
    settings = lane.settings
    storage = [letter(f"s{i}", Reason.STORAGE_UNAVAILABLE, True, 1, f"s{i}".encode()) for i in range(4)]
    inference = [letter(f"i{i}", Reason.INFERENCE_UNAVAILABLE, True, 1, f"i{i}".encode()) for i in range(4)]
    # One key: every letter on one partition, the two reasons interleaved.
    mixed = [(b"one", value) for pair in zip(storage, inference, strict=True) for _, value in pair]
    asyncio.run(publish(settings, mixed, topic=settings.topic_dlq))

    first = asyncio.run(replay(settings, max_attempts=5, reasons={Reason.STORAGE_UNAVAILABLE}))
    assert (first.replayed, first.skipped) == (4, 4)
    second = asyncio.run(replay(settings, max_attempts=5, reasons={Reason.INFERENCE_UNAVAILABLE}))
    assert (second.replayed, second.skipped) == (4, 4), "the letters the first replay skipped are still there"
    third = asyncio.run(replay(settings, max_attempts=5))
    assert (third.replayed, third.earlier) == (0, 8), "every letter was dealt with once, none twice"
    assert sorted(value for value, _ in asyncio.run(uploads(settings))) == sorted(
        f"{kind}{i}".encode() for kind in "si" for i in range(4)
    )
    for reason in (Reason.STORAGE_UNAVAILABLE, Reason.INFERENCE_UNAVAILABLE):
        offsets = asyncio.run(committed(settings, replay_group(settings, reason)))
        assert sorted(o for o in offsets.values() if o) == [8], f"{reason}: committed to the end of its partition"


def test_records_that_are_not_dead_letters_are_reported_and_skipped(lane) -> None:
    settings = lane.settings
    good = letter("good", Reason.STORAGE_UNAVAILABLE, True, 1, b"good")
    bad_base64 = DeadLetter.model_validate_json(good[1]).model_copy(update={"payload_base64": "abc"}).to_bytes()
    records = [
        (b"k", None),  # a tombstone
        (b"k", b"not json"),
        (b"k", b'{"hello": "world"}'),
        (b"k", bad_base64),
        (b"k", good[1]),
    ]
    asyncio.run(publish_raw(settings, records))

    stored = asyncio.run(read_dead_letters(settings, newest_first=False))
    problems = [s.problem for s in stored]
    assert [s.letter is None for s in stored] == [True, True, True, True, False], problems
    assert "null value" in problems[0] and "not a dead letter" in problems[1] and "base64" in problems[3]
    assert all(s.where.startswith(f"{settings.topic_dlq}[") for s in stored)

    seen: list[str] = []
    report = asyncio.run(replay(settings, max_attempts=5, on_letter=lambda s, verdict: seen.append(verdict)))
    assert (report.malformed, report.replayed) == (4, 1) and seen == ["malformed"] * 4 + ["replayed"]
    assert [value for value, _ in asyncio.run(uploads(settings))] == [b"good"]


def test_inspect_shows_the_newest_first_and_is_bounded(lane) -> None:
    settings = lane.settings
    for i in range(6):  # one at a time: each its own broker timestamp
        asyncio.run(
            publish(settings, [letter(f"n{i}", Reason.INVALID_IMAGE, False, 1, b"x")], topic=settings.topic_dlq)
        )
        time.sleep(0.01)
    newest = asyncio.run(read_dead_letters(settings, limit=3))
    assert [s.letter.event_id for s in newest if s.letter] == ["n5", "n4", "n3"]
    oldest = asyncio.run(read_dead_letters(settings, limit=2, newest_first=False))
    assert [s.letter.event_id for s in oldest if s.letter] == ["n0", "n1"]


def test_a_transient_dead_letter_from_a_worker_is_replayed_with_the_defaults_and_gets_its_verdict(
    lane, tmp_path
) -> None:
    settings = lane.settings
    [event] = asyncio.run(
        upload_images(settings, write_samples(tmp_path / "images", 1), bucket=settings.s3_allowed_buckets[0])
    )
    [acked] = asyncio.run(publish(settings, [event_message(event)]))
    nowhere = f"http://127.0.0.1:{free_port()}"  # S3 away for the whole event deadline: several in-batch retries
    worker = lane.worker("s3-away", MODERATION_S3_ENDPOINT_URL=nowhere, MODERATION_EVENT_DEADLINE_S="25")
    try:
        deadline = time.monotonic() + 240
        while not (mine := letters_of(settings, event.event_id)):
            assert time.monotonic() < deadline, lane.log("s3-away")[-2000:]
            time.sleep(1)
        ends = {acked.partition: acked.offset + 1}
        assert wait_for_commits(settings, ends) == ends, "the original upload is done: only the replay comes back"
        _, metrics = lane.scrape()
        retried = re.search(r'^moderation_retries_total\{reason="storage_unavailable"\} (\S+)$', metrics, re.M)
        assert retried and float(retried.group(1)) >= 1, "the batch retried the event before its dead letter"
    finally:
        stop_worker(worker)
    [transient] = mine
    assert transient.reason == Reason.STORAGE_UNAVAILABLE and transient.retryable
    assert transient.attempts == 1, "attempts counts deliveries, not the retries within one batch"

    defaults = {name: p.default for name, p in inspect.signature(replay_letters).parameters.items()}
    report = asyncio.run(replay(settings, max_attempts=defaults["max_attempts"]))
    assert report.replayed == 1, "a transient letter is replayable with the CLI's default --max-attempts"

    worker = lane.worker("s3-back")
    try:
        verdicts = asyncio.run(verdicts_for(settings, event.event_id, timeout_s=180))
    finally:
        stop_worker(worker)
    [verdict] = verdicts
    assert verdict.key == event.key and len(letters_of(settings, event.event_id)) == 1
