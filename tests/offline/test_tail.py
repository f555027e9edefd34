"""`moderation tail` on the real local broker, and which Kafka clients that broker serves.

Records are produced with confluent-kafka (librdkafka), as a platform's own tooling would, and read by the
command (aiokafka) in both formats, from the beginning and from the end, with filters.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRecord, TopicPartition
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient
from typer.testing import CliRunner

from moderation.adapters.kafka import aiokafka_options
from moderation.cli.main import app
from moderation.devkit import localstack
from moderation.errors import Reason
from moderation.events import DeadLetter, ExplainRequest, Explanation, ImageInfo, ModelInfo, Timings, Verdict, utcnow
from moderation.offline.tail import Filters, line, read, to_json, topic_name
from moderation.settings import Settings

NOW = utcnow()
GARBAGE = b"\xff\xfe not json {"


def verdict(event_id: str, *, tenant: str | None, score: float, action: str) -> Verdict:
    return Verdict(
        event_id=event_id,
        bucket="uploads",
        key=f"{event_id}.png",
        tenant=tenant,
        image_sha256="a" * 64,
        label="fake" if score >= 0.5 else "real",
        score=score,
        action=action,  # type: ignore[arg-type]
        explanation="This is a fake image." if score >= 0.5 else None,
        model=ModelInfo(name="fakevlm", version="1", weights="sha256:" + "b" * 64),
        image=ImageInfo(width=64, height=48, format="PNG"),
        timings=Timings(fetch_ms=1, decode_ms=2, inference_ms=3, total_ms=6),
        decided_at=NOW,
    )


def dead_letter(event_id: str, reason: Reason) -> DeadLetter:
    return DeadLetter(
        event_id=event_id,
        reason=reason,
        detail=f"{reason} happened",
        retryable=reason == Reason.STORAGE_UNAVAILABLE,
        attempts=1,
        first_error_at=NOW,
        last_error_at=NOW,
        source_topic="uploads",
        source_partition=0,
        source_offset=7,
        payload_base64=base64.b64encode(b'{"event_id": "x"}').decode(),
    )


def explanation(item: Verdict, text: str, answer_label: str = "fake") -> Explanation:
    return Explanation(
        event_id=item.event_id,
        image_sha256=item.image_sha256,
        tenant=item.tenant,
        verdict_label=item.label,
        verdict_score=item.score,
        verdict_action=item.action,
        verdict_decided_at=item.decided_at,
        explanation=text,
        answer_label=answer_label,  # type: ignore[arg-type]
        model=item.model,
        requested_at=NOW,
        explained_at=NOW,
        explain_ms=812.0,
    )


def record(value: bytes | None, key: bytes | None = b"k", topic: str = "t") -> ConsumerRecord:  # type: ignore[type-arg]
    return ConsumerRecord(topic, 0, 5, 1_700_000_000_000, 0, key, value, None, 0, 0, [("h", b"\xff")])


# Pure logic: what a record is shown as, whatever it holds.


def test_aliases_name_the_settings_topics_and_any_other_name_passes_through() -> None:
    settings = Settings.model_validate({"topic_verdicts": "v", "topic_cache": "c"})
    assert [topic_name(n, settings) for n in ("verdicts", "cache", "dlq", "some.topic")] == [
        "v",
        "c",
        "moderation.dlq",
        "some.topic",
    ]


@pytest.mark.parametrize(
    ("value", "kind"),
    [
        (verdict("e1", tenant="acme", score=0.9, action="flag").to_bytes(), "verdict"),
        (dead_letter("e2", Reason.TOO_LARGE).to_bytes(), "dead_letter"),
        (
            explanation(verdict("e4", tenant="acme", score=0.9, action="flag"), "This is a fake image.").to_bytes(),
            "explanation",
        ),
        (
            ExplainRequest(
                event_id="e5", verdict=verdict("e5", tenant=None, score=0.7, action="review"), requested_at=NOW
            ).to_bytes(),
            "explain_request",
        ),
        (b'{"event_id": "e3", "action": "review", "decision": "keep"}', "json"),
        (b"[1, 2]", "raw"),
        (GARBAGE, "raw"),
        (b"[" * 100_000, "raw"),  # deeper than json.loads recurses
        (None, "null"),
    ],
)
def test_every_record_is_shown_in_both_formats_and_never_raises(value: bytes | None, kind: str) -> None:
    tailed = read(record(value, key=b"\x00\xffkey"))
    assert tailed.kind == kind
    shown = json.loads(to_json(tailed))
    assert shown["kind"] == kind and shown["key"] == "\x00\\xffkey" and shown["headers"] == {"h": "\\xff"}
    assert shown["time"] == "2023-11-14T22:13:20.000Z"
    assert line(tailed).plain.startswith("2023-11-14T22:13:20.000Z t[0]@5 key=\\x00\\xffkey")
    assert "\n" not in line(tailed).plain
    if kind == "raw":
        assert base64.b64decode(shown.get("raw_base64", "")) in (value, b"")
    else:
        assert shown["value"] == (json.loads(value) if value is not None else None)


def test_filters_match_any_of_their_values_and_all_of_the_filters() -> None:
    flagged = read(record(verdict("e1", tenant="acme", score=0.9, action="flag").to_bytes()))
    letter = read(record(dead_letter("e2", Reason.TOO_LARGE).to_bytes()))
    garbage = read(record(GARBAGE))
    assert Filters().match(garbage)
    assert Filters(tenants={"acme", "other"}, actions={"flag"}).match(flagged)
    assert not Filters(tenants={"acme"}, actions={"allow"}).match(flagged)
    assert Filters(reasons={"too_large"}).match(letter) and not Filters(reasons={"too_large"}).match(flagged)
    assert not Filters(tenants={"acme"}).match(garbage)
    flagged_verdict = verdict("e1", tenant="acme", score=0.9, action="flag")
    explained = read(record(explanation(flagged_verdict, "This is a real image.", "real").to_bytes()))
    assert Filters(tenants={"acme"}, actions={"flag"}).match(explained)  # the explained verdict's action
    assert "text disagrees" in line(explained).plain and "verdict fake 0.900" in line(explained).plain
    asked = read(record(ExplainRequest(event_id="e1", verdict=flagged_verdict, requested_at=NOW).to_bytes()))
    assert Filters(actions={"flag"}).match(asked) and not Filters(actions={"allow"}).match(asked)


# On the real broker.


def produce(bootstrap: str, records: list[tuple[str, bytes | None, bytes | None]]) -> None:
    """(topic, key, value) in order, with librdkafka; batched, as a real producer sends them."""
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 50})
    failures: list[object] = []
    for topic, key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=lambda e, _m: failures.append(e) if e else None)
    assert producer.flush(30) == 0 and not failures, failures


def env_file(lane, tmp_path: Path) -> Path:  # type: ignore[no-untyped-def]
    path = tmp_path / "stack.env"
    path.write_text("".join(f"{k}={v}\n" for k, v in lane.env.items()))
    return path


@pytest.fixture
def outcomes(lane, tmp_path: Path) -> tuple[Path, list[str]]:  # type: ignore[no-untyped-def]
    """Verdicts and dead letters (and two records that are neither) on the lane's topics; their event ids."""
    s = lane.settings
    records: list[tuple[str, bytes | None, bytes | None]] = [
        (s.topic_verdicts, b"v1", verdict("v1", tenant="acme", score=0.95, action="flag").to_bytes()),
        (s.topic_verdicts, b"v2", verdict("v2", tenant="acme", score=0.1, action="allow").to_bytes()),
        (s.topic_verdicts, b"v3", verdict("v3", tenant="other", score=0.9, action="flag").to_bytes()),
        (s.topic_verdicts, b"junk", GARBAGE),
        (s.topic_dlq, b"d1", dead_letter("d1", Reason.STORAGE_UNAVAILABLE).to_bytes()),
        (s.topic_dlq, b"d2", dead_letter("d2", Reason.INVALID_IMAGE).to_bytes()),
        (s.topic_dlq, b"tomb", None),
    ]
    produce(lane.info.kafka_bootstrap, records)
    return env_file(lane, tmp_path), ["v1", "v2", "v3", "d1", "d2"]


def invoke(*args: str) -> str:
    result = CliRunner().invoke(app, ["tail", *args])
    assert result.exit_code == 0, result.output
    return result.stdout


@pytest.mark.integration
def test_tail_shows_every_record_readably_and_as_json_lines(outcomes) -> None:  # type: ignore[no-untyped-def]
    env, ids = outcomes
    readable = invoke("verdicts", "dlq", "--from-beginning", "--limit", "7", "--env-file", str(env))
    lines = readable.splitlines()
    assert len(lines) == 7, readable
    by_key = {next(p for p in text.split() if p.startswith("key=")): text for text in lines}
    assert "flag" in by_key["key=v1"] and "tenant=acme" in by_key["key=v1"] and "0.950" in by_key["key=v1"]
    assert "storage_unavailable" in by_key["key=d1"] and "retryable attempts=1" in by_key["key=d1"]
    assert "raw" in by_key["key=junk"] and "(a tombstone)" in by_key["key=tomb"]

    as_json = [json.loads(text) for text in invoke("verdicts", "dlq", "--from-beginning", "--json", "--limit", "7",
                                                   "--env-file", str(env)).splitlines()]  # fmt: skip
    assert sorted(r["value"]["event_id"] for r in as_json if r["kind"] in ("verdict", "dead_letter")) == sorted(ids)
    junk = next(r for r in as_json if r["key"] == "junk")
    assert base64.b64decode(junk["raw_base64"]) == GARBAGE
    assert next(r for r in as_json if r["key"] == "tomb")["value"] is None


@pytest.mark.integration
def test_tail_filters_by_tenant_action_and_reason(outcomes) -> None:  # type: ignore[no-untyped-def]
    env, _ = outcomes

    def shown(*args: str, limit: int) -> list[str]:
        out = invoke(
            "verdicts", "dlq", "--from-beginning", "--json", "--limit", str(limit), "--env-file", str(env), *args
        )
        return sorted(json.loads(text)["value"]["event_id"] for text in out.splitlines())

    # Each filter lets its last matching record through, so a filter that let others pass would fill the limit
    # with them first.
    assert shown("--tenant", "acme", limit=2) == ["v1", "v2"]
    assert shown("--action", "flag", limit=2) == ["v1", "v3"]
    assert shown("--tenant", "acme", "--action", "flag", limit=1) == ["v1"]
    assert shown("--reason", "invalid_image", "--reason", "storage_unavailable", limit=2) == ["d1", "d2"]


@pytest.mark.integration
@pytest.mark.timeout(300)
def test_tail_follows_from_the_end(lane, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """Only what is written after it started, even when the last batch before it holds several records (Tansu
    answers ListOffsets short of such a batch's end)."""
    topic = lane.settings.topic_verdicts
    before = [(topic, b"old", verdict(f"old-{i}", tenant=None, score=0.2, action="allow").to_bytes()) for i in range(5)]
    produce(lane.info.kafka_bootstrap, before)
    command = [sys.executable, "-m", "moderation", "tail", "verdicts", "--json", "--limit", "2"]
    process = subprocess.Popen(
        [*command, "--env-file", str(env_file(lane, tmp_path))],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(Path(__file__).parents[2])},
    )
    try:
        assert process.stderr is not None
        said = [process.stderr.readline()]  # the command's own log lines may come first
        while said[-1] and not said[-1].startswith("Following"):
            said.append(process.stderr.readline())
        assert said[-1].startswith("Following"), "".join(said)
        after = [
            (topic, b"new", verdict(f"new-{i}", tenant=None, score=0.2, action="allow").to_bytes()) for i in range(2)
        ]
        produce(lane.info.kafka_bootstrap, after)
        out, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert [json.loads(text)["value"]["event_id"] for text in out.splitlines()] == ["new-0", "new-1"], err


@pytest.mark.integration
def test_an_unknown_topic_is_one_clear_error(lane, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    result = CliRunner().invoke(app, ["tail", "no-such-topic", "--env-file", str(env_file(lane, tmp_path))])
    assert result.exit_code == 2 and "topic no-such-topic does not exist" in result.output


@pytest.mark.integration
def test_the_embedded_broker_serves_librdkafka_and_aiokafka(stack: localstack.StackInfo) -> None:
    """What the README says about clients, measured: confluent-kafka (librdkafka 2.x) and aiokafka each read the
    metadata, produce, and consume what the other produced."""
    import asyncio

    bootstrap = stack.kafka_bootstrap
    topic = f"clients-{uuid.uuid4().hex[:10]}"
    asyncio.run(localstack.create_topics(bootstrap, [topic], 2))

    metadata = AdminClient({"bootstrap.servers": bootstrap}).list_topics(topic, timeout=30)
    assert metadata.topics[topic].error is None and len(metadata.topics[topic].partitions) == 2
    produce(bootstrap, [(topic, f"rd-{i}".encode(), f"from librdkafka {i}".encode()) for i in range(3)])

    async def aiokafka_side() -> list[bytes]:
        settings = Settings.model_validate({"kafka_bootstrap_servers": bootstrap})
        consumer = AIOKafkaConsumer(group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings))
        producer = AIOKafkaProducer(acks="all", **aiokafka_options(settings))
        await consumer.start()
        await producer.start()
        try:
            assert topic in await consumer.topics()
            assert consumer.partitions_for_topic(topic) == {0, 1}
            consumer.assign([TopicPartition(topic, p) for p in (0, 1)])
            seen: list[bytes] = []
            deadline = time.monotonic() + 30
            while len(seen) < 3 and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=500)).values():
                    seen += [r.value for r in records]
            for i in range(3):
                await producer.send_and_wait(topic, key=f"aio-{i}".encode(), value=f"from aiokafka {i}".encode())
            return seen
        finally:
            await producer.stop()
            await consumer.stop()

    assert sorted(asyncio.run(aiokafka_side())) == [f"from librdkafka {i}".encode() for i in range(3)]

    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"g-{topic}", "auto.offset.reset": "earliest"})
    consumer.subscribe([topic])
    values: list[bytes] = []
    deadline = time.monotonic() + 60
    try:
        while len(values) < 6 and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                values.append(message.value())
    finally:
        consumer.close()
    assert sorted(v for v in values if v.startswith(b"from aiokafka")) == [
        f"from aiokafka {i}".encode() for i in range(3)
    ]
