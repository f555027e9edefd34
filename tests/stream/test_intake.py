"""Every record a Kafka client may legally send gets exactly one outcome, and the stream goes on.

The producer is Confluent's own client (librdkafka), as most platform backends use: it also proves the
embedded broker serves librdkafka clients. Good uploads are interleaved with records no schema allows
but Kafka does: null and empty values, tombstones, odd binary keys, null and non-UTF-8 header values.
"""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer

from moderation.adapters.deadletters import ATTEMPTS_HEADER
from moderation.client import upload_images
from moderation.devkit.lanes import wait_for_commits
from moderation.devkit.samples import write_samples
from moderation.events import DeadLetter, Verdict

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# (key, value, headers) of records no upload schema allows but any Kafka client may send.
ODD_RECORDS: list[tuple[bytes | None, bytes | None, list[tuple[str, bytes | None]]]] = [
    (b"tombstone-key", None, []),  # a tombstone
    (None, None, []),  # null key, null value
    (b"empty-value", b"", []),
    (b"\x00\xff\x80binary-key", b"\xff\xd8\xff\xe0 not json", [("trace", b"\xff\xfe\xfd")]),
    (b"null-header", b'{"schema_version": 1}', [("x-null", None), ("x-bytes", b"\xc3\x28")]),
    (b"json-null", b"null", [(ATTEMPTS_HEADER, None)]),
]


def produce(bootstrap: str, topic: str, records: list[tuple[bytes | None, bytes | None, list]]) -> dict[int, int]:
    """Produce with librdkafka, one record at a time in order; returns partition -> end offset from the acks."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "enable.idempotence": False})
    acked: list[tuple[int, int]] = []

    def delivered(error, message) -> None:  # type: ignore[no-untyped-def]
        assert error is None, error
        acked.append((message.partition(), message.offset()))

    for key, value, headers in records:
        producer.produce(topic, value=value, key=key, headers=headers or None, on_delivery=delivered)
    assert producer.flush(30) == 0
    assert len(acked) == len(records)
    return {p: 1 + max(o for q, o in acked if q == p) for p in {p for p, _ in acked}}


def consume_all(bootstrap: str, topics: list[str], count: int, timeout_s: float = 300) -> list:  # type: ignore[type-arg]
    """Read `count` records from the topics with librdkafka (no commits)."""
    import time

    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"reader-{time.time_ns()}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe(topics)
    records: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    try:
        while len(records) < count and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                records.append(message)
    finally:
        consumer.close()
    return records


def test_odd_records_from_librdkafka_get_one_outcome_each_and_the_stream_goes_on(
    running_worker, tmp_path: Path
) -> None:
    lane = running_worker
    settings, bootstrap = lane.settings, lane.info.kafka_bootstrap
    bucket = settings.s3_allowed_buckets[0]
    events = asyncio.run(upload_images(settings, write_samples(tmp_path / "images", 30), bucket=bucket))
    good = [(e.event_id.encode(), e.to_bytes(), []) for e in events]
    # A good upload may carry unreadable headers too: they are passed through, and it gets its verdict.
    good[0] = (good[0][0], good[0][1], [(ATTEMPTS_HEADER, None), ("x-null", None)])
    good[1] = (good[1][0], good[1][1], [(ATTEMPTS_HEADER, b"\xff\xfe"), ("x-bytes", b"\xff")])
    mixed = []
    for i, record in enumerate(good):
        mixed.append(record)
        if i % 5 == 0 and i // 5 < len(ODD_RECORDS):
            mixed.append(ODD_RECORDS[i // 5])
    ends = produce(bootstrap, settings.topic_uploads, mixed)

    out = consume_all(bootstrap, [settings.topic_verdicts, settings.topic_dlq], len(mixed))
    verdicts = [Verdict.model_validate_json(m.value()) for m in out if m.topic() == settings.topic_verdicts]
    letters = [(m, DeadLetter.model_validate_json(m.value())) for m in out if m.topic() == settings.topic_dlq]
    assert {v.event_id for v in verdicts} == {e.event_id for e in events}, lane.log()[-3000:]
    assert len(letters) == len(ODD_RECORDS)

    # Kafka's dead-letter conventions: the original key and headers, plus where it came from and why.
    by_key = {m.key(): (m, letter) for m, letter in letters}
    assert set(by_key) == {key for key, _, _ in ODD_RECORDS}
    for key, value, headers in ODD_RECORDS:
        message, letter = by_key[key]
        assert letter.reason == "invalid_event" and not letter.retryable, letter
        assert letter.payload() == (value or b"")
        assert letter.payload_null == (value is None)
        got = dict(message.headers() or [])
        for name, header in headers:
            if name != ATTEMPTS_HEADER:
                assert got[name] == header, (name, got)
        assert got["moderation.dlq.reason"] == b"invalid_event"
        assert got["moderation.dlq.topic"] == settings.topic_uploads.encode()
        assert int(got["moderation.dlq.partition"]) == letter.source_partition
        assert int(got["moderation.dlq.offset"]) == letter.source_offset
        assert json.loads(got["moderation.dlq.retryable"]) is False

    assert wait_for_commits(settings, ends) == ends
    assert lane.scrape("/live")[0] == 200
