"""`moderation model check`: verdict-first against the model's free answer, on the trained tiny model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from moderation.cli.main import app
from moderation.devkit.synthetic import samples, write_images
from moderation.devkit.training import trained_checkpoint
from moderation.model.fakevlm import FakeVLM
from moderation.model.imaging import crop
from moderation.offline.modelcheck import VALID_SHARE, Answer, CheckReport, check, summarise


def test_summary_counts_prefix_agreement_and_margins() -> None:
    answers = [
        Answer("This is a fake image.", "fake", 0.9, "fake"),
        Answer("This is a real image.", "real", 0.6, "fake"),  # disagrees, 0.1 from flipping
        Answer("A photo of a cat.", None, 0.2, "real"),  # no label by the eval rule
        Answer("It looks real.", "real", 0.3, "real"),
    ]
    report = summarise(answers, threshold=0.5)
    assert report.prefix_share == 0.5
    assert report.labelled == 3 and report.disagreements == 1
    assert report.agreement == pytest.approx(2 / 3)
    assert report.margin_mean == pytest.approx(0.1) and report.margin_max == pytest.approx(0.1)
    assert summarise([], 0.5).agreement is None
    assert not report.verdict_first_valid


def test_verdict_first_is_valid_when_free_answers_start_with_the_prefix_and_agree() -> None:
    def report(prefix_share: float, agreement: float | None) -> CheckReport:
        return CheckReport(8, prefix_share, 8, agreement, 0, None, None, [])

    assert report(VALID_SHARE, VALID_SHARE).verdict_first_valid and report(1.0, 1.0).verdict_first_valid
    assert not report(VALID_SHARE - 0.01, 1.0).verdict_first_valid
    assert not report(1.0, VALID_SHARE - 0.01).verdict_first_valid
    assert not report(1.0, None).verdict_first_valid, "no labelled answer: nothing shows the verdict agrees"


def test_verdict_first_agrees_with_the_trained_models_free_answers() -> None:
    vlm = FakeVLM.load(trained_checkpoint())
    fresh = list(samples(8, 20_251_130))
    report = check(vlm, np.stack([crop(s.image) for s in fresh]), max_new_tokens=40, batch_size=4)
    assert report.images == 8 and report.prefix_share == 1.0
    assert report.agreement == 1.0 and report.margin_max is None
    assert [a.free_label for a in report.answers] == [s.label for s in fresh]


def test_model_check_command(tmp_path: Path) -> None:
    write_images(tmp_path, 4, seed=11)
    (tmp_path / "notes.txt").write_text("not an image")
    out = tmp_path / "check.json"
    args = ["model", "check", str(tmp_path), "--model", str(trained_checkpoint()), "--max-new-tokens", "24"]
    result = CliRunner().invoke(app, [*args, "--out", str(out)])
    assert result.exit_code == 0, result.output
    assert "skipped" in result.output and "valid for this checkpoint: yes" in result.output
    assert '"images": 4' in out.read_text()
