"""Two backends, one code path: the in-process detector micro-batches onto FakeVLM.score, and Triton
serving a checkpoint gives the same scores and labels as the in-process detector on the same checkpoint."""

from __future__ import annotations

import asyncio
import re
import shutil
import threading
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from moderation.cli.main import app
from moderation.devkit import checkpoints, localstack
from moderation.devkit.demo import settings_for
from moderation.devkit.samples import draw_image
from moderation.errors import ModelError, Reason, Rejected
from moderation.model.detectors import InProcessDetector, TritonDetector, running
from moderation.model.fakevlm import FakeVLM
from moderation.model.imaging import crop
from moderation.settings import Settings
from moderation.worker.clients import detector_from_settings


@pytest.fixture(scope="module")
def pixels() -> np.ndarray:
    sizes = [(640, 480), (480, 720), (336, 336), (1000, 400), (400, 1000), (800, 600), (350, 340)]
    return np.stack([crop(draw_image(seed, size)) for seed, size in enumerate(sizes)])


@pytest.fixture
async def detector(tiny_checkpoint: Path) -> AsyncIterator[InProcessDetector]:
    async with running(
        InProcessDetector(tiny_checkpoint, batch_size=3, batch_wait_s=0.05, max_new_tokens=8)
    ) as started:
        yield started


def spy_on_score(detector: InProcessDetector, fail: bool = False, hold: threading.Event | None = None) -> list[int]:
    """Record the batch size of every FakeVLM.score call (optionally failing the first one, or holding every
    explained batch until `hold` is set)."""
    vlm: Any = detector._vlm
    real_score = vlm.score
    sizes: list[int] = []

    def score(crops: np.ndarray, explain_above: list[float], *args: Any, **kwargs: Any) -> Any:
        sizes.append(len(crops))
        if fail and len(sizes) == 1:
            raise RuntimeError("CUDA out of memory (simulated)")
        if hold is not None and explain_above[0] <= 1.0:
            hold.wait(timeout=30)
        return real_score(crops, explain_above, *args, **kwargs)

    vlm.score = score
    return sizes


async def test_in_process_scores_are_fakevlm_scores(
    detector: InProcessDetector, tiny_checkpoint: Path, pixels: np.ndarray
) -> None:
    limits = [0.0, 2.0] * 3 + [0.0]
    detections = await detector.detect_batch(pixels, explain_above=limits)
    reference = FakeVLM.load(tiny_checkpoint).score(pixels, limits, max_new_tokens=8)
    assert detector.explain_model == detector.model  # one loaded model answers both
    assert [d.score for d in detections] == pytest.approx([r.score for r in reference], abs=1e-5)
    assert [d.label for d in detections] == [r.label for r in reference]
    assert [d.explanation is None for d in detections] == [limit > 1 for limit in limits]
    assert detector.model.name == "fakevlm-in-process"
    assert str(tiny_checkpoint.resolve()) in detector.model.version


async def test_concurrent_detects_are_micro_batched(detector: InProcessDetector, pixels: np.ndarray) -> None:
    sizes = spy_on_score(detector)
    detections = await asyncio.gather(*(detector.detect(p) for p in pixels))
    assert sizes == [3, 3, 1]  # batch_size 3: ONE FakeVLM.score per batch
    assert len(detections) == 7 and all(0.0 <= d.score <= 1.0 for d in detections)
    assert all(d.explanation is None and d.answer_label is None for d in detections)


async def test_a_verdict_never_waits_behind_a_generation(detector: InProcessDetector, pixels: np.ndarray) -> None:
    hold = threading.Event()
    spy_on_score(detector, hold=hold)
    explaining = asyncio.gather(*(detector.explain(p) for p in pixels[:3]))
    await asyncio.sleep(0.1)  # the explain lane has taken its batch and is generating (held)
    try:
        verdict = await asyncio.wait_for(detector.detect(pixels[3]), timeout=20)
        assert not explaining.done() and verdict.explanation is None
    finally:
        hold.set()
    explained = await explaining
    assert all(d.explanation is not None and d.explanation.startswith("This is a") for d in explained)


async def test_a_bad_request_fails_alone(detector: InProcessDetector, pixels: np.ndarray) -> None:
    good, wrong_shape, not_uint8 = await asyncio.gather(
        detector.detect(pixels[0]),
        detector.detect(pixels[0][:, :100]),
        detector.explain(pixels[0].astype(np.float32)),
        return_exceptions=True,
    )
    assert not isinstance(good, BaseException) and 0.0 <= good.score <= 1.0
    for exc in (wrong_shape, not_uint8):
        assert isinstance(exc, Rejected) and exc.reason == Reason.INFERENCE_FAILED


async def test_a_failed_pass_fails_its_batch_not_the_detector(detector: InProcessDetector, pixels: np.ndarray) -> None:
    spy_on_score(detector, fail=True)
    results = await asyncio.gather(*(detector.detect(p) for p in pixels[:3]), return_exceptions=True)
    assert all(isinstance(r, Rejected) and r.reason == Reason.INFERENCE_FAILED for r in results)
    assert "out of memory" in str(results[0])
    assert await detector.ready()
    assert 0.0 <= (await detector.detect(pixels[0])).score <= 1.0


async def test_lifecycle(tiny_checkpoint: Path, pixels: np.ndarray) -> None:
    detector = InProcessDetector(tiny_checkpoint)
    assert not await detector.ready()
    with pytest.raises(ModelError, match="start"):
        await detector.detect(pixels[0])
    await detector.start()
    assert await detector.ready()
    await detector.stop()
    assert not await detector.ready()
    with pytest.raises(ModelError):
        await detector.explain(pixels[0])
    with pytest.raises(ModelError, match="does not exist"):
        await InProcessDetector(tiny_checkpoint.parent / "nowhere").start()


def test_the_worker_refuses_to_serve_without_weights(tiny_checkpoint: Path) -> None:
    with pytest.raises(ModelError, match="MODERATION_CHECKPOINT"):
        detector_from_settings(Settings.model_validate({"detector": "inprocess"}))
    chosen = detector_from_settings(
        Settings.model_validate({"detector": "inprocess", "checkpoint": str(tiny_checkpoint)})
    )
    assert isinstance(chosen, InProcessDetector)
    assert isinstance(detector_from_settings(Settings()), TritonDetector)


def test_the_worker_command_says_why_it_will_not_start(tmp_path: Path) -> None:
    env = tmp_path / "worker.env"
    env.write_text(f"MODERATION_DETECTOR=inprocess\nMODERATION_DATA_DIR={tmp_path}\n")
    result = CliRunner().invoke(app, ["worker", "--env-file", str(env)])
    assert result.exit_code == 2 and "MODERATION_CHECKPOINT" in result.output


def test_offline_tools_want_named_weights(tmp_path: Path) -> None:
    result = CliRunner().invoke(app, ["scan", str(tmp_path)])
    assert result.exit_code == 2 and "--model" in result.output


def test_only_the_devkit_picks_a_tiny_model(
    tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No checkpoint: the trained tiny model when there is one, else the random one.
    shutil.copytree(tiny_checkpoint, tmp_path / "models" / "fakevlm-tiny")  # complete: reused, not rebuilt
    monkeypatch.setattr(checkpoints, "_trained_checkpoint", lambda: None)
    assert checkpoints.default_checkpoint(tmp_path) == (tmp_path / "models" / "fakevlm-tiny", False)
    monkeypatch.setattr(checkpoints, "_trained_checkpoint", lambda: tiny_checkpoint)
    assert checkpoints.default_checkpoint(tmp_path) == (tiny_checkpoint, True)


@pytest.mark.integration
async def test_triton_and_in_process_give_the_same_scores(stack: localstack.StackInfo, pixels: np.ndarray) -> None:
    triton = TritonDetector(settings_for(stack))
    await triton.start()
    try:
        served = re.fullmatch(r".*\((?P<checkpoint>.+)\)", triton.model.version)
        assert served is not None, triton.model.version
        checkpoint = Path(served["checkpoint"])
        assert checkpoint.is_dir()
        limits = [0.0, 2.0, 2.0, 0.0, 2.0, 2.0, 2.0]
        over_triton = await triton.detect_batch(pixels, explain_above=limits)
    finally:
        await triton.stop()

    async with running(InProcessDetector(checkpoint, batch_size=4)) as in_process:
        here = await in_process.detect_batch(pixels, explain_above=limits)

    assert [d.score for d in over_triton] == pytest.approx([d.score for d in here], abs=1e-4)
    assert [d.label for d in over_triton] == [d.label for d in here]
    assert [d.explanation is None for d in over_triton] == [d.explanation is None for d in here]
    assert [d.explanation is None for d in here] == [limit > 1 for limit in limits]
    assert len({round(d.score, 6) for d in here}) > 1  # different images, different scores


def test_triton_says_when_explanations_come_from_other_weights(caplog: pytest.LogCaptureFixture) -> None:
    triton = TritonDetector(Settings())
    assert (triton.model.name, triton.explain_model.name) == ("fakevlm", "fakevlm_explain")
    triton._answered_by(triton._verdict, "sha256:aaa")
    with caplog.at_level("ERROR"):
        triton._answered_by(triton._explainer, "sha256:aaa")
        assert not caplog.records
        triton._answered_by(triton._explainer, "sha256:bbb")
    assert triton.explain_model.weights == "sha256:bbb" and triton.model.weights == "sha256:aaa"
    assert "explanations come from other weights than verdicts" in caplog.text


async def test_verdicts_and_explanations_at_once_score_as_one_at_a_time(
    detector: InProcessDetector, pixels: np.ndarray
) -> None:
    # The two lanes call the one loaded model from two threads at once.
    together = await asyncio.gather(*(detector.detect(p) for p in pixels), *(detector.explain(p) for p in pixels))
    alone = [await detector.detect(p) for p in pixels]
    scores = [d.score for d in alone]
    assert [d.score for d in together[: len(pixels)]] == pytest.approx(scores, abs=1e-5)
    assert [d.score for d in together[len(pixels) :]] == pytest.approx(scores, abs=1e-5)
    assert all(d.explanation for d in together[len(pixels) :])
