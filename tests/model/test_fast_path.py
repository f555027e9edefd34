"""The GPU fast path of the Python-backend model (configs/gpu.pbtxt), exercised on the CPU with the tiny checkpoints:
batch buckets, static-shape compilation, the static KV cache for explanations. Speed is not measured here."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from moderation.devkit.synthetic import samples
from moderation.model.fakevlm import FakeVLM, FastPath
from moderation.model.imaging import crop
from moderation.model.triton_model import fast_path

NEVER, ALWAYS = 2.0, 0.0


@pytest.fixture(scope="module")
def crops() -> np.ndarray:
    return np.stack([crop(s.image) for s in samples(5, 11)])


def test_a_batch_runs_at_the_smallest_bucket_that_holds_it() -> None:
    fast = FastPath(batch_buckets=(1, 8, 16, 32, 64))
    assert [fast.bucket(n) for n in (1, 2, 8, 9, 64, 65)] == [1, 8, 8, 16, 64, 65]
    assert FastPath().bucket(5) == 5  # no buckets: the CPU path runs every batch as it comes


def test_padding_to_a_bucket_leaves_every_row_its_own_score(tiny_checkpoint: Path, crops: np.ndarray) -> None:
    eager = FakeVLM.load(tiny_checkpoint)
    bucketed = FakeVLM.load(tiny_checkpoint, fast=FastPath(batch_buckets=(4, 8)))
    for rows in (1, 3, 5):
        want = [r.score for r in eager.score(crops[:rows], [NEVER] * rows)]
        got = bucketed.score(crops[:rows], [NEVER] * rows)
        assert len(got) == rows
        assert [r.score for r in got] == pytest.approx(want, abs=1e-5)


def test_static_kv_cache_explains_as_the_dynamic_cache_does(crops: np.ndarray) -> None:
    from moderation.devkit.training import trained_checkpoint

    dynamic = FakeVLM.load(trained_checkpoint())
    static = FakeVLM.load(trained_checkpoint(), fast=FastPath(static_cache=True, batch_buckets=(4,)))
    limits = [ALWAYS, NEVER, ALWAYS]
    want = dynamic.score(crops[:3], limits, max_new_tokens=12)
    got = static.score(crops[:3], limits, max_new_tokens=12)
    assert static.model.generation_config.cache_implementation == "static"
    assert [r.explanation for r in got] == [r.explanation for r in want]
    assert got[1].explanation is None and got[0].explanation


@pytest.mark.slow
def test_compiled_with_static_shapes_scores_as_eager_and_never_compiles_after_its_warm_up(
    tiny_checkpoint: Path, crops: np.ndarray
) -> None:
    """torch.compile(dynamic=False) on the CPU (inductor, a C compiler): the same scores, and once each bucket
    ran (configs/gpu.pbtxt's model_warmup), no batch of any size compiles again: padded and full batches share
    shapes and strides."""
    torch._dynamo.reset()
    eager = FakeVLM.load(tiny_checkpoint)
    sizes = (1, 3, 4, 2)
    want = {rows: [r.score for r in eager.score(crops[:rows], [NEVER] * rows)] for rows in sizes}
    # In Triton the compiled model is alone in its instance's process; here an eager pass between two
    # compiled ones would change a global that dynamo guards on, so the eager scores are taken first.
    compiled = FakeVLM.load(tiny_checkpoint, fast=FastPath(compile=True, batch_buckets=(2, 4)))
    for bucket in (2, 4):
        compiled.score(crops[:bucket], [NEVER] * bucket)
    warm = torch._dynamo.utils.counters["stats"]["unique_graphs"]
    for rows in sizes:
        assert [r.score for r in compiled.score(crops[:rows], [NEVER] * rows)] == pytest.approx(want[rows], abs=1e-5)
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == warm > 0


def test_the_config_parameters_select_the_fast_path() -> None:
    assert fast_path({}) == FastPath()  # the CPU config.pbtxt: eager, unchanged
    gpu = {"compile": "true", "compile_mode": "max-autotune", "batch_buckets": "64, 1,8", "static_cache": "true"}
    assert fast_path(gpu) == FastPath(
        compile=True, compile_mode="max-autotune", batch_buckets=(1, 8, 64), static_cache=True
    )
