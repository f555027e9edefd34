"""The README's first quickstart command, `moderation demo`, end to end: its own stack, sample and bad
uploads through a worker, a C2PA AI-declared upload, a reviewer's decision and a matched copy."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from moderation import cli

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_the_demo_runs_start_to_finish(tmp_path: Path) -> None:
    args = ["demo", "--workdir", str(tmp_path / "demo"), "--images", "8"]
    result = CliRunner().invoke(cli.app, args, env={"COLUMNS": "250"})  # rich wraps its table to the width
    assert result.exit_code == 0, result.output[-4000:]
    out = result.output
    assert "provenance (C2PA)" in out  # the signed AI-declared upload
    assert "confirmed" in out and "match (PDQ distance" in out  # the reviewer's decision and the matched copy
    assert "dead letter" in out  # the bad uploads
    assert "review serve --env-file" in out and "Local stack stopped" in out
