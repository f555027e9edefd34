"""The synthetic images with known answers: deterministic, balanced, in FakeVLM's answer format, and
the fakes really carry a synthesis fingerprint (one that survives FakeVLM's preprocessing)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from moderation.devkit.synthetic import (
    ARTIFACTS,
    CATEGORIES,
    REGIONS,
    SIZES,
    Sample,
    answer_corpus,
    answer_for,
    make_sample,
    periodic_peak_ratio,
    region_mask,
    samples,
    write_fakeclue,
    write_images,
)
from moderation.devkit.tinymodel import build_tiny_tokenizer
from moderation.model.fakevlm import PROMPT, label_from_answer
from moderation.model.imaging import CLIP_MEAN, CLIP_STD, preprocess

PEAK = 20.0  # camera images stay under ~7, fakes reach ~75 and above


@pytest.fixture(scope="module")
def drawn() -> list[Sample]:
    return list(samples(48, seed=11))


def as_model_sees_it(image: Image.Image) -> Image.Image:
    """FakeVLM's preprocessing (resize, center crop), un-normalised back to 8-bit RGB."""
    pixels = preprocess(image) * np.asarray(CLIP_STD).reshape(3, 1, 1) + np.asarray(CLIP_MEAN).reshape(3, 1, 1)
    return Image.fromarray(np.clip(np.rint(pixels.transpose(1, 2, 0) * 255), 0, 255).astype(np.uint8))


def test_samples_are_a_pure_function_of_seed_and_index() -> None:
    first, again = make_sample(5, 3), make_sample(5, 3)
    assert first.image.tobytes() == again.image.tobytes()
    assert (first.label, first.category, first.answer) == (again.label, again.category, again.answer)
    assert make_sample(6, 3).image.tobytes() != first.image.tobytes()
    assert [s.answer for s in samples(3, 5, start=2)] == [make_sample(5, i).answer for i in (2, 3, 4)]


def test_labels_alternate_and_metadata_is_consistent(drawn: list[Sample]) -> None:
    assert [s.label for s in drawn] == ["fake", "real"] * 24
    for s in drawn:
        assert s.image.mode == "RGB" and s.image.size in SIZES and min(s.image.size) == 336
        assert s.category in CATEGORIES
        if s.label == "fake":
            assert s.artifact in ARTIFACTS and s.region in REGIONS
        else:
            assert s.artifact is None and s.region is None
    assert {s.category for s in drawn} == set(CATEGORIES)
    assert {s.artifact for s in drawn if s.artifact} == set(ARTIFACTS)


def test_answers_follow_fakevlms_format(drawn: list[Sample]) -> None:
    for s in drawn:
        verdict, rest = s.answer.split(". ", 1)
        assert verdict + "." == f"This is a {s.label} image."
        assert 1 <= rest.count(".") <= 2 and rest.endswith(".")
        assert "?" not in s.answer  # the eval rule reads the text after the last '?'
        assert label_from_answer(s.answer) == s.label
        assert s.answer == answer_for(s.label, s.category, s.artifact, s.region)
    fake = answer_for("fake", "doc", "checkerboard", "upper-left")
    assert fake.startswith("This is a fake image. The document page")
    assert "checkerboard" in fake and "upper left corner" in fake
    assert answer_for("fake", "scenery", "grid", "center").endswith("spectral peaks in the center.")
    with pytest.raises(ValueError, match="artifact"):
        answer_for("fake", "doc")


def test_answer_corpus_covers_every_answer_and_tokenizes_compactly(drawn: list[Sample]) -> None:
    corpus = answer_corpus()
    assert len(corpus) == len(set(corpus)) == len(CATEGORIES) * (1 + len(ARTIFACTS) * len(REGIONS))
    assert {s.answer for s in drawn} <= set(corpus)
    tokenizer = build_tiny_tokenizer()
    for answer in corpus:
        pieces = tokenizer.tokenize(answer)
        assert len(pieces) <= 36
        assert not [p for p in pieces if p.startswith("<0x")]  # no byte fallback: every word is known


def test_fakes_carry_a_periodic_spectral_peak_that_reals_lack(drawn: list[Sample]) -> None:
    for s in drawn:
        ratio = periodic_peak_ratio(as_model_sees_it(s.image))
        if s.label == "fake":
            assert ratio > PEAK, (s.artifact, s.region, s.category, ratio)
        else:
            assert ratio < PEAK / 2, (s.category, ratio)


@pytest.mark.parametrize(("region", "opposite"), [("upper-left", (1, 1)), ("lower-right", (0, 0))])
def test_the_fingerprint_is_where_the_answer_says(region: str, opposite: tuple[int, int]) -> None:
    index = next(i for i in range(0, 400, 2) if make_sample(21, i).region == region)
    image = as_model_sees_it(make_sample(21, index).image)
    row, col = (0, 0) if region == "upper-left" else (1, 1)

    def quadrant(r: int, c: int) -> Image.Image:
        return image.crop((c * 168, r * 168, c * 168 + 168, r * 168 + 168))

    assert periodic_peak_ratio(quadrant(row, col)) > PEAK
    assert periodic_peak_ratio(quadrant(*opposite)) < PEAK / 2


def test_region_masks() -> None:
    assert region_mask("whole", 448, 336).min() == 1.0
    upper_left = region_mask("upper-left", 336, 336)
    assert upper_left[:160, :160].min() == 1.0 and upper_left[176:, :].max() == 0.0 and upper_left[:, 176:].max() == 0.0
    center = region_mask("center", 448, 336)
    assert center[168, 224] == 1.0 and center[:80, :].max() == 0.0
    total = sum(region_mask(r, 336, 336) for r in ("upper-left", "upper-right", "lower-left", "lower-right"))
    np.testing.assert_allclose(total, 1.0, atol=1e-9)


def test_write_fakeclue(tmp_path: Path) -> None:
    path = write_fakeclue(tmp_path / "set", 6, seed=4)
    records = json.loads(path.read_text())
    assert len(records) == 6
    for index, record in enumerate(records):
        sample = make_sample(4, index)
        assert set(record) == {"image", "label", "cate", "width", "height", "conversations"}
        assert record["label"] == (0 if sample.label == "fake" else 1)  # FakeClue: 0 = fake, 1 = real
        assert record["cate"] == sample.category
        assert record["conversations"] == [
            {"from": "human", "value": PROMPT},
            {"from": "gpt", "value": sample.answer},
        ]
        image_path = path.parent / record["image"]
        assert not Path(record["image"]).is_absolute() and image_path.is_file()
        with Image.open(image_path) as stored:
            assert (stored.width, stored.height) == (record["width"], record["height"])
            assert stored.convert("RGB").tobytes() == sample.image.tobytes()  # lossless


def test_write_images_names_files_by_their_truth(tmp_path: Path) -> None:
    paths = write_images(tmp_path, 3, seed=4)
    assert [p.name for p in paths] == ["fake-00000.png", "real-00001.png", "fake-00002.png"]
    with Image.open(paths[1]) as stored:
        assert stored.convert("RGB").tobytes() == make_sample(4, 1).image.tobytes()
