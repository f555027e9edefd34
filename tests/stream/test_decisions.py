"""Reviewer decisions: the worker turns each into its image's bank entry, and `moderation precision`
scores the model's fake calls per tenant against them. On the real broker, with the worker as deployed."""

from __future__ import annotations

import asyncio
import json
import time
from datetime import timedelta
from pathlib import Path

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
from typer.testing import CliRunner

from moderation.adapters.kafka import aiokafka_options
from moderation.cli.main import app
from moderation.devkit.demo import stop_worker
from moderation.events import BankEntry, DeadLetter, Decision, utcnow
from moderation.offline.precision import ALL, precision_report

SHA = "ab" * 32
PDQ = "f0" * 32


def decision(
    event_id: str, verdict: str, *, tenant: str | None = "t1", label: str = "fake", **extra: object
) -> Decision:
    fields: dict[str, object] = {
        "event_id": event_id,
        "image_sha256": SHA,
        "pdq": PDQ,
        "pdq_quality": 90,
        "tenant": tenant,
        "decision": verdict,
        "reviewer": "alice",
        "decided_at": utcnow(),
        "model_label": label,
        "model_score": 0.9 if label == "fake" else 0.3,
        "model_action": "flag" if label == "fake" else "review",
    }
    return Decision.model_validate(fields | extra)


def test_precision_counts_the_latest_decision_per_event_and_only_the_models_fake_calls() -> None:
    decisions = [
        decision("e1", "overturn_real"),
        decision("e1", "confirm_fake"),  # re-decided: the latest counts
        decision("e2", "overturn_real"),
        decision("e3", "confirm_fake", tenant="t2", model_action="review"),
        decision("e4", "escalate"),
        decision("e5", "confirm_fake", model_decided_by="provenance"),
        decision("e6", "overturn_real", label="real"),
    ]
    report = precision_report(decisions, "test")
    assert report.decisions == 6
    overall = next(t for t in report.tenants if t.tenant == ALL)
    assert (overall.overall.confirmed, overall.overall.overturned) == (2, 1)
    assert overall.overall.precision == pytest.approx(2 / 3)
    assert (
        overall.overall.escalated == 1 and overall.overall.not_the_models == 1 and overall.overall.model_said_real == 1
    )
    t1 = next(t for t in report.tenants if t.tenant == "t1")
    assert t1.overall.precision == pytest.approx(0.5) and t1.by_action["flag"].decided == 2
    assert next(t for t in report.tenants if t.tenant == "t2").by_action["review"].precision == 1.0
    assert json.loads(report.model_dump_json())["tenants"][0]["overall"]["precision"] == pytest.approx(2 / 3)
    assert "| t2 | review | 100.0% |" in report.markdown()


@pytest.mark.integration
@pytest.mark.slow
def test_a_decision_becomes_the_images_bank_entry_and_eval_reads_the_topic(lane, tmp_path: Path) -> None:
    settings = lane.settings
    sent = [
        decision("e1", "confirm_fake"),
        decision("e2", "escalate", image_sha256="cd" * 32),
        decision("e3", "overturn_real", image_sha256="ef" * 32, pdq=None, pdq_quality=None, tenant=None),
    ]

    async def produce() -> None:
        producer = AIOKafkaProducer(acks="all", **aiokafka_options(settings))
        await producer.start()
        try:
            for d in sent:
                await producer.send_and_wait(settings.topic_decisions, d.to_bytes(), key=d.event_id.encode())
            await producer.send_and_wait(settings.topic_decisions, b"not a decision", key=b"junk")
        finally:
            await producer.stop()

    async def bank(count: int, timeout_s: float = 120) -> list[BankEntry]:
        consumer = AIOKafkaConsumer(
            settings.topic_bank, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings)
        )
        await consumer.start()
        entries: list[BankEntry] = []
        deadline = time.monotonic() + timeout_s
        try:
            while len(entries) < count and time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    entries.extend(BankEntry.model_validate_json(r.value) for r in records)
        finally:
            await consumer.stop()
        return entries

    async def dead_letters(timeout_s: float = 60) -> list[tuple[bytes | None, DeadLetter, dict[str, bytes]]]:
        consumer = AIOKafkaConsumer(
            settings.topic_dlq, group_id=None, auto_offset_reset="earliest", **aiokafka_options(settings)
        )
        await consumer.start()
        deadline = time.monotonic() + timeout_s
        try:
            while time.monotonic() < deadline:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    r = records[0]
                    return [(r.key, DeadLetter.model_validate_json(r.value), dict(r.headers))]
            return []
        finally:
            await consumer.stop()

    worker = lane.worker()
    try:
        asyncio.run(produce())
        entries = asyncio.run(bank(2))
        letters = asyncio.run(dead_letters())
        assert lane.counter("moderation_decisions_refused_total") == 1
    finally:
        stop_worker(worker)
    assert {(e.event_id, e.label, e.decided_by) for e in entries} == {
        ("e1", "fake", "review"),
        ("e3", "real", "review"),
    }
    by_event = {e.event_id: e for e in entries}
    assert by_event["e1"].pdq == PDQ and by_event["e3"].pdq is None  # banked for its exact bytes only
    assert abs(by_event["e1"].decided_at - sent[0].decided_at) < timedelta(seconds=1)
    assert "decision refused" in lane.log()
    # The refused record is a dead letter like any other input's: its bytes, key, a stable reason, never replayed.
    [(key, letter, headers)] = letters
    assert key == b"junk" and letter.payload() == b"not a decision" and letter.reason == "invalid_event"
    assert letter.source_topic == settings.topic_decisions and not letter.retryable
    assert headers["moderation.dlq.reason"] == b"invalid_event"

    env_file = tmp_path / "stack.env"
    env_file.write_text("\n".join(f"{k}={v}" for k, v in lane.env.items()) + "\n")
    out = tmp_path / "decisions.json"
    result = CliRunner().invoke(app, ["precision", "topic", "--env-file", str(env_file), "--out", str(out)])
    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["decisions"] == 3 and report["tenants"][0]["overall"]["confirmed"] == 1
    assert "not Decision messages" in result.output
