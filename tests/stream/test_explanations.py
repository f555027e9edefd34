"""Explanations apart from verdicts, on the real stack: a worker and an explainer process, Tansu, SeaweedFS and
Triton serving `fakevlm` and `fakevlm_explain` with the tiny model."""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer
from confluent_kafka import Producer

from moderation.adapters.kafka import aiokafka_options
from moderation.client import Outcomes, read_explanations
from moderation.devkit.demo import stop_worker
from moderation.devkit.lanes import Lane, Published, committed_offsets, outcomes_for, publish_uploads
from moderation.errors import Reason
from moderation.events import DeadLetter, ExplainRequest, Explanation
from moderation.settings import Settings
from moderation.worker.explainer import explainer_group

pytestmark = [pytest.mark.integration, pytest.mark.slow]


async def records(settings: Settings, topic: str, timeout_s: float = 3.0) -> list[Any]:
    """Every record of `topic` so far, in each partition's order."""
    consumer = AIOKafkaConsumer(topic, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings))
    await consumer.start()
    try:
        found: list[Any] = []
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            batch = await consumer.getmany(timeout_ms=500)
            found += [r for part in batch.values() for r in part]
            if batch:
                deadline = time.monotonic() + 1.0
        return found
    finally:
        await consumer.stop()


def verdicts_out(lane: Lane, directory: Path, uploads: int) -> tuple[Published, Outcomes]:
    """`uploads` fresh images through a worker that asks an explanation of each, until every verdict is out."""
    published = publish_uploads(lane.settings, directory, uploads, with_bad=False)
    worker = lane.worker(MODERATION_EXPLAIN_ABOVE="0")
    try:
        return published, outcomes_for(lane.settings, published, timeout_s=240)
    finally:
        stop_worker(worker)


def test_verdicts_come_first_and_each_names_the_explanation_that_follows(lane: Lane, tmp_path: Path) -> None:
    settings = lane.settings
    published = publish_uploads(settings, tmp_path / "images", 8, with_bad=False)
    worker, explainer = lane.worker(MODERATION_EXPLAIN_ABOVE="0"), lane.explainer(MODERATION_EXPLAIN_ABOVE="0")
    try:
        outcomes = outcomes_for(settings, published, timeout_s=240)
        expected = {e.event_id for e in published.events}
        explained, failed = asyncio.run(read_explanations(settings, expected, timeout_s=240))
        scraped = lane.scrape("/metrics", name="explainer")[1]
    finally:
        stop_worker(worker)
        stop_worker(explainer)
    assert not failed and set(explained) == expected, lane.log("explainer")[-3000:]
    verdicts = {k: v[-1] for k, v in outcomes.verdicts.items()}
    assert all(v.explanation_requested and v.explanation is None for v in verdicts.values())
    decided = {r.key.decode(): r.timestamp for r in asyncio.run(records(settings, settings.topic_verdicts))}
    told = {r.key.decode(): r.timestamp for r in asyncio.run(records(settings, settings.topic_explanations))}
    assert all(decided[k] <= told[k] for k in expected), "an explanation was on its topic before its verdict"
    for event_id, explanation in explained.items():
        verdict = verdicts[event_id]
        assert (explanation.verdict_score, explanation.verdict_decided_at) == (verdict.score, verdict.decided_at)
        assert explanation.explanation.startswith("This is a") and explanation.model.weights == verdict.model.weights
    assert f'moderation_explanations_total{{outcome="explained",reason=""}} {float(len(expected))}' in scraped


def test_every_verdict_is_out_while_no_explainer_runs(lane: Lane, tmp_path: Path) -> None:
    """Explained or not, a verdict never waits for its explanation: with no explainer at all, every verdict of
    the batch is out, and the requests wait on their topic."""
    settings = lane.settings
    published, outcomes = verdicts_out(lane, tmp_path / "images", 6)
    assert set(outcomes.verdicts) == {e.event_id for e in published.events}
    requests = [
        ExplainRequest.model_validate_json(r.value)
        for r in asyncio.run(records(settings, settings.topic_explain_requests))
    ]
    assert {r.event_id for r in requests} == set(outcomes.verdicts)
    assert all(r.verdict == outcomes.verdicts[r.event_id][-1] for r in requests)


def test_a_killed_explainer_loses_no_explanation_request(lane: Lane, tmp_path: Path) -> None:
    settings = lane.settings
    published, _ = verdicts_out(lane, tmp_path / "images", 12)
    expected = {e.event_id for e in published.events}
    requests = asyncio.run(records(settings, settings.topic_explain_requests))
    ends = {p: 1 + max(r.offset for r in requests if r.partition == p) for p in {r.partition for r in requests}}

    first = lane.explainer("first", MODERATION_EXPLAIN_BATCH_SIZE="1")
    try:
        deadline = time.monotonic() + 180
        while not asyncio.run(records(settings, settings.topic_explanations, 1.0)) and time.monotonic() < deadline:
            time.sleep(0.2)
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    told_before = {r.key for r in asyncio.run(records(settings, settings.topic_explanations))}
    assert told_before, lane.log("first")[-3000:]

    second = lane.explainer("second", MODERATION_EXPLAIN_BATCH_SIZE="4")
    try:
        explained, failed = asyncio.run(read_explanations(settings, expected, timeout_s=240))
        committed: dict[int, int] = {}
        deadline = time.monotonic() + 60
        while committed != ends and time.monotonic() < deadline:
            group, topic = explainer_group(settings), settings.topic_explain_requests
            committed = asyncio.run(committed_offsets(settings, group=group, topic=topic))
            time.sleep(0.5)
    finally:
        stop_worker(second)
    assert not failed and set(explained) == expected, lane.log("second")[-3000:]
    assert all(isinstance(e, Explanation) for e in explained.values())
    assert committed == ends, "the explainer group committed every request once it was explained"


def test_records_that_are_no_request_are_dead_letters_and_the_explainer_goes_on(lane: Lane, tmp_path: Path) -> None:
    """What librdkafka may legally put on the requests topic (a tombstone, an empty value, bytes that are not
    JSON, binary keys and headers) ends as invalid_event letters with the original bytes; real requests around
    them are explained."""
    settings = lane.settings
    published, _ = verdicts_out(lane, tmp_path / "images", 3)
    hostile = [(b"\xff\x00", None), (None, b""), (b"k", b"\xff\xfe not json"), (b"k2", b'{"event_id": "x"}')]
    producer = Producer({"bootstrap.servers": settings.kafka_bootstrap_servers, "acks": "all"})
    for key, value in hostile:
        producer.produce(settings.topic_explain_requests, key=key, value=value, headers=[("h", b"\xff")])
    assert producer.flush(30) == 0
    explainer = lane.explainer()
    try:
        expected = {e.event_id for e in published.events}
        explained, failed = asyncio.run(read_explanations(settings, expected, timeout_s=240))
        letters: list[DeadLetter] = []
        deadline = time.monotonic() + 60
        while len(letters) < len(hostile) and time.monotonic() < deadline:
            values = [r.value for r in asyncio.run(records(settings, settings.topic_dlq, 1.0))]
            letters = [DeadLetter.model_validate_json(v) for v in values]
    finally:
        stop_worker(explainer)
    assert set(explained) == expected and not failed, lane.log("explainer")[-3000:]
    assert sorted(letter.payload() for letter in letters) == sorted(value or b"" for _, value in hostile)
    assert {letter.reason for letter in letters} == {Reason.INVALID_EVENT}
    assert [letter.payload_null for letter in letters].count(True) == 1
