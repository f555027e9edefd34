"""The dead-letter headers every deployable shares: what a dead letter carries besides its JSON (why and
whence, Kafka Connect's way), and the delivery count a replay writes and the worker reads back.

A replayed upload carries the number of deliveries so far in the `moderation-attempts` header; the
worker's dead letter for it counts one more, so `moderation dlq replay --max-attempts` can stop replaying a
letter that keeps failing.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from moderation.events import DeadLetter

ATTEMPTS_HEADER = "moderation-attempts"
DLQ_HEADER_PREFIX = "moderation.dlq."  # the dead letter's own headers: why and whence (Kafka Connect's way)
_COUNT = re.compile(rb"\s*\+?(\d{1,18})\s*")  # at most 18 digits: an int64 a Kafka client may have written


def attempts_from(headers: Mapping[Any, Any] | Iterable[Any] | None) -> int:
    """Deliveries recorded on a replayed message; 0 for a first delivery. Never raises, whatever a Kafka
    client sent: a null, non-UTF-8, non-numeric or negative value counts as 0, and of duplicated headers
    the largest count wins (a stale lower one must not restart the count and lift the cap)."""
    try:
        pairs = list(headers.items() if isinstance(headers, Mapping) else (headers or ()))
    except Exception:  # headers the client could not even list: a first delivery
        return 0
    return max((_count(pair) for pair in pairs), default=0)


def dead_letter_headers(
    letter: DeadLetter, original: Sequence[tuple[str, bytes | None]]
) -> list[tuple[str, bytes | None]]:
    """The original record's headers, then the dead letter's own (earlier ones of ours replaced)."""
    ours = {
        "reason": str(letter.reason),
        "retryable": "true" if letter.retryable else "false",
        "attempts": str(letter.attempts),
        "topic": letter.source_topic,
        "partition": str(letter.source_partition),
        "offset": str(letter.source_offset),
    }
    kept = [(name, value) for name, value in original if not name.startswith(DLQ_HEADER_PREFIX)]
    return kept + [(DLQ_HEADER_PREFIX + name, value.encode()) for name, value in ours.items()]


def _count(pair: Any) -> int:
    try:
        name, value = pair
    except (TypeError, ValueError):  # not a (name, value) pair
        return 0
    if name not in (ATTEMPTS_HEADER, ATTEMPTS_HEADER.encode()):
        return 0
    if isinstance(value, str):
        value = value.encode(errors="replace")
    if not isinstance(value, bytes | bytearray | memoryview):  # a null value, or something no client sends
        return 0
    match = _COUNT.fullmatch(bytes(value))
    return int(match.group(1)) if match else 0
