"""The AsyncAPI 3.0 document of every topic: who sends and receives what, keyed and headed how, kept how.

Generated from the same sources as the code that runs: topic names, partitions and replicas from Settings,
payloads from the pydantic models' JSON Schemas (`moderation.events.json_schemas`), reason codes from
`moderation.errors.Reason`. The committed `schemas/asyncapi.yaml` is this document for the default
settings; a test fails when it drifts, and another validates it with the official AsyncAPI parser.

A new topic is one more `Channel` in `CHANNELS` (its settings field, messages, retention and operations).
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml
from pydantic import TypeAdapter

from moderation.adapters.deadletters import ATTEMPTS_HEADER, DLQ_HEADER_PREFIX
from moderation.errors import RETRYABLE, Reason
from moderation.events import MESSAGES, SCHEMA_VERSION, EventId, json_schemas
from moderation.settings import Settings

ASYNCAPI_VERSION = "3.0.0"
KAFKA_BINDING = "0.5.0"
DAY_MS = 86_400_000


Schema = dict[str, Any]


@dataclass(frozen=True)
class Role:
    """Who takes part: each operation is tagged with its role."""

    name: str
    description: str


WORKER = Role("worker", "The stream worker (`moderation worker`): one image, scaled by partitions.")
PLATFORM = Role("platform", "A platform backend that stored an image in S3 (`moderation publish` acts as one).")
REPLAY = Role("replay", "`moderation dlq replay`: re-publishes retryable dead letters as their original records.")
TRUST_AND_SAFETY = Role("trust-and-safety", "Reviewers and takedown tooling: act on flagged uploads.")
DOWNSTREAM = Role("downstream", "Any reader of the outcomes: the platform's own state, audit, analytics.")
OPERATORS = Role("operators", "On-call and tooling: `moderation dlq inspect`, `moderation tail`, alerts.")
REVIEWERS = Role("reviewers", "The review console (`moderation review serve`): people deciding queued uploads.")
EXPLAINER = Role(
    "explainer", "The explainer (`moderation explainer`): FakeVLM's explanations, apart from the verdicts they explain."
)


@dataclass(frozen=True)
class Message:
    name: str  # its key in `moderation.events.json_schemas()`
    title: str
    summary: str
    key: Schema  # the Kafka record key
    headers: Schema | None = None


@dataclass(frozen=True)
class Operation:
    role: Role
    action: Literal["send", "receive"]
    summary: str
    group: Callable[[Settings], str] | None = None  # the consumer group it commits in, when one


@dataclass(frozen=True)
class Channel:
    name: str
    setting: str  # the Settings field holding the topic name
    description: str
    messages: tuple[Message, ...]
    operations: tuple[Operation, ...]
    retention_ms: int | None = None  # as deploy/base/topics/topics.env creates it; None: compacted
    extra_config: dict[str, Any] = field(default_factory=dict)

    def topic(self, settings: Settings) -> str:
        return str(getattr(settings, self.setting))


def _event_id_key(what: str) -> Schema:
    return TypeAdapter(EventId).json_schema() | {"description": what}


def _string_header(description: str, **schema: Any) -> Schema:
    return {"type": "string", "description": description, **schema}


TRACE_HEADERS: dict[str, Schema] = {
    "traceparent": _string_header(
        "W3C Trace Context: on an upload, continued by the worker; on an outcome, the upload's own span.",
        pattern=r"^[0-9a-f]{2}-[0-9a-f]{32}-[0-9a-f]{16}-[0-9a-f]{2}$",
    ),
    "tracestate": _string_header("W3C Trace Context vendor state, passed along with traceparent."),
}

UPLOAD_HEADERS: Schema = {
    "type": "object",
    "description": "Any headers the producer sets are carried to the upload's dead letter, if it gets one.",
    "properties": {
        ATTEMPTS_HEADER: _string_header(
            "Deliveries so far, set by `moderation dlq replay` on a replayed upload; absent on a first delivery. "
            "Its dead letter counts one more, and replay stops at --max-attempts.",
            pattern=r"^[0-9]+$",
        ),
        **TRACE_HEADERS,
    },
    "additionalProperties": True,
}

OUTCOME_HEADERS: Schema = {
    "type": "object",
    "description": "The upload's trace context (also with tracing off: the producer's trace id carries on).",
    "properties": TRACE_HEADERS,
    "additionalProperties": False,
}

_DLQ_HEADERS: dict[str, Schema] = {
    "reason": _string_header("Why it got no verdict: a stable reason code.", enum=[str(r) for r in Reason]),
    "retryable": _string_header(
        f"Whether replay may try it again ({', '.join(sorted(RETRYABLE))}).", enum=["true", "false"]
    ),
    "attempts": _string_header("Deliveries of the upload so far, this one included.", pattern=r"^[1-9][0-9]*$"),
    "topic": _string_header("The topic the failed record was read from."),
    "partition": _string_header("Its partition.", pattern=r"^[0-9]+$"),
    "offset": _string_header("Its offset.", pattern=r"^[0-9]+$"),
}

DEAD_LETTER_HEADERS: Schema = {
    "type": "object",
    "description": "The failed record's own headers (earlier `moderation.dlq.*` ones replaced), then why and "
    "whence, as Kafka Connect's dead-letter queue does. Every value is a UTF-8 string.",
    "properties": {DLQ_HEADER_PREFIX + name: schema for name, schema in _DLQ_HEADERS.items()} | TRACE_HEADERS,
    "required": [DLQ_HEADER_PREFIX + name for name in _DLQ_HEADERS],
    "additionalProperties": True,
}

UPLOAD = Message(
    "upload_event",
    "Upload event",
    "An image was stored in S3 and needs a verdict.",
    key={
        "type": ["string", "null"],
        "description": "Chosen by the producer; the event_id is recommended (`moderation publish` uses it). Any key, "
        "or none, is accepted and carried to the upload's dead letter.",
    },
    headers=UPLOAD_HEADERS,
)
VERDICT = Message(
    "verdict",
    "Verdict",
    "The decision about one upload: label, P(fake), action, explanation, who decided (model, provenance, a "
    "banked match or a review), the evidence and the tenant policy's version.",
    key=_event_id_key("The upload's event_id: every outcome about one upload has the same key."),
    headers=OUTCOME_HEADERS,
)
DECISION = Message(
    "decision",
    "Reviewer decision",
    "A reviewer confirmed a fake, overturned it as real, or escalated it; never anonymous.",
    key=_event_id_key("The reviewed upload's event_id."),
)
BANK_ENTRY = Message(
    "bank_entry",
    "Bank entry",
    "A known image by sha256 and PDQ hash, with its decision: what re-uploads and near-duplicates are matched to.",
    key={
        "type": "string",
        "pattern": r"^[0-9a-f]{64}(:model)?$",
        "description": "The image's sha256 for a reviewer's decision; `<sha256>:model` for a banked model flag, so "
        "compaction never replaces a reviewer's entry with a model's.",
    },
)
DEAD_LETTER = Message(
    "dead_letter",
    "Dead letter",
    "An upload that got no verdict: a stable reason, and its original bytes to replay.",
    key={
        "type": ["string", "null"],
        "description": "The failed record's own key, byte for byte; its event_id when it had none; null when it "
        "had neither.",
    },
    headers=DEAD_LETTER_HEADERS,
)
CACHE_ENTRY = Message(
    "cache_entry",
    "Verdict cache entry",
    "What one model's weights said about one image's bytes; served again for identical bytes while it lives.",
    key={
        "type": "string",
        "pattern": r"^[0-9a-f]{64}/.+/.+$",
        "description": "`<image sha256>/<model name>/<model weights>`: an entry whose key is not its own is refused.",
    },
)
EXPLAIN_REQUEST = Message(
    "explain_request",
    "Explain request",
    "A verdict whose P(fake) is in the tenant's explain band, published with it: the explainer's work.",
    key=_event_id_key("The upload's event_id."),
    headers=OUTCOME_HEADERS,
)
EXPLANATION = Message(
    "explanation",
    "Explanation",
    "FakeVLM's answer text about one upload, after its verdict (which it names and never changes); at least once.",
    key=_event_id_key("The upload's event_id, as its verdict's."),
    headers=OUTCOME_HEADERS,
)


def _worker_group(settings: Settings) -> str:
    return settings.kafka_consumer_group


def _explainer_group(settings: Settings) -> str:
    return f"{settings.kafka_consumer_group}-explainer"  # moderation.worker.explainer.explainer_group


CHANNELS: tuple[Channel, ...] = (
    Channel(
        "uploads",
        "topic_uploads",
        "Upload events in. Any partition count; records of one key stay in order.",
        (UPLOAD,),
        (
            Operation(PLATFORM, "send", "Publish an upload event once the image is in S3."),
            Operation(REPLAY, "send", "Re-publish a retryable dead letter's original record, with its attempts."),
            Operation(
                WORKER, "receive", "Moderate uploads in batches; commit each once its outcomes are out.", _worker_group
            ),
        ),
        retention_ms=7 * DAY_MS,
    ),
    Channel(
        "verdicts",
        "topic_verdicts",
        "Every verdict, whatever its action (allow, review or flag); at least once, keyed by event_id.",
        (VERDICT,),
        (
            Operation(WORKER, "send", "Publish the verdict of each upload before its offset is committed."),
            Operation(DOWNSTREAM, "receive", "Apply verdicts: de-duplicate on event_id (delivery is at least once)."),
        ),
        retention_ms=7 * DAY_MS,
    ),
    Channel(
        "flagged",
        "topic_flagged",
        "The verdicts whose action is flag, also on the verdicts topic: what trust and safety acts on.",
        (VERDICT,),
        (
            Operation(WORKER, "send", "Publish a verdict here too when its action is flag."),
            Operation(TRUST_AND_SAFETY, "receive", "Act on flagged uploads (takedown, statement of reasons)."),
        ),
        retention_ms=30 * DAY_MS,
    ),
    Channel(
        "dlq",
        "topic_dlq",
        "Dead letters: uploads that got no verdict, keyed and headed like the record they answer.",
        (DEAD_LETTER,),
        (
            Operation(WORKER, "send", "Dead-letter an upload it cannot moderate, with a stable reason code."),
            Operation(EXPLAINER, "send", "Dead-letter an explain request no explanation came of (explanation_failed)."),
            Operation(
                REPLAY, "receive", "Read retryable letters; progress per reason: group `<group>-dlq-replay.<reason>`."
            ),
            Operation(OPERATORS, "receive", "Inspect dead letters and alert on their reasons."),
        ),
        retention_ms=30 * DAY_MS,
    ),
    Channel(
        "review",
        "topic_review",
        "The reviewers' queue: verdicts whose action is review or flag, also on the verdicts topic.",
        (VERDICT,),
        (
            Operation(WORKER, "send", "Queue a verdict for review when its action is review or flag."),
            Operation(REVIEWERS, "receive", "List the items awaiting a decision, newest first, per tenant (no group)."),
        ),
        retention_ms=30 * DAY_MS,
    ),
    Channel(
        "decisions",
        "topic_decisions",
        "Reviewer decisions, the record of who decided what: they feed the bank of known images.",
        (DECISION,),
        (
            Operation(REVIEWERS, "send", "Publish a decision with the reviewer's identity, once acknowledged."),
            Operation(
                WORKER, "receive", "Bank each decision as its image's entry (confirm or overturn).", _worker_group
            ),
            Operation(OPERATORS, "receive", "`moderation precision`: the model's precision per tenant."),
        ),
        retention_ms=365 * DAY_MS,
    ),
    Channel(
        "hashBank",
        "topic_bank",
        "Known images (reviewers' decisions first, by policy the model's flags): a compacted table every worker "
        "follows to match re-uploads and near-duplicates.",
        (BANK_ENTRY,),
        (
            Operation(WORKER, "send", "Bank a decision (and, by policy, a flag) as its image's entry."),
            Operation(WORKER, "receive", "Read the bank to its end at start, then follow it (no group)."),
        ),
        extra_config={"cleanup.policy": ["compact"]},
    ),
    Channel(
        "verdictCache",
        "topic_cache",
        "The verdict cache, shared by every worker: a compacted table, only workers may write it.",
        (CACHE_ENTRY,),
        (
            Operation(WORKER, "send", "Share each fresh verdict, best effort (never holding up an ack)."),
            Operation(EXPLAINER, "send", "Share a verdict again with its explanation, when its own weights wrote it."),
            Operation(WORKER, "receive", "Read the table to its end at start, then follow it (no group)."),
        ),
        extra_config={"cleanup.policy": ["compact"]},
    ),
    Channel(
        "explainRequests",
        "topic_explain_requests",
        "Verdicts to explain, each published with its verdict before the upload's offset is committed.",
        (EXPLAIN_REQUEST,),
        (
            Operation(WORKER, "send", "Ask for an explanation of a verdict in the tenant's explain band."),
            Operation(REPLAY, "send", "Re-publish an explanation_failed dead letter's original request."),
            Operation(
                EXPLAINER,
                "receive",
                "Explain a batch; commit it once its explanations (or dead letters) are out.",
                _explainer_group,
            ),
        ),
        retention_ms=7 * DAY_MS,
    ),
    Channel(
        "explanations",
        "topic_explanations",
        "FakeVLM's explanations, keyed by event_id, each after the verdict it names; at least once.",
        (EXPLANATION,),
        (
            Operation(EXPLAINER, "send", "Publish an explanation before its request's offset is committed."),
            Operation(REVIEWERS, "receive", "Show each queued item's explanation once it arrives (no group)."),
            Operation(TRUST_AND_SAFETY, "receive", "Attach the artifacts named to a flag's statement of reasons."),
        ),
        retention_ms=7 * DAY_MS,
    ),
)


def default_settings() -> Settings:
    """The settings' defaults, ignoring the environment: what the committed document describes."""
    return Settings.model_construct()


def document(settings: Settings | None = None, channels: tuple[Channel, ...] = CHANNELS) -> dict[str, Any]:
    """The AsyncAPI 3.0 document, as plain data ready for YAML or JSON."""
    settings = settings or default_settings()
    roles = {op.role.name: op.role for channel in channels for op in channel.operations}
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": "moderation",
            "version": f"{SCHEMA_VERSION}.0.0",
            "description": "Spot AI-generated images in an upload stream with FakeVLM, and say why. Every topic of "
            "the system; each operation is tagged with the role that performs it. Generated by `moderation "
            "asyncapi` from moderation/events.py and moderation/settings.py: do not edit by hand. Partitions, "
            "replicas and min.insync.replicas are the settings' defaults (the local stack; the prod overlay has "
            "12, 3 and 2): `moderation asyncapi --env-file F` renders a deployment's.",
            "license": {"name": "Apache-2.0"},
        },
        "defaultContentType": "application/json",
        "servers": {"kafka": _server(settings)},
        "channels": {c.name: _channel(c, settings) for c in channels},
        "operations": {_operation_id(c, op): _operation(c, op, settings) for c in channels for op in c.operations},
        "components": {
            "messages": {_message_id(m): _message(m) for m in _messages(channels)},
            "schemas": _payload_schemas(),
            "tags": {name: {"name": name, "description": role.description} for name, role in sorted(roles.items())},
            "securitySchemes": {
                "saslPlain": {"type": "plain", "description": "MODERATION_KAFKA_SASL_MECHANISM=PLAIN"},
                "saslScramSha256": {"type": "scramSha256", "description": "SCRAM-SHA-256"},
                "saslScramSha512": {"type": "scramSha512", "description": "SCRAM-SHA-512"},
                "mutualTls": {"type": "X509", "description": "MODERATION_KAFKA_SSL_CERTFILE and _KEYFILE"},
            },
        },
    }


def _server(settings: Settings) -> Schema:
    secure = settings.kafka_security_protocol in ("SSL", "SASL_SSL")
    return {
        "host": settings.kafka_bootstrap_servers.split(",")[0].strip(),
        "protocol": "kafka-secure" if secure else "kafka",
        "description": "MODERATION_KAFKA_BOOTSTRAP_SERVERS, over MODERATION_KAFKA_SECURITY_PROTOCOL: PLAINTEXT (no "
        "security scheme), SSL, SASL_PLAINTEXT or SASL_SSL. The local stack's broker is Tansu.",
        "security": [{"$ref": f"#/components/securitySchemes/{name}"} for name in _SECURITY],
    }


_SECURITY = ("saslPlain", "saslScramSha256", "saslScramSha512", "mutualTls")


def _channel(channel: Channel, settings: Settings) -> Schema:
    topic = channel.topic(settings)
    config: dict[str, Any] = {"cleanup.policy": ["delete"]} if channel.retention_ms is not None else {}
    if channel.retention_ms is not None:
        config["retention.ms"] = channel.retention_ms
    config |= channel.extra_config | {"min.insync.replicas": settings.kafka_min_insync_replicas}
    return {
        "address": topic,
        "title": topic,
        "description": channel.description,
        "servers": [{"$ref": "#/servers/kafka"}],
        "messages": {_message_id(m): {"$ref": f"#/components/messages/{_message_id(m)}"} for m in channel.messages},
        "bindings": {
            "kafka": {
                "topic": topic,
                "partitions": settings.kafka_topic_partitions,
                "replicas": settings.kafka_replication_factor,
                "topicConfiguration": config,
                "bindingVersion": KAFKA_BINDING,
            }
        },
    }


def _operation(channel: Channel, operation: Operation, settings: Settings) -> Schema:
    body: Schema = {
        "action": operation.action,
        "channel": {"$ref": f"#/channels/{channel.name}"},
        "summary": operation.summary,
        "tags": [{"$ref": f"#/components/tags/{operation.role.name}"}],
        "messages": [{"$ref": f"#/channels/{channel.name}/messages/{_message_id(m)}"} for m in channel.messages],
    }
    if operation.group is not None:
        group = {"type": "string", "enum": [operation.group(settings)]}
        body["bindings"] = {"kafka": {"groupId": group, "bindingVersion": KAFKA_BINDING}}
    return body


def _operation_id(channel: Channel, operation: Operation) -> str:
    return f"{operation.role.name}.{operation.action}.{channel.name}"


def _message(message: Message) -> Schema:
    title = MESSAGES[message.name].__name__  # pydantic's schema title
    body: Schema = {
        "name": title,
        "title": message.title,
        "summary": message.summary,
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{title}"},
    }
    if message.headers is not None:
        body["headers"] = message.headers
    body["bindings"] = {"kafka": {"key": message.key, "bindingVersion": KAFKA_BINDING}}
    return body


def _message_id(message: Message) -> str:
    head, *rest = message.name.split("_")
    return head + "".join(part.title() for part in rest)


def _messages(channels: tuple[Channel, ...]) -> list[Message]:
    return list({m.name: m for c in channels for m in c.messages}.values())


def _payload_schemas() -> dict[str, Schema]:
    """Every model's JSON Schema and their shared definitions as components, `#/$defs/X` now pointing there."""
    hoisted: dict[str, Schema] = {}
    for schema in json_schemas().values():
        body = _rehome(schema)
        for name, definition in body.pop("$defs", {}).items():
            if hoisted.setdefault(name, definition) != definition:
                raise ValueError(f"two models define {name} differently")
        hoisted[body["title"]] = body
    return dict(sorted(hoisted.items()))


def _rehome(node: Any) -> Any:
    if isinstance(node, dict):
        return {
            k: re.sub(r"^#/\$defs/", "#/components/schemas/", v) if k == "$ref" else _rehome(v) for k, v in node.items()
        }
    if isinstance(node, list):
        return [_rehome(item) for item in node]
    return node


def to_yaml(doc: dict[str, Any]) -> str:
    return yaml.safe_dump(doc, sort_keys=False, width=120, allow_unicode=True)
