"""FakeVLM scoring against a tiny checkpoint of the real architecture, built offline once per session."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from moderation.devkit.tinymodel import MARKER, build_tiny_checkpoint
from moderation.errors import ModelError
from moderation.model.fakevlm import (
    ANSWER_PREFIX,
    PROMPT,
    FakeVLM,
    FastPath,
    Scored,
    checkpoint_relative_to,
    label_from_answer,
)
from moderation.model.imaging import CLIP_MEAN, CLIP_STD, crop, normalise, preprocess


@pytest.fixture(scope="session")
def fakevlm(tiny_checkpoint: Path) -> FakeVLM:
    return FakeVLM.load(tiny_checkpoint)


@pytest.fixture(scope="session")
def pixels() -> np.ndarray:
    rng = np.random.default_rng(7)
    sizes = [(400, 336), (336, 500), (640, 480)]
    images = [Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)) for w, h in sizes]
    return np.stack([crop(image) for image in images])


def test_prompt_and_answer_prefix_are_fakevlms() -> None:
    assert PROMPT == "<image>Does the image looks real/fake?"
    assert ANSWER_PREFIX == "This is a"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("This is a fake image.", "fake"),
        ("This is a real image.", "real"),
        ("Does the image looks real/fake? This is a fake image.", "fake"),
        ("Does the image looks real/fake? This is a real image. It has no fake artifacts.", "real"),
        ("THIS IS A FAKE IMAGE.", "fake"),
        ("This Is A Real Image.", "real"),
        ("The picture shows a cat. It is clearly fake, with six legs.", "fake"),
        ("Hard to say. It looks real to me.", "real"),
        ("The image shows a cat. The lighting is soft. It is fake.", None),
        ("Does the image looks real/fake?", None),
        ("", None),
        ("A real or fake? I cannot tell.", None),
    ],
)
def test_label_from_answer_follows_the_eval_rule(text: str, expected: str | None) -> None:
    assert label_from_answer(text) == expected


def test_tiny_checkpoint_loads_with_the_real_loader(fakevlm: FakeVLM, tiny_checkpoint: Path) -> None:
    config = fakevlm.model.config
    assert type(fakevlm.model).__name__ == "LlavaForConditionalGeneration"
    assert fakevlm.model_id == tiny_checkpoint.name
    assert (config.vision_feature_layer, config.vision_feature_select_strategy) == (-2, "default")
    assert (config.vision_config.image_size, config.vision_config.patch_size) == (336, 14)
    assert config.image_seq_length == 576
    assert config.projector_hidden_act == "gelu"


def test_processor_expands_image_token_to_576(fakevlm: FakeVLM) -> None:
    processor = fakevlm.processor
    inputs = processor(text=PROMPT, images=Image.new("RGB", (500, 400)), return_tensors="pt")
    assert int((inputs["input_ids"] == fakevlm.model.config.image_token_id).sum()) == 576
    assert tuple(inputs["pixel_values"].shape) == (1, 3, 336, 336)
    assert inputs["input_ids"][0, 0] == processor.tokenizer.bos_token_id


def test_image_processor_has_fakevlms_settings(fakevlm: FakeVLM) -> None:
    ip = fakevlm.processor.image_processor
    assert ip.size == {"shortest_edge": 336}
    assert ip.crop_size == {"height": 336, "width": 336}
    assert int(ip.resample) == 3  # bicubic
    assert (ip.do_resize, ip.do_center_crop, ip.do_rescale, ip.do_normalize) == (True, True, True, True)
    assert not getattr(ip, "do_pad", False)
    assert ip.rescale_factor == pytest.approx(1 / 255)
    assert tuple(ip.image_mean) == pytest.approx(CLIP_MEAN)
    assert tuple(ip.image_std) == pytest.approx(CLIP_STD)


def test_processor_pixels_match_our_preprocess(fakevlm: FakeVLM) -> None:
    image = Image.fromarray(np.random.default_rng(3).integers(0, 256, (360, 480, 3), dtype=np.uint8))
    theirs = fakevlm.processor.image_processor(image, return_tensors="np")["pixel_values"][0]
    np.testing.assert_allclose(preprocess(image), theirs, atol=1e-4)


@pytest.mark.parametrize("word", ["fake", "real"])
def test_verdict_words_are_single_tokens(fakevlm: FakeVLM, word: str) -> None:
    tokenizer = fakevlm.tokenizer
    base = tokenizer.encode(ANSWER_PREFIX, add_special_tokens=False)
    full = tokenizer.encode(f"{ANSWER_PREFIX} {word}", add_special_tokens=False)
    assert full[: len(base)] == base and len(full) == len(base) + 1
    assert tokenizer.convert_ids_to_tokens(full[-1]) == f"▁{word}"


def test_score_returns_one_result_per_image(fakevlm: FakeVLM, pixels: np.ndarray) -> None:
    results = fakevlm.score(pixels, [math.inf] * 3)
    assert len(results) == 3
    for r in results:
        assert isinstance(r, Scored)
        assert 0.0 <= r.score <= 1.0
        assert r.label == ("fake" if r.score >= 0.5 else "real")
        assert r.explanation is None and r.answer_label is None


def test_threshold_decides_the_label(fakevlm: FakeVLM, pixels: np.ndarray) -> None:
    assert {r.label for r in fakevlm.score(pixels, [math.inf] * 3, threshold=0.0)} == {"fake"}
    assert {r.label for r in fakevlm.score(pixels, [math.inf] * 3, threshold=1.01)} == {"real"}


def test_the_model_normalises_crops_as_imaging_does(fakevlm: FakeVLM, pixels: np.ndarray) -> None:
    # The same float32 operations in the same order as the numpy path: the pinned preprocessing carries over.
    expected = np.stack([normalise(c) for c in pixels])
    np.testing.assert_array_equal(fakevlm.pixel_values(pixels).numpy(), expected)


def test_batched_scores_equal_one_at_a_time(fakevlm: FakeVLM, pixels: np.ndarray) -> None:
    batched = [r.score for r in fakevlm.score(pixels, [math.inf] * 3)]
    single = [fakevlm.score(pixels[i : i + 1], [math.inf])[0].score for i in range(3)]
    np.testing.assert_allclose(batched, single, atol=1e-4)
    from_torch = [r.score for r in fakevlm.score(torch.from_numpy(pixels), [math.inf] * 3)]
    np.testing.assert_allclose(batched, from_torch, atol=1e-6)


def test_explains_only_at_or_above_explain_above(fakevlm: FakeVLM, pixels: np.ndarray) -> None:
    scores = [r.score for r in fakevlm.score(pixels, [math.inf] * 3)]
    explain_above = [0.0, math.inf, scores[2]]  # always, never, exactly at its own score
    results = fakevlm.score(pixels, explain_above, max_new_tokens=12)
    assert [r.explanation is not None for r in results] == [True, False, True]
    for r in results:
        if r.explanation is not None:
            assert r.explanation.startswith(ANSWER_PREFIX)
            assert r.answer_label == label_from_answer(r.explanation)
        else:
            assert r.answer_label is None
    np.testing.assert_allclose([r.score for r in results], scores, atol=1e-4)


def test_explanation_reusing_the_prefill_equals_plain_generate(fakevlm: FakeVLM, pixels: np.ndarray) -> None:
    explained = [r.explanation for r in fakevlm.score(pixels, [0.0] * 3, max_new_tokens=10)]
    prefix = fakevlm._prefix_ids.expand(3, -1)
    with torch.inference_mode():
        out = fakevlm.model.generate(
            input_ids=prefix,
            attention_mask=torch.ones_like(prefix),
            pixel_values=torch.from_numpy(np.stack([normalise(c) for c in pixels])),
            max_new_tokens=10,
            do_sample=False,
        )
    assert explained == [fakevlm._decode(row) for row in out[:, prefix.shape[1] :].tolist()]


def test_score_rejects_bad_input(fakevlm: FakeVLM, pixels: np.ndarray) -> None:
    with pytest.raises(ValueError, match="crops must be"):
        fakevlm.score(np.zeros((1, 224, 224, 3), np.uint8), [math.inf])
    with pytest.raises(ValueError, match="crops must be"):
        fakevlm.score(pixels.astype(np.float32), [math.inf] * 3)  # normalised pixels are not crops
    with pytest.raises(ValueError, match="explain_above"):
        fakevlm.score(pixels, [math.inf])
    assert fakevlm.score(np.zeros((0, 336, 336, 3), np.uint8), []) == []


def test_load_fails_clearly(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="does not exist"):
        FakeVLM.load(tmp_path / "missing")
    (tmp_path / "partial").mkdir()
    (tmp_path / "partial" / "config.json").write_text("{}")
    with pytest.raises(ModelError, match="incomplete"):
        FakeVLM.load(tmp_path / "partial")


def test_tiny_checkpoint_is_small_deterministic_and_idempotent(tiny_checkpoint: Path, tmp_path: Path) -> None:
    assert sum(f.stat().st_size for f in tiny_checkpoint.iterdir()) < 5_000_000
    marker_mtime = (tiny_checkpoint / MARKER).stat().st_mtime_ns
    assert build_tiny_checkpoint(tiny_checkpoint) == tiny_checkpoint
    assert (tiny_checkpoint / MARKER).stat().st_mtime_ns == marker_mtime
    again = build_tiny_checkpoint(tmp_path / "again")
    for name in ("model.safetensors", "tokenizer.json", "config.json"):
        assert (again / name).read_bytes() == (tiny_checkpoint / name).read_bytes()


def test_checkpoint_setting_resolves_against_the_model_directory(tmp_path: Path) -> None:
    assert checkpoint_relative_to("weights", tmp_path) == str(tmp_path / "weights")
    assert checkpoint_relative_to("/abs/ckpt", tmp_path) == "/abs/ckpt"
    assert checkpoint_relative_to("lingcco/fakeVLM", tmp_path) == "lingcco/fakeVLM"
    (tmp_path / "lingcco" / "fakeVLM").mkdir(parents=True)
    assert checkpoint_relative_to("lingcco/fakeVLM", tmp_path) == str(tmp_path / "lingcco" / "fakeVLM")


def test_without_a_kept_cache_explained_rows_are_prefilled_again_to_the_same_answers() -> None:
    """The compiled verdict pass keeps no KV cache; its explanations must equal the cache path's."""
    from moderation.devkit.synthetic import samples
    from moderation.devkit.training import trained_checkpoint

    vlm = FakeVLM.load(trained_checkpoint())
    pixels = np.stack([crop(s.image) for s in samples(4, 5)])
    limits = [0.0, 2.0, 0.0, 0.0]
    with_cache = vlm.score(pixels, limits, max_new_tokens=16)
    vlm.fast = FastPath(compile=True)  # the compiled model's path, without paying for a compilation here
    prefilled = vlm.score(pixels, limits, max_new_tokens=16)
    assert [r.explanation for r in prefilled] == [r.explanation for r in with_cache]
    assert [r.score for r in prefilled] == pytest.approx([r.score for r in with_cache], abs=1e-6)
    assert prefilled[1].explanation is None and prefilled[0].explanation
