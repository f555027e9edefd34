"""OpenTelemetry tracing of each upload, configured only by the standard OTEL_* variables and off by default.

An upload record's W3C `traceparent` (and `tracestate`) header is continued: one CONSUMER span per event
(`<uploads topic> process`) with children for the S3 fetch, the decode, the inference (whose gRPC metadata
carries the context on to Triton) and the publish of its outcomes, and every outcome record carries the
event's `traceparent`. Without an SDK configured the API records nothing, yet the context still passes
through: an outcome continues its upload's trace id either way.

Turned on by `OTEL_TRACES_EXPORTER` (`otlp`, `console`, or any exporter registered under the
`opentelemetry_traces_exporter` entry point, as the SDK's own auto-configuration finds them), with
`OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_EXPORTER_OTLP_*` read by the SDK itself;
`OTEL_SDK_DISABLED=true` turns it off again.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from importlib.metadata import entry_points
from typing import TYPE_CHECKING, Any, Protocol

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.propagators.textmap import Getter

from moderation.errors import ModerationError
from moderation.events import DeadLetter, Verdict

if TYPE_CHECKING:
    from opentelemetry.context import Context

log = logging.getLogger(__name__)

SERVICE_NAME = "moderation-worker"  # unless OTEL_SERVICE_NAME says otherwise
_TRACE_HEADERS = frozenset({"traceparent", "tracestate"})

tracer = trace.get_tracer("moderation.worker")

Headers = Sequence[tuple[str, bytes | None]]


def configure() -> bool:
    """Install the SDK's tracer provider with the exporters OTEL_TRACES_EXPORTER names; False when tracing
    stays off. An unknown exporter name is a configuration error (ModerationError), not a silent no-op."""
    names = [n.strip() for n in os.environ.get("OTEL_TRACES_EXPORTER", "").split(",") if n.strip()]
    if os.environ.get("OTEL_SDK_DISABLED", "").lower() == "true" or not names or names == ["none"]:
        return False
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    defaults = {} if os.environ.get("OTEL_SERVICE_NAME") else {"service.name": SERVICE_NAME}
    provider = TracerProvider(resource=Resource.create(defaults))
    for name in names:
        provider.add_span_processor(BatchSpanProcessor(_exporter(name)))
    trace.set_tracer_provider(provider)  # flushed at exit (the provider's own atexit hook)
    log.info("tracing on: spans exported to %s", ", ".join(names))
    return True


def _exporter(name: str) -> Any:
    found = entry_points(group="opentelemetry_traces_exporter", name=name)
    if not found:
        raise ModerationError(
            f"OTEL_TRACES_EXPORTER={name}: no such span exporter installed "
            "(`otlp` needs pip install 'moderation[tracing]')"
        )
    return next(iter(found)).load()()


class _HeaderGetter(Getter[Headers]):
    """Kafka headers as a carrier: a value that is absent or not UTF-8 is no context at all, never an error."""

    def get(self, carrier: Headers, key: str) -> list[str] | None:
        values = []
        for name, value in carrier:
            if name.lower() == key and value is not None:
                with contextlib.suppress(UnicodeDecodeError):
                    values.append(value.decode())
        return values or None

    def keys(self, carrier: Headers) -> list[str]:
        return [name for name, _ in carrier]


def extracted(headers: Headers) -> Context:
    """The producer's context from a record's headers (an empty one when it has none)."""
    try:
        return propagate.extract(headers, getter=_HeaderGetter())
    except Exception:  # a malformed traceparent is the producer's business, never a dead letter
        return otel_context.Context()


def header_values(ctx: Context | None) -> list[tuple[str, bytes | None]]:
    """`traceparent` (and `tracestate`) of `ctx`, as Kafka headers."""
    carrier: dict[str, str] = {}
    if ctx is not None:
        propagate.inject(carrier, context=ctx)
    return [(name, value.encode()) for name, value in carrier.items() if name in _TRACE_HEADERS]


def without_trace_headers(headers: Headers) -> list[tuple[str, bytes | None]]:
    return [(name, value) for name, value in headers if name.lower() not in _TRACE_HEADERS]


class Consumed(Protocol):
    @property
    def topic(self) -> str: ...
    @property
    def partition(self) -> int: ...
    @property
    def offset(self) -> int: ...
    @property
    def headers(self) -> Headers: ...


@contextlib.contextmanager
def processing(records: Sequence[Consumed]) -> Iterator[list[Context]]:
    """One CONSUMER span per record, each continuing its producer's context, ended on exit; yields the
    contexts the record's own work runs in."""
    spans = [
        tracer.start_span(
            f"{r.topic} process",
            context=extracted(r.headers),
            kind=trace.SpanKind.CONSUMER,
            attributes={
                "messaging.system": "kafka",
                "messaging.operation.type": "process",
                "messaging.destination.name": r.topic,
                "messaging.destination.partition.id": str(r.partition),
                "messaging.kafka.offset": r.offset,
            },
        )
        for r in records
    ]
    try:
        yield [trace.set_span_in_context(span) for span in spans]
    finally:
        for span in spans:
            span.end()


def record_outcomes(contexts: Sequence[Context], outcomes: Sequence[Verdict | DeadLetter]) -> None:
    """What each event came to, on its CONSUMER span."""
    for ctx, outcome in zip(contexts, outcomes, strict=True):
        span = trace.get_current_span(ctx)
        if not span.is_recording():
            continue
        if outcome.event_id:
            span.set_attribute("moderation.event_id", outcome.event_id)
        if isinstance(outcome, DeadLetter):
            span.set_attribute("moderation.dlq.reason", str(outcome.reason))
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(outcome.reason)))
        else:
            span.set_attributes({"moderation.label": outcome.label, "moderation.action": outcome.action})


@contextlib.contextmanager
def span_in(ctx: Context | None, name: str, kind: trace.SpanKind = trace.SpanKind.INTERNAL) -> Iterator[trace.Span]:
    """A child span of `ctx` (of the current context when None), current while the block runs."""
    with tracer.start_as_current_span(name, context=ctx, kind=kind) as span:
        yield span


@contextlib.contextmanager
def publishing(contexts: Sequence[Context | None]) -> Iterator[None]:
    """One PRODUCER span per event while its outcomes are published as part of a batch."""
    spans = [tracer.start_span("publish", context=ctx, kind=trace.SpanKind.PRODUCER) for ctx in contexts]
    try:
        yield
    except BaseException as exc:
        for span in spans:
            span.record_exception(exc)
            span.set_status(trace.Status(trace.StatusCode.ERROR, str(exc)))
        raise
    finally:
        for span in spans:
            span.end()
