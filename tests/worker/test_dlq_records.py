"""The dead-letter tooling's pure parts: the attempts header as any Kafka client may send it, and records
of the dead-letter topic that are not dead letters."""

from __future__ import annotations

import base64
from typing import Any

import pytest
from aiokafka import ConsumerRecord
from hypothesis import given
from hypothesis import strategies as st

from moderation.adapters.deadletters import ATTEMPTS_HEADER, attempts_from
from moderation.errors import Reason
from moderation.events import DeadLetter, utcnow
from moderation.offline.dlq import parse

NAME = ATTEMPTS_HEADER


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        (None, 0),
        ([], 0),
        ({}, 0),
        ([(NAME, b"3")], 3),
        ({NAME: b"3"}, 3),
        ([(NAME, "4")], 4),  # a client that hands str values
        ([(NAME.encode(), b"2")], 2),  # and bytes names
        ([(NAME, b" 7\n")], 7),
        ([(NAME, None)], 0),  # a null header value (librdkafka sends these)
        ([(NAME, b"\xff\xfe")], 0),  # not UTF-8
        ([(NAME, b"three")], 0),
        ([(NAME, b"1.5")], 0),
        ([(NAME, b"-4")], 0),  # negative
        ([(NAME, b"")], 0),
        ([(NAME, b"9" * 5000)], 0),  # past int()'s digit limit: no ValueError escapes
        ([(NAME, 10**12)], 0),  # not bytes at all (bytes(10**12) would allocate a terabyte)
        ([(NAME, b"2"), (NAME, b"5"), (NAME, b"x")], 5),  # duplicated: the largest count wins
        ([(NAME, b"5"), (NAME, b"2")], 5),  # a stale lower one cannot restart the count
        ([("other", b"9"), (NAME, b"1")], 1),
        ([("only-a-name",), None, 3, (NAME, b"2")], 2),  # not pairs at all
        ([(NAME, bytearray(b"6"))], 6),
        ([(NAME, memoryview(b"6"))], 6),
    ],
)
def test_attempts_from_reads_a_count_or_0_and_never_raises(headers: Any, expected: int) -> None:
    assert attempts_from(headers) == expected


@given(
    st.one_of(
        st.none(),
        st.lists(
            st.tuples(
                st.sampled_from([NAME, NAME.encode(), "x"]),
                st.one_of(st.none(), st.binary(max_size=30), st.text(max_size=30), st.integers()),
            ),
            max_size=5,
        ),
    )
)
def test_attempts_from_never_raises_on_any_header(headers: Any) -> None:
    assert attempts_from(headers) >= 0


def record(value: bytes | None, offset: int = 7) -> ConsumerRecord[bytes, bytes]:
    return ConsumerRecord(
        topic="dlq",
        partition=2,
        offset=offset,
        timestamp=1_700_000_000_000,
        timestamp_type=0,
        key=b"k",
        value=value,
        checksum=None,
        serialized_key_size=1,
        serialized_value_size=len(value or b""),
        headers=(),
    )


def dead_letter(**overrides: Any) -> DeadLetter:
    now = utcnow()
    fields: dict[str, Any] = {
        "event_id": "e1",
        "reason": Reason.STORAGE_UNAVAILABLE,
        "detail": "test",
        "retryable": True,
        "attempts": 1,
        "first_error_at": now,
        "last_error_at": now,
        "source_topic": "uploads",
        "source_partition": 0,
        "source_offset": 0,
        "payload_base64": base64.b64encode(b"{}").decode(),
    }
    return DeadLetter(**(fields | overrides))


def test_a_dead_letter_parses_with_where_it_is() -> None:
    letter = dead_letter()
    stored = parse(record(letter.to_bytes()))
    assert stored.letter == letter and stored.problem == ""
    assert stored.where == "dlq[2]@7" and stored.key == b"k"


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (None, "null value"),
        (b"", "not a dead letter"),
        (b"\xff\xfe not json", "not a dead letter"),
        (b"[1, 2]", "not a dead letter"),
        (b'{"event_id": "e1"}', "not a dead letter: reason: Field required"),
        (dead_letter(reason=Reason.INVALID_EVENT).to_bytes().replace(b"invalid_event", b"no_such_reason"), "reason"),
        (dead_letter(payload_base64="abc").to_bytes(), "payload_base64 is not base64"),
    ],
)
def test_a_record_that_is_not_a_dead_letter_says_why(value: bytes | None, problem: str) -> None:
    stored = parse(record(value))
    assert stored.letter is None
    assert problem in stored.problem, stored.problem
