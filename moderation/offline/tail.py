"""`moderation tail`: follow topics and show each record readably, or as JSON lines.

No consumer group: every partition of the topics is assigned, and nothing is committed, so a tail never
moves anyone's offsets. A record is never fatal: a value that is not one of our messages is shown as the
JSON it is, and one that is not JSON as its raw bytes.
"""

from __future__ import annotations

import base64
import contextlib
import json
from collections.abc import AsyncGenerator, Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition
from pydantic import ValidationError
from rich.text import Text

from moderation.adapters.kafka import Received, high_watermarks, partitions, reader
from moderation.events import MESSAGES
from moderation.settings import Settings

_SHOWN_CHARS = 160  # of a detail, an explanation or a raw value, on a readable line


def topic_name(name: str, settings: Settings) -> str:
    """An alias, the name of a `topic_*` setting without its prefix (uploads, verdicts, flagged, dlq, cache and
    any topic added later), for the topic it names; any other name as it is."""
    field = f"topic_{name}"
    return str(getattr(settings, field)) if field in type(settings).model_fields else name


@dataclass(frozen=True)
class Tailed(Received):
    """One record, and what it holds: `kind` is the message it is (upload_event, verdict, dead_letter,
    cache_entry, explain_request, explanation...), else json (a JSON object of no known message), null (a
    tombstone) or raw."""

    kind: str = "raw"
    data: dict[str, Any] | None = None

    def get(self, name: str) -> Any:
        return self.data.get(name) if self.data is not None else None

    @property
    def time(self) -> str:
        moment = datetime.fromtimestamp(self.timestamp_ms / 1000, UTC)
        return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def read(record: ConsumerRecord[Any, Any]) -> Tailed:
    """The record and what it holds. Never raises."""
    value = record.value
    data: Any = None
    if value is not None:
        try:
            data = json.loads(value)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
            data = None
    data = data if isinstance(data, dict) else None
    kind = "null" if value is None else "raw" if data is None else _kind(data)
    return Tailed.of(record, kind=kind, data=data)


def _kind(data: dict[str, Any]) -> str:
    for name, model in MESSAGES.items():
        try:
            model.model_validate(data)
        except ValidationError:
            continue
        return name
    return "json"


@dataclass(frozen=True)
class Filters:
    """Each given filter must match (any of its values); a record without the field does not."""

    tenants: Collection[str] = ()
    actions: Collection[str] = ()
    reasons: Collection[str] = ()

    def match(self, record: Tailed) -> bool:
        wanted = (("tenant", self.tenants), ("action", self.actions), ("reason", self.reasons))
        return all(not values or _field(record, name) in values for name, values in wanted)


def _field(record: Tailed, name: str) -> Any:
    """A field, or the explained verdict's (an explanation's `verdict_action`, an explain request's verdict)."""
    value = record.get(name)
    if value is None:
        value = record.get(f"verdict_{name}")
    if value is None and isinstance(verdict := record.get("verdict"), dict):
        value = verdict.get(name)
    return value


async def tail(
    settings: Settings,
    topics: list[str],
    emit: Callable[[Tailed], None],
    *,
    filters: Filters = Filters(),
    limit: int | None = None,
    from_beginning: bool = False,
    on_ready: Callable[[dict[str, int]], None] | None = None,
) -> int:
    """Emit each record of `topics` that the filters let through, until `limit` were; returns how many were.
    `on_ready(partitions per topic)` runs once the positions are set: records written after it are all seen."""
    shown = 0
    if limit is not None and limit <= 0:
        return shown
    async with contextlib.aclosing(follow(settings, topics, from_beginning=from_beginning, on_ready=on_ready)) as feed:
        async for record in feed:
            if filters.match(record):
                emit(record)
                shown += 1
                if shown == limit:
                    break
    return shown


async def follow(
    settings: Settings,
    topics: list[str],
    *,
    from_beginning: bool = False,
    on_ready: Callable[[dict[str, int]], None] | None = None,
) -> AsyncGenerator[Tailed, None]:
    """Every record of `topics` from the end (or the beginning) on, each partition in offset order."""
    consumer = reader(settings)
    await consumer.start()
    try:
        tps = await partitions(consumer, *topics)
        consumer.assign(tps)
        if from_beginning:
            await consumer.seek_to_beginning(*tps)
        else:
            await _seek_to_end(consumer, tps)
        if on_ready is not None:
            on_ready({topic: sum(1 for tp in tps if tp.topic == topic) for topic in topics})
        while True:
            batch = await consumer.getmany(timeout_ms=1000)
            for records in batch.values():
                for record in records:
                    yield read(record)
    finally:
        await consumer.stop()


async def _seek_to_end(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> None:
    """To each partition's high watermark (the records a first fetch returns meanwhile are dropped by the seek)."""
    ends = await high_watermarks(consumer, partitions)
    for tp in partitions:
        consumer.seek(tp, ends[tp])


def to_json(record: Tailed) -> str:
    """One JSON line: where and when, key and headers as text, and the value as the JSON it is, else `raw`
    (its bytes as UTF-8 with escapes; `raw_base64` when that loses bytes)."""
    line: dict[str, Any] = {
        "time": record.time,
        "topic": record.topic,
        "partition": record.partition,
        "offset": record.offset,
        "key": _text(record.key),
        "headers": {name: _text(value) for name, value in record.headers},
        "kind": record.kind,
    }
    if record.kind == "raw" and record.value is not None:
        line["raw"] = _text(record.value)
        if not _is_utf8(record.value):
            line["raw_base64"] = base64.b64encode(record.value).decode()
    else:
        line["value"] = record.data  # null for a tombstone
    return json.dumps(line, ensure_ascii=False, separators=(",", ":"))


def line(record: Tailed) -> Text:
    """One readable line: when, where, key, what it is, and the fields that matter for its kind."""
    text = Text.assemble((record.time, "dim"), " ", (record.where, "cyan"), " ", (f"key={_short(record.key)}", "dim"))
    text.append(f" {record.kind}", style="bold")
    for part, style in _fields(record):
        text.append(" ")
        text.append(part, style=style)
    return text


_ACTION_STYLE = {"allow": "green", "review": "yellow", "flag": "bold red"}


def _fields(record: Tailed) -> list[tuple[str, str]]:
    get = record.get
    tenant = [(f"tenant={get('tenant')}", "")] if get("tenant") is not None else []
    if record.kind == "verdict":
        explanation = [(_clip(str(get("explanation"))), "dim")] if get("explanation") else []
        cached = [("cached", "dim")] if get("cached") else []
        coming = [("explanation to follow", "dim")] if get("explanation_requested") else []
        return [
            (str(get("event_id")), ""),
            *tenant,
            (f"{get('label')} {get('score'):.3f}", ""),
            (str(get("action")), _ACTION_STYLE.get(str(get("action")), "")),
            *cached,
            *explanation,
            *coming,
        ]
    if record.kind == "explanation":
        said = get("answer_label")
        disagrees = [("text disagrees", "bold yellow")] if said is not None and said != get("verdict_label") else []
        return [
            (str(get("event_id")), ""),
            *tenant,
            (f"verdict {get('verdict_label')} {get('verdict_score'):.3f}", ""),
            (str(get("verdict_action")), _ACTION_STYLE.get(str(get("verdict_action")), "")),
            *disagrees,
            (f"{get('explain_ms'):.0f} ms", "dim"),
            (_clip(str(get("explanation"))), ""),
        ]
    if record.kind == "explain_request":
        verdict = get("verdict") or {}
        return [
            (str(get("event_id")), ""),
            (f"{verdict.get('label')} {verdict.get('score', 0.0):.3f}", ""),
            (f"s3://{verdict.get('bucket')}/{verdict.get('key')}", "dim"),
        ]
    if record.kind == "dead_letter":
        retry = "retryable" if get("retryable") else "final"
        return [
            (str(get("event_id")), ""),
            (str(get("reason")), "red"),
            (f"{retry} attempts={get('attempts')}", ""),
            (_clip(str(get("detail"))), "dim"),
        ]
    if record.kind == "upload_event":
        return [(str(get("event_id")), ""), *tenant, (f"s3://{get('bucket')}/{get('key')}", "")]
    if record.kind == "cache_entry":
        model = get("model") or {}
        return [
            (f"{get('image_sha256')}", ""),
            (f"{get('label')} {get('score'):.3f}", ""),
            (str(model.get("name")), ""),
        ]
    if record.kind == "json":
        named = [(f"{name}={get(name)}", "") for name in ("event_id", "tenant", "action", "reason") if get(name)]
        return [*named, (_clip(json.dumps(record.data, separators=(",", ":"))), "dim")]
    if record.kind == "null":
        return [("(a tombstone)", "dim")]
    return [(_clip(repr(record.value)), "yellow")]


def _text(value: bytes | None) -> str | None:
    return None if value is None else value.decode("utf-8", "backslashreplace")


def _is_utf8(value: bytes) -> bool:
    try:
        value.decode("utf-8")
    except UnicodeDecodeError:
        return False
    return True


def _short(value: bytes | None) -> str:
    return "null" if value is None else _clip(_text(value) or "", 80)


def _clip(text: str, limit: int = _SHOWN_CHARS) -> str:
    """On one line, control characters escaped, at most `limit` characters."""
    text = "".join(c if c.isprintable() else repr(c)[1:-1] for c in text)
    return text if len(text) <= limit else text[: limit - 1] + "…"
