"""OpenTelemetry: an upload's W3C trace context is continued through fetch, decode, inference and publish,
and every outcome record carries it on; configured only by the standard OTEL_* variables, off by default.

Uploads are produced with librdkafka (confluent-kafka) carrying a producer span's `traceparent`, as a
platform backend instrumented with OpenTelemetry would send them, against the real local stack.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from confluent_kafka import Consumer, Producer
from opentelemetry import propagate, trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from typer.testing import CliRunner

from moderation.cli.main import app as command
from moderation.client import upload_images
from moderation.devkit.demo import stop_worker
from moderation.devkit.samples import write_samples
from moderation.events import UploadEvent, Verdict
from moderation.worker import app, tracing
from moderation.worker.clients import Clients
from moderation.worker.pipeline import Incoming
from moderation.worker.policies import Policies

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STAGES = {"s3 fetch", "decode", "inference", "publish"}


@pytest.fixture(scope="module")
def spans() -> Iterator[InMemorySpanExporter]:
    """The SDK with an in-memory exporter, as `tracing.configure` installs it from OTEL_TRACES_EXPORTER."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    trace.set_tracer_provider(provider)  # once per process: the API refuses a second provider
    yield exporter
    exporter.clear()


def traced_uploads(events: list[UploadEvent]) -> tuple[list[tuple[bytes, bytes, list]], dict[str, int]]:
    """Each upload as a record with its own producer span's context, and that span's trace id by event."""
    producer_tracer = trace.get_tracer("a-platform-backend")
    records, trace_ids = [], {}
    for event in events:
        with producer_tracer.start_as_current_span("uploads send", kind=trace.SpanKind.PRODUCER) as span:
            carrier: dict[str, str] = {}
            propagate.inject(carrier)
        trace_ids[event.event_id] = span.get_span_context().trace_id
        records.append((event.event_id.encode(), event.to_bytes(), [(k, v.encode()) for k, v in carrier.items()]))
    return records, trace_ids


def produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes, list]]) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all"})
    for key, value, headers in records:
        producer.produce(topic, value=value, key=key, headers=headers)
    assert producer.flush(30) == 0


def consume(bootstrap: str, topic: str, count: int, timeout_s: float = 240) -> list:  # type: ignore[type-arg]
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"reader-{time.time_ns()}", "auto.offset.reset": "earliest"}
    )
    consumer.subscribe([topic])
    out: list = []  # type: ignore[type-arg]
    deadline = time.monotonic() + timeout_s
    try:
        while len(out) < count and time.monotonic() < deadline:
            message = consumer.poll(1.0)
            if message is not None and message.error() is None:
                out.append(message)
    finally:
        consumer.close()
    return out


def trace_id_of(headers: list[tuple[str, bytes]] | None) -> int:
    """The trace id of a record's `traceparent` (version-traceid-spanid-flags)."""
    value = dict(headers or [])["traceparent"].decode()
    return int(value.split("-")[1], 16)


def as_incoming(message) -> Incoming:  # type: ignore[no-untyped-def]
    return Incoming(
        value=message.value(),
        topic=message.topic(),
        partition=message.partition(),
        offset=message.offset(),
        key=message.key(),
        headers=tuple(message.headers() or ()),
    )


def test_one_trace_per_event_from_the_producer_to_the_outcome(
    lane, spans: InMemorySpanExporter, tmp_path: Path
) -> None:
    settings, bootstrap = lane.settings, lane.info.kafka_bootstrap
    events = asyncio.run(upload_images(settings, write_samples(tmp_path, 4), bucket=settings.s3_allowed_buckets[0]))
    records, trace_ids = traced_uploads(events)
    produce(bootstrap, settings.topic_uploads, records)
    consumed = [as_incoming(m) for m in consume(bootstrap, settings.topic_uploads, len(records))]
    spans.clear()

    async def moderate() -> None:
        clients = Clients(settings)
        worker = await app.start(settings, clients, Policies.from_settings(settings))
        try:
            await app.moderate_and_publish(settings, worker, clients, consumed)  # the agent's own batch step
        finally:
            await worker.stop()
            await clients.stop()

    asyncio.run(moderate())

    outcomes = consume(bootstrap, settings.topic_verdicts, len(events))
    by_event = {Verdict.model_validate_json(m.value()).event_id: m for m in outcomes}
    assert set(by_event) == set(trace_ids)
    finished = spans.get_finished_spans()
    for event_id, trace_id in trace_ids.items():
        assert trace_id_of(by_event[event_id].headers()) == trace_id  # the outcome record carries it on
        ours = [s for s in finished if s.context.trace_id == trace_id]
        process = [s for s in ours if s.name == f"{settings.topic_uploads} process"]
        assert len(process) == 1 and process[0].kind == trace.SpanKind.CONSUMER
        assert process[0].attributes["moderation.event_id"] == event_id
        assert process[0].parent is not None and process[0].parent.is_remote  # the producer's span
        children = {s.name: s for s in ours if s.parent is not None and s.parent.span_id == process[0].context.span_id}
        assert set(children) == STAGES, sorted(s.name for s in ours)
        # The outcome's traceparent names the event's own span: a consumer of verdicts continues from it.
        assert dict(by_event[event_id].headers())["traceparent"].decode().split("-")[2] == format(
            process[0].context.span_id, "016x"
        )
    # One trace per event: no span of ours outside the producers' traces.
    assert {s.context.trace_id for s in finished if s.name in STAGES} == set(trace_ids.values())


def test_a_malformed_traceparent_is_no_context_and_no_dead_letter() -> None:
    for value in (b"00-zz-yy-01", b"\xff\xfe", None, b""):
        ctx = tracing.extracted((("traceparent", value), ("x-other", b"1")))
        assert not trace.get_current_span(ctx).get_span_context().is_valid


def test_the_worker_continues_the_trace_with_tracing_off_and_exports_spans_with_it_on(lane, tmp_path: Path) -> None:
    settings, bootstrap = lane.settings, lane.info.kafka_bootstrap
    events = asyncio.run(upload_images(settings, write_samples(tmp_path, 6), bucket=settings.s3_allowed_buckets[0]))
    records, trace_ids = traced_uploads(events)

    # Off (no OTEL_* variables): nothing exported, yet every outcome continues its upload's trace.
    worker = lane.worker("untraced")
    try:
        produce(bootstrap, settings.topic_uploads, records[:3])
        outcomes = consume(bootstrap, settings.topic_verdicts, 3)
    finally:
        stop_worker(worker)
    assert len(outcomes) == 3, lane.log("untraced")[-3000:]
    for message in outcomes:
        assert trace_id_of(message.headers()) == trace_ids[Verdict.model_validate_json(message.value()).event_id]
    assert '"trace_id"' not in lane.log("untraced")

    # On, by the standard variables only: the console exporter writes each span as JSON to the worker's log.
    worker = lane.worker(
        "traced", OTEL_TRACES_EXPORTER="console", OTEL_SERVICE_NAME="moderation-test", OTEL_BSP_SCHEDULE_DELAY="100"
    )
    try:
        produce(bootstrap, settings.topic_uploads, records[3:])
        outcomes = consume(bootstrap, settings.topic_verdicts, 6)
        log = ""
        for _ in range(60):
            log = lane.log("traced")
            if all(f"0x{trace_ids[e.event_id]:032x}" in log for e in events[3:]):
                break
            time.sleep(0.5)
    finally:
        stop_worker(worker)
    for event in events[3:]:
        assert f"0x{trace_ids[event.event_id]:032x}" in log, log[-3000:]
    assert '"service.name": "moderation-test"' in log
    names = {json.loads(block)["name"] for block in _json_blocks(log)}
    assert {f"{settings.topic_uploads} process", *STAGES} <= names


def _json_blocks(log: str) -> list[str]:
    """The console exporter's spans: pretty-printed JSON objects, each starting with a line `{`."""
    blocks, current = [], []
    for line in log.splitlines():
        if line == "{":
            current = [line]
        elif current:
            current.append(line)
            if line == "}":
                blocks.append("\n".join(current))
                current = []
    return blocks


def test_an_unknown_exporter_stops_the_worker_with_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OTEL_TRACES_EXPORTER", "nonesuch")
    monkeypatch.setenv("MODERATION_DATA_DIR", str(tmp_path))
    result = CliRunner().invoke(command, ["worker"])
    assert result.exit_code == 2 and "nonesuch" in result.output
