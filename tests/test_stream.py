"""The headline: many uploads, good and bad, through a real worker on the real local stack."""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path

import jsonschema
import pytest
from aiokafka import AIOKafkaConsumer, TopicPartition

from moderation.client import event_message, publish, read_outcomes, upload_images
from moderation.demo import put_objects, stop_worker
from moderation.kafka import aiokafka_options
from moderation.samples import bad_uploads, write_samples
from moderation.settings import Settings

pytestmark = [pytest.mark.integration, pytest.mark.slow]
SCHEMAS = {
    name: json.loads((Path(__file__).parent.parent / "schemas" / f"{name}.schema.json").read_text())
    for name in ("verdict", "dead_letter")
}


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


def test_every_upload_gets_exactly_one_outcome_and_offsets_are_committed(lane, tmp_path: Path) -> None:
    settings = lane.settings
    bucket = settings.s3_allowed_buckets[0]
    images = write_samples(tmp_path / "images", 50)
    events = asyncio.run(upload_images(settings, images, bucket=bucket, tenant="t1"))
    bad = bad_uploads(bucket)
    for case in bad:
        put_objects(settings, bucket, case.objects)
    messages = [event_message(e) for e in events] + [c.message for c in bad]
    assert len(messages) >= 55 and len({c.reason for c in bad}) >= 5
    acked = asyncio.run(publish(settings, messages))
    # End offsets from the produce acks: Tansu 0.6's ListOffsets answers per record batch, not per record.
    ends = {p: 1 + max(m.offset for m in acked if m.partition == p) for p in {m.partition for m in acked}}

    worker = lane.worker(MODERATION_EXPLAIN_ABOVE="0.0")
    try:
        expected = {e.event_id for e in events} | {c.event_id for c in bad if c.event_id}
        outcomes = asyncio.run(read_outcomes(settings, expected, expected_anonymous=1, timeout_s=420))
        assert expected <= outcomes.decided(), f"no outcome for {expected - outcomes.decided()}\n{lane.log()[-3000:]}"
        committed = wait_for_commits(settings, ends)
    finally:
        stop_worker(worker)

    good_ids = {e.event_id for e in events}
    wrong = {
        eid: [(d.reason, d.detail) for d in outcomes.dead_letters[eid]] for eid in good_ids - set(outcomes.verdicts)
    }
    assert set(outcomes.verdicts) == good_ids, f"good uploads without a verdict: {wrong}"
    assert all(len(v) == 1 for v in outcomes.verdicts.values()), "exactly one verdict per event_id"
    reasons = {eid: letters for eid, letters in outcomes.dead_letters.items() if eid is not None}
    assert set(reasons) == {c.event_id for c in bad if c.event_id}
    for case in bad:
        if case.event_id is None:
            [letter] = outcomes.dead_letters[None]
        else:
            [letter] = reasons[case.event_id]
        assert letter.reason == case.reason, (case.name, letter.detail)
        assert letter.payload() == case.value, "dead letters carry the original bytes"
    for verdict in (v for vs in outcomes.verdicts.values() for v in vs):
        assert verdict.explanation and verdict.explanation.startswith("This is a")
        assert verdict.image.width in (640, 480) and verdict.tenant == "t1"
        assert verdict.model.name == settings.triton_model

    raw = asyncio.run(raw_messages(settings, settings.topic_verdicts))
    assert len(raw) == len(good_ids)
    for value in raw:
        jsonschema.validate(json.loads(value), SCHEMAS["verdict"])
    for value in asyncio.run(raw_messages(settings, settings.topic_dlq)):
        jsonschema.validate(json.loads(value), SCHEMAS["dead_letter"])
    flagged = {eid for eid, vs in outcomes.verdicts.items() if vs[0].action == "flag"}
    assert set(outcomes.flagged) == flagged and all(len(v) == 1 for v in outcomes.flagged.values())

    assert sum(ends.values()) == len(messages), "each message has its own offset"
    assert committed == ends, f"committed {committed} != end offsets {ends}"
    print(
        f"outcomes: {Counter(v[0].action for v in outcomes.verdicts.values())}, "
        f"dead letters: {Counter(str(c.reason) for c in bad)}"
    )
