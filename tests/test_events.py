import json
from pathlib import Path

import jsonschema
import pytest

from moderation.errors import Reason, Rejected
from moderation.events import DeadLetter, UploadEvent, json_schemas, parse_upload, utcnow

SCHEMAS = Path(__file__).parent.parent / "schemas"
GOOD = {"schema_version": 1, "event_id": "evt-1", "bucket": "uploads", "key": "a/b.jpg"}


def test_committed_schemas_match_the_models() -> None:
    for name, schema in json_schemas().items():
        committed = json.loads((SCHEMAS / f"{name}.schema.json").read_text())
        assert committed == schema, f"schemas/{name}.schema.json drifted: run `moderation schema --write schemas`"


def test_a_minimal_event_parses_and_validates_against_its_schema() -> None:
    event = parse_upload(json.dumps(GOOD).encode())
    assert event.event_id == "evt-1"
    jsonschema.validate(json.loads(event.to_bytes()), json_schemas()["upload_event"])


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        (b"", Reason.INVALID_EVENT),
        (b"\xff\xfe not utf8", Reason.INVALID_EVENT),
        (b"[1, 2]", Reason.INVALID_EVENT),
        (b'"a string"', Reason.INVALID_EVENT),
        (json.dumps(GOOD | {"schema_version": 2}).encode(), Reason.UNSUPPORTED_SCHEMA),
        (json.dumps(GOOD | {"schema_version": "1"}).encode(), Reason.UNSUPPORTED_SCHEMA),
        (json.dumps(GOOD | {"schema_version": True}).encode(), Reason.UNSUPPORTED_SCHEMA),
        (
            json.dumps({k: v for k, v in GOOD.items() if k != "schema_version"}).encode(),
            Reason.UNSUPPORTED_SCHEMA,
        ),
        (json.dumps({k: v for k, v in GOOD.items() if k != "key"}).encode(), Reason.INVALID_EVENT),
        (json.dumps(GOOD | {"event_id": "has spaces"}).encode(), Reason.INVALID_EVENT),
        (json.dumps(GOOD | {"bucket": "UPPER"}).encode(), Reason.INVALID_EVENT),
        (json.dumps(GOOD | {"sha256": "xyz"}).encode(), Reason.INVALID_EVENT),
        (json.dumps(GOOD | {"unexpected": 1}).encode(), Reason.INVALID_EVENT),
        (json.dumps(GOOD | {"attributes": {f"k{i}": "v" for i in range(33)}}).encode(), Reason.INVALID_EVENT),
        (json.dumps(GOOD | {"attributes": {"k": "v" * 2000}}).encode(), Reason.INVALID_EVENT),
        (json.dumps(GOOD | {"uploaded_at": "2026-01-01T00:00:00"}).encode(), Reason.INVALID_EVENT),
    ],
)
def test_bad_events_are_rejected_with_a_stable_reason(payload: bytes, reason: Reason) -> None:
    with pytest.raises(Rejected) as caught:
        parse_upload(payload)
    assert caught.value.reason == reason


def test_dead_letter_keeps_the_payload_byte_for_byte() -> None:
    original = b"\x00\xffnot json at all\n"
    import base64

    now = utcnow()
    letter = DeadLetter(
        event_id=None,
        reason=Reason.INVALID_EVENT,
        detail="x",
        retryable=False,
        attempts=1,
        first_error_at=now,
        last_error_at=now,
        source_topic="t",
        source_partition=0,
        source_offset=3,
        payload_base64=base64.b64encode(original).decode(),
    )
    again = DeadLetter.model_validate_json(letter.to_bytes())
    assert again.payload() == original
    jsonschema.validate(json.loads(letter.to_bytes()), json_schemas()["dead_letter"])


def test_upload_event_round_trips() -> None:
    event = UploadEvent(schema_version=1, event_id="e", bucket="uploads", key="k", attributes={"a": "b"})
    assert UploadEvent.model_validate_json(event.to_bytes()) == event
