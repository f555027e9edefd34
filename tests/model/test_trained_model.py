"""The committed trained tiny FakeVLM: right about fresh synthetic images, its verdict-first label agrees
with its own generated answer (FakeVLM's eval rule), and training it is deterministic."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from moderation.devkit.synthetic import Sample, samples
from moderation.devkit.training import (
    HELD_OUT_STREAM,
    METRICS_FILE,
    TRAINED_CHECKPOINT,
    TrainProgress,
    _layout,
    prompt_ids,
    read_metrics,
    train_tiny_fakevlm,
    trained_checkpoint,
)
from moderation.errors import ModelError
from moderation.model.fakevlm import FakeVLM, Scored, label_from_answer
from moderation.model.imaging import crop

FRESH_SEED = 20_251_127  # neither the training stream (seed 0) nor the held-out stream of training


@pytest.fixture(scope="module")
def trained() -> FakeVLM:
    return FakeVLM.load(trained_checkpoint())


@pytest.fixture(scope="module")
def fresh() -> list[Sample]:
    assert FRESH_SEED not in (read_metrics(trained_checkpoint())["seed"], HELD_OUT_STREAM)
    return list(samples(60, FRESH_SEED))


@pytest.fixture(scope="module")
def results(trained: FakeVLM, fresh: list[Sample]) -> list[Scored]:
    pixels = np.stack([crop(s.image) for s in fresh])
    return trained.score(pixels, [0.0] * len(fresh), max_new_tokens=48)


def test_checkpoint_is_committed_small_and_measured() -> None:
    path = trained_checkpoint()
    assert path == TRAINED_CHECKPOINT
    assert sum(f.stat().st_size for f in path.iterdir()) < 10_000_000
    assert not list(path.glob("*.bin"))  # safetensors only
    metrics = read_metrics(path)["held_out"]
    assert metrics["images"] >= 200
    assert metrics["accuracy"] >= 0.95 and metrics["agreement"] >= 0.99


def test_verdicts_are_right_on_fresh_images(fresh: list[Sample], results: list[Scored]) -> None:
    correct = sum(r.label == s.label for s, r in zip(fresh, results, strict=True))
    assert correct / len(fresh) >= 0.95


def test_verdict_first_agrees_with_generate_and_parse(results: list[Scored]) -> None:
    agree = sum(r.label == r.answer_label == label_from_answer(r.explanation or "") for r in results)
    assert agree / len(results) >= 0.99


def test_explanations_are_in_fakevlms_format(fresh: list[Sample], results: list[Scored]) -> None:
    for r in results:
        assert r.explanation is not None
        assert r.explanation.startswith(f"This is a {r.label} image. ")
        assert r.explanation.endswith(".") and "?" not in r.explanation
    # Most answers are the reference word for word (category, artifact and region all right).
    exact = sum(r.explanation == s.answer for s, r in zip(fresh, results, strict=True))
    assert exact / len(fresh) >= 0.5


def test_scores_are_confident(results: list[Scored]) -> None:
    assert np.median([abs(r.score - 0.5) for r in results]) > 0.4
    assert all(0.0 <= r.score <= 1.0 and not math.isnan(r.score) for r in results)


def test_training_layout_is_what_score_feeds(trained: FakeVLM) -> None:
    answer = trained.tokenizer.encode("This is a fake image. The end.", add_special_tokens=False)
    input_ids, targets, weights = _layout(prompt_ids(trained), [answer, answer[:6]], pad_id=0)
    prefix = trained._prefix_ids[0].cpu()
    assert torch.equal(input_ids[0, : prefix.shape[0]], prefix)  # prompt + "This is a", as scoring sees it
    assert input_ids[0, prefix.shape[0]] == trained._fake_id
    assert targets[0].tolist() == answer and weights[1, 6:].sum() == 0  # loss on answer tokens only


def test_missing_checkpoint_says_how_to_build_it(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setattr("moderation.devkit.training.TRAINED_CHECKPOINT", tmp_path / "nothing")
    with pytest.raises(ModelError, match="moderation model train-tiny"):
        trained_checkpoint()


def test_training_lowers_the_loss_and_is_deterministic(tmp_path: Path) -> None:
    def run(name: str) -> tuple[list[float], dict[str, torch.Tensor]]:
        losses: list[float] = []

        def record(p: TrainProgress) -> None:
            if p.phase == "train" and p.loss is not None:
                losses.append(p.loss)

        path = train_tiny_fakevlm(tmp_path / name, seed=3, steps=4, batch_size=2, held_out=2, progress=record)
        assert (path / METRICS_FILE).is_file() and read_metrics(path)["steps"] == 4
        return losses, load_file(path / "model.safetensors")

    losses, weights = run("a")
    again, weights_again = run("b")
    assert len(losses) == 4 and losses[-1] < losses[0]
    assert losses == again
    assert weights.keys() == weights_again.keys()
    assert all(torch.equal(weights[k], weights_again[k]) for k in weights)
