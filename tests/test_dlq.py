"""Dead-letter replay on the real broker: retryable letters go back byte for byte with their attempt
count, the cap holds, and a second replay repeats nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import pytest
from aiokafka import AIOKafkaConsumer

from moderation.client import publish, read_outcomes
from moderation.demo import stop_worker
from moderation.dlq import ATTEMPTS_HEADER, attempts_from, read_dead_letters, replay
from moderation.errors import Reason
from moderation.events import DeadLetter, utcnow
from moderation.kafka import aiokafka_options

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
        while len(mine := [d for d in asyncio.run(read_dead_letters(settings)) if d.event_id == "replayed-1"]) < 2:
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
