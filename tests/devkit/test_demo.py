"""The README's first quickstart command, `moderation demo`, end to end: its own stack, sample and bad
uploads through a worker, a C2PA AI-declared upload, a reviewer's decision and a matched copy. Its tables
fit an 80-column terminal, and library logs stay out of them."""

from __future__ import annotations

import base64
import io
import logging
import uuid
from datetime import UTC, datetime
from pathlib import Path

import pytest
from rich.console import Console
from typer.testing import CliRunner

from moderation.cli.main import app
from moderation.client import Outcomes
from moderation.devkit.demo import logs_to, outcome_table
from moderation.errors import Reason
from moderation.events import C2paEvidence, DeadLetter, ImageInfo, Match, ModelInfo, Provenance, Timings, Verdict

NOW = datetime(2026, 12, 7, 12, 0, tzinfo=UTC)


@pytest.mark.integration
@pytest.mark.slow
def test_the_demo_runs_start_to_finish(tmp_path: Path) -> None:
    args = ["demo", "--workdir", str(tmp_path / "demo"), "--images", "8"]
    result = CliRunner().invoke(app, args, env={"COLUMNS": "250"})  # rich wraps its table to the width
    assert result.exit_code == 0, result.output[-4000:]
    out = result.output
    assert "provenance (C2PA)" in out  # the signed AI-declared upload
    assert "confirmed" in out and "match (PDQ distance" in out  # the reviewer's decision and the matched copy
    assert "dead letter" in out  # the bad uploads
    assert "review serve --env-file" in out and "Local stack stopped" in out
    assert "aiokafka" not in out and "aiokafka" in (tmp_path / "demo" / "demo.log").read_text()


def verdict(event_id: str, filename: str | None, score: float, action: str, **fields: object) -> Verdict:
    return Verdict(
        event_id=event_id,
        bucket="uploads",
        key=f"demo/{event_id}",
        image_sha256="a" * 64,
        label="fake" if score >= 0.5 else "real",
        score=score,
        action=action,  # type: ignore[arg-type]
        model=ModelInfo(name="fakevlm", version="1"),
        image=ImageInfo(width=64, height=48, format="PNG"),
        timings=Timings(fetch_ms=1, decode_ms=2, inference_ms=3, total_ms=6),
        decided_at=NOW,
        attributes={"filename": filename} if filename else {},
        **({"explanation": None} | fields),  # type: ignore[arg-type]
    )


def dead_letter(event_id: str | None, reason: Reason, detail: str) -> DeadLetter:
    return DeadLetter(
        event_id=event_id,
        reason=reason,
        detail=detail,
        retryable=False,
        attempts=1,
        first_error_at=NOW,
        last_error_at=NOW,
        source_topic="moderation.uploads",
        source_partition=0,
        source_offset=7,
        payload_base64=base64.b64encode(b"{}").decode(),
    )


def test_the_outcomes_table_fits_80_columns_and_keeps_what_a_reader_needs() -> None:
    c2pa = C2paEvidence(validation_state="Valid", valid=True)
    match = Match(event_id="e0", image_sha256="b" * 64, distance=10, label="fake", decided_by="review")
    anonymous = str(uuid.uuid4())  # an upload without a filename attribute: its id is all there is
    outcomes = Outcomes()
    for v in (
        verdict("e1", "fake-00004.png", 0.999, "flag", explanation_requested=True),
        verdict("e2", "real-00005.png", 0.001, "allow"),
        verdict(
            "e3", "c2pa-ai-generated.jpg", 0.001, "flag", decided_by="provenance", provenance=Provenance(c2pa=c2pa)
        ),
        verdict("e4", "copy-of-fake-00000.jpg", 0.002, "flag", decided_by="match", match=match),
        verdict(anonymous, None, 0.7, "review", explanation="This is a fake image. " + "The light is wrong. " * 6),
    ):
        outcomes.verdicts[v.event_id].append(v)
    for event_id, reason, detail in (
        ("bad-unknown-schema-0123456789ab", Reason.UNSUPPORTED_SCHEMA, "schema_version 9 is not one of [1]"),
        ("bad-truncated-jpeg-0123456789ab", Reason.INVALID_IMAGE, "corrupt or truncated JPEG image: " + "x" * 60),
        (None, Reason.INVALID_EVENT, "not JSON: Expecting value: line 1 column 35 (char 34)"),
    ):
        outcomes.dead_letters[event_id].append(dead_letter(event_id, reason, detail))
    names = {"bad-unknown-schema-0123456789ab": "unknown-schema"}

    console = Console(width=80, record=True, file=io.StringIO(), color_system=None)
    console.print(outcome_table(outcomes, names))
    text = console.export_text()
    lines = text.splitlines()
    cells = [" ".join(line.split()) for line in lines]  # the columns' padding as one space

    assert max(len(line) for line in lines) <= 80, text
    # Every name, verdict, action, decider and reason code stands whole on one line.
    for whole in (
        "fake-00004.png fake 0.999 flag model",
        "real-00005.png real 0.001 allow model",
        "c2pa-ai-generated.jpg",
        "provenance (C2PA)",
        "copy-of-fake-00000.jpg",
        "match (PDQ distance 10)",
        "unknown-schema dead letter - unsupported_schema:",
        "invalid_image",
        "(unparseable)",
        "invalid_event",
    ):
        assert any(whole in line for line in cells), f"{whole!r} not whole in\n{text}"
    # Ids longer than the event column lose their tail to an ellipsis: a uuid's first 23 characters tell a
    # demo's few dozen events apart, and a bad case's id ends in the one uid that all of a run's bad cases
    # share, so its name part (the start) is what tells them apart.
    assert f"{anonymous[:23]}…" in text and "bad-truncated-jpeg-0123…" in text
    # Long explanations and details are previews, cut visibly: the whole text is in the topic.
    assert "x…" in text and "x" * 27 not in text


def test_library_logs_go_to_the_demo_log_not_the_terminal(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    handler = logging.StreamHandler()  # what `moderation`'s basicConfig installs: stderr
    logging.getLogger().addHandler(handler)
    try:
        with logs_to(tmp_path / "demo.log"):
            logging.getLogger("aiokafka.consumer").info("Updating subscribed topics")
        logging.getLogger("after").warning("the command's own handler is back")
    finally:
        logging.getLogger().removeHandler(handler)
    err = capsys.readouterr().err
    assert "Updating subscribed topics" not in err and "the command's own handler is back" in err
    assert "INFO aiokafka.consumer Updating subscribed topics" in (tmp_path / "demo.log").read_text()
