"""The real Triton of the local stack serving fakevlm (verdicts) and fakevlm_explain (explanations) from uint8
crops: a verdict never waits behind a generation, and a malformed IMAGE is refused for its own request only."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import numpy as np
import pytest
import tritonclient.grpc.aio as grpcclient
from tritonclient.utils import InferenceServerException

from moderation.devkit import localstack
from moderation.devkit.demo import settings_for
from moderation.devkit.samples import draw_image
from moderation.errors import Reason, Rejected
from moderation.model.detectors import TritonDetector
from moderation.model.imaging import crop

pytestmark = pytest.mark.integration

BATCH = 8  # the explain model's max_batch_size
EXPLAINED = 4 * BATCH  # four full batches of the explain model, generated one after another


@pytest.fixture
async def triton(stack: localstack.StackInfo) -> AsyncIterator[TritonDetector]:
    detector = TritonDetector(settings_for(stack))
    await detector.start()
    try:
        yield detector
    finally:
        await detector.stop()


def _crops(count: int) -> list[np.ndarray]:
    return [crop(draw_image(seed, (400 + seed, 336))) for seed in range(count)]


async def test_a_verdict_is_answered_while_the_explain_model_generates(triton: TritonDetector) -> None:
    finished: list[str] = []

    async def explain(image: np.ndarray) -> None:
        await triton.explain(image)
        finished.append("explanation")

    images = _crops(EXPLAINED + 1)
    explaining = [asyncio.create_task(explain(image)) for image in images[:EXPLAINED]]
    await asyncio.sleep(0.2)  # all queued at the explain model, its first batch generating
    verdict = await triton.detect(images[-1])
    finished.append("verdict")
    await asyncio.gather(*explaining)
    # Order of completion, not a timing threshold: one model for both would have queued the verdict behind
    # every explanation sent before it (FIFO); here at least the last explained batch is still generating.
    assert finished.index("verdict") < EXPLAINED - BATCH, finished
    assert verdict.explanation is None and verdict.answer_label is None
    assert triton.explain_model.name == "fakevlm_explain"
    assert triton.explain_model.weights == triton.model.weights is not None


async def test_an_explanation_comes_with_the_verdicts_score(triton: TritonDetector) -> None:
    [image] = _crops(1)
    verdict, explained = await asyncio.gather(triton.detect(image), triton.explain(image))
    assert explained.explanation is not None and explained.explanation.startswith("This is a")
    assert explained.score == pytest.approx(verdict.score, abs=1e-5)
    assert explained.label == verdict.label


@pytest.mark.parametrize(
    ("array", "datatype"),
    [
        (np.zeros((1, 336, 336, 3), np.float32), "FP32"),  # the old fp32 pixels
        (np.zeros((1, 3, 336, 336), np.uint8), "UINT8"),  # CHW, not HWC
        (np.zeros((1, 336, 336, 4), np.uint8), "UINT8"),  # RGBA
    ],
)
async def test_a_malformed_image_is_invalid_for_its_own_request_only(
    stack: localstack.StackInfo, array: np.ndarray, datatype: str
) -> None:
    assert stack.triton_url is not None
    client = grpcclient.InferenceServerClient(stack.triton_url)

    async def infer(image: np.ndarray, kind: str) -> object:
        tensor = grpcclient.InferInput("IMAGE", list(image.shape), kind)
        tensor.set_data_from_numpy(image)
        return await client.infer("fakevlm", [tensor])

    try:
        good, bad = await asyncio.gather(
            infer(np.zeros((1, 336, 336, 3), np.uint8), "UINT8"), infer(array, datatype), return_exceptions=True
        )
    finally:
        await client.close()
    assert isinstance(bad, InferenceServerException) and bad.status() == "StatusCode.INVALID_ARGUMENT", bad
    assert not isinstance(good, BaseException)
    assert good.as_numpy("SCORE").shape == (1, 1)  # type: ignore[attr-defined]


async def test_a_triton_without_the_explain_model_still_serves_verdicts(stack: localstack.StackInfo) -> None:
    settings = settings_for(stack).model_copy(update={"triton_explain_model": "no_such_model"})
    detector = TritonDetector(settings)
    await detector.start()
    try:
        [image] = _crops(1)
        assert (await detector.detect(image)).explanation is None
        with pytest.raises(Rejected) as refused:
            await detector.explain(image)
    finally:
        await detector.stop()
    assert refused.value.reason == Reason.INFERENCE_UNAVAILABLE
    assert "no_such_model" in refused.value.detail and "MODERATION_TRITON_EXPLAIN_MODEL" in refused.value.detail
