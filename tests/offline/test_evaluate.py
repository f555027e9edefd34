"""`moderation eval`: the metric arithmetic against hand-computed values (a fake detector whose answer
is the image's colour), then one end-to-end run with the real in-process detector and embedding model."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from moderation.cli.main import app
from moderation.devkit import localstack
from moderation.devkit.samples import write_samples
from moderation.events import ModelInfo
from moderation.model.detectors import Detection
from moderation.model.detectors.base import detect_each
from moderation.model.fakevlm import label_from_answer
from moderation.offline.evaluate import (
    DEFAULT_EMBEDDING_MODEL,
    DatasetError,
    evaluate,
    explanation_scores,
    load_fakeclue,
)
from moderation.offline.report import evaluation_html
from moderation.offline.results import Prediction, Sample
from moderation.offline.thresholds import lowest_meeting, operating_points, roc_auc, svg, sweep

FAKE_TEXT = "This is a fake image. Odd colours everywhere."
REAL_TEXT = "This is a real image. Natural light and shadows."
OTHER_FAKE = "This is a fake image. The fingers merge."  # a reference the detector never says


class ColourDetector:
    """Red-dominant images are fake (0.9), the rest real (0.1); explains each with a fixed text."""

    model = ModelInfo(name="colour", version="test")
    explain_model = model

    def __init__(self) -> None:
        self.explain_above: list[float] = []

    async def detect(self, crop: np.ndarray) -> Detection:
        fake = crop[..., 0].mean() > crop[..., 2].mean()
        return Detection(
            score=0.9 if fake else 0.1, label="fake" if fake else "real", explanation=None, answer_label=None
        )

    async def explain(self, crop: np.ndarray) -> Detection:
        verdict = await self.detect(crop)
        text = FAKE_TEXT if verdict.label == "fake" else REAL_TEXT
        return Detection(verdict.score, verdict.label, text, label_from_answer(text))

    async def detect_batch(self, pixels: np.ndarray, *, explain_above: float | Sequence[float]) -> list[Detection]:
        assert isinstance(explain_above, float)
        self.explain_above.append(explain_above)
        return await detect_each(self, pixels, explain_above)


def bag_of_labels(texts: Sequence[str]) -> np.ndarray:
    """An 'embedding' that only knows the verdict word (not unit length, to test normalisation)."""
    return np.array([[3.0, 0.0] if "fake" in t.split(".")[0] else [0.0, 2.0] for t in texts])


# (image colour the detector sees, truth label 0 fake / 1 real, category, reference answer)
ROWS = [
    ("red", 0, "animal", FAKE_TEXT),  # fake -> fake
    ("blue", 0, "animal", FAKE_TEXT),  # fake -> real (miss)
    ("blue", 1, "animal", REAL_TEXT),  # real -> real
    ("red", 1, "human", REAL_TEXT),  # real -> fake (false alarm)
    ("red", 0, "human", OTHER_FAKE),  # fake -> fake
    ("blue", 1, "human", REAL_TEXT),  # real -> real
    ("blue", 1, "doc", REAL_TEXT),  # real -> real
    ("red", 0, "doc", FAKE_TEXT),  # fake -> fake
    ("blue", 1, "scenery", REAL_TEXT),  # real -> real: a category without a single fake
]


def fakeclue_row(image: str, label: int, cate: str, reference: str) -> dict[str, object]:
    return {
        "image": image,
        "label": label,
        "cate": cate,
        "width": 64,
        "height": 48,
        "conversations": [
            {"from": "human", "value": "<image>\nDoes the image looks real/fake?"},
            {"from": "gpt", "value": reference},
        ],
    }


@pytest.fixture
def dataset(tmp_path: Path) -> tuple[Path, Path]:
    images = tmp_path / "images"
    (images / "sub").mkdir(parents=True)
    rows = []
    for i, (colour, label, cate, reference) in enumerate(ROWS):
        name = f"sub/{i:02d}.png"
        Image.new("RGB", (64, 48), colour).save(images / name)
        rows.append(fakeclue_row(name, label, cate, reference))
    (images / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    rows.append(fakeclue_row("broken.jpg", 0, "animal", FAKE_TEXT))
    rows.append(fakeclue_row("missing.png", 1, "doc", REAL_TEXT))
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    return data, images


async def test_metrics_match_hand_computed_values(dataset: tuple[Path, Path], tmp_path: Path) -> None:
    data, images = dataset
    detector = ColourDetector()
    report = await evaluate(
        data,
        images,
        detector,
        embedder=bag_of_labels,
        embedding_model="bag-of-labels",
        batch_size=4,
        predictions_out=tmp_path / "predictions.jsonl",
    )
    assert detector.explain_above == [0.0, 0.0, 0.0]  # every image explained, 11 rows in batches of 4
    assert (report.n, report.failed, report.failures) == (11, 2, {"invalid_image": 1, "not_found": 1})
    # 9 scored: 7 correct; fake positive: TP 3, FP 1, FN 1 -> F1 6/8.
    assert report.overall.n == 9
    assert report.overall.accuracy == pytest.approx(7 / 9)
    assert report.overall.f1 == pytest.approx(6 / 8)
    # Per class, over the class's own images: 4 of 5 real right -> F1 8/9; 3 of 4 fake -> F1 6/7.
    assert (report.real.n, report.real.accuracy, report.real.f1) == (5, pytest.approx(4 / 5), pytest.approx(8 / 9))
    assert (report.fake.n, report.fake.accuracy, report.fake.f1) == (4, pytest.approx(3 / 4), pytest.approx(6 / 7))
    cats = report.categories
    assert set(cats) == {"animal", "human", "doc", "scenery"}
    assert (cats["animal"].accuracy, cats["animal"].f1) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (cats["human"].accuracy, cats["human"].f1) == (pytest.approx(2 / 3), pytest.approx(2 / 3))
    assert (cats["doc"].accuracy, cats["doc"].f1) == (1.0, 1.0)
    assert (cats["scenery"].n, cats["scenery"].accuracy, cats["scenery"].f1) == (1, 1.0, None)  # F1 undefined
    # ROUGE-L: 6 explanations equal their reference (1.0). The 2 wrong verdicts: FAKE_TEXT (8 tokens) vs
    # REAL_TEXT (9) share "this is a image": P, R = 4/8, 4/9 -> F 8/17. "The fingers merge" (8 tokens)
    # shares "this is a fake image" with FAKE_TEXT: 5/8 both ways.
    assert report.explanations.rouge_l == pytest.approx((6 + 2 * 8 / 17 + 5 / 8) / 9)
    # CSS with the verdict-word embedding: 1 when the verdict words match, 0 for the 2 wrong verdicts.
    assert report.explanations.css == pytest.approx(7 / 9)
    assert report.explanations.embedding_model == "bag-of-labels"
    assert (report.explanations.n, report.explanations.disagreements, report.explanations.undecided) == (9, 0, 0)

    lines = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert [row["image"] for row in lines] == [f"sub/{i:02d}.png" for i in range(9)] + ["broken.jpg", "missing.png"]
    assert lines[1] | {"score": None} == {
        "image": "sub/01.png",
        "cate": "animal",
        "truth": "fake",
        "label": "real",
        "score": None,
        "answer_label": "real",
        "explanation": REAL_TEXT,
        "reference": FAKE_TEXT,
        "error": None,
        "free_text": None,
        "free_label": None,
    }
    assert lines[-1]["error"] == "not_found" and lines[-1]["label"] is None

    table = report.markdown()
    assert "| overall | 9 | 77.8 | 75.0 |" in table
    assert "| category: scenery | 1 | 100.0 | – |" in table
    assert "CSS embedding model: bag-of-labels" in table
    assert "paper's figures" in table and "| DMimage | overall | 94.0 | 94.3 |" in table
    assert report.free_generation is None and "Free generation was not run" in table


def colour_answerer(pixels: np.ndarray) -> list[str]:
    """Free answers: red-dominant images are called fake, the rest get an answer with no verdict word."""
    return [FAKE_TEXT if p[..., 0].mean() > p[..., 2].mean() else "A dog sits on the grass." for p in pixels]


async def test_free_answers_give_the_text_rule_figures_and_the_sweep(
    dataset: tuple[Path, Path], tmp_path: Path
) -> None:
    data, images = dataset
    report = await evaluate(
        data,
        images,
        ColourDetector(),
        embedder=bag_of_labels,
        embedding_model="bag-of-labels",
        batch_size=4,
        predictions_out=tmp_path / "predictions.jsonl",
        free_answerer=colour_answerer,
        free_max_new_tokens=7,
        review_precision=0.70,
        flag_precision=0.95,
    )
    free = report.free_generation
    assert free is not None and (free.max_new_tokens, free.answered, free.undecided) == (7, 9, 5)
    # Red (0, 3, 4, 7) -> fake: 3 right; the 5 blue say nothing and count as wrong; fake positive: TP 3,
    # FP 1 (3), FN 1 (1, undecided) -> F1 6/8. No real image is called real: Acc 0, F1 0.
    assert (free.overall.n, free.overall.accuracy, free.overall.f1) == (9, pytest.approx(3 / 9), pytest.approx(6 / 8))
    assert (free.real.n, free.real.accuracy, free.real.f1) == (5, 0.0, 0.0)
    assert (free.fake.accuracy, free.fake.f1) == (pytest.approx(3 / 4), pytest.approx(6 / 7))
    assert set(free.categories) == {"animal", "human", "doc", "scenery"}
    assert (free.categories["scenery"].accuracy, free.categories["doc"].accuracy) == (0.0, 0.5)
    # P(fake) 0.9 on red (3 fake, 1 real), 0.1 on blue (1 fake, 4 real). AUC: each red fake beats the 4
    # blue reals and ties the red real (4.5), the blue fake ties 4 blue reals (2): 15.5 / 20.
    sweep = report.thresholds
    assert sweep is not None and (sweep.n, sweep.positives) == (9, 4)
    assert sweep.roc_auc == pytest.approx(15.5 / 20)
    assert [(p.threshold, p.precision, p.recall, p.fpr) for p in sweep.points] == [
        (0.9, 0.75, 0.75, 0.2),
        (0.1, pytest.approx(4 / 9), 1.0, 1.0),
    ]
    assert sweep.review.threshold is not None and sweep.review.threshold.threshold == 0.9
    assert sweep.flag.target_precision == 0.95 and sweep.flag.threshold is None

    rows = [json.loads(line) for line in (tmp_path / "predictions.jsonl").read_text().splitlines()]
    assert (rows[0]["free_text"], rows[0]["free_label"]) == (FAKE_TEXT, "fake")
    assert (rows[1]["free_text"], rows[1]["free_label"]) == ("A dog sits on the grass.", None)
    assert rows[-1]["free_text"] is None  # not scored: not answered either

    table = report.markdown()
    assert "| overall | 9 | 77.8 | 75.0 | 33.3 | 75.0 |" in table
    assert "| real | 5 | 80.0 | 88.9 | 0.0 | 0.0 |" in table
    assert "Paper-comparable: the free, text rule columns" in table and "max_new_tokens 7" in table
    assert "ROC-AUC of P(fake) (fake positive, 9 images): 0.7750." in table
    assert "MODERATION_REVIEW_THRESHOLD=0.9000: the lowest threshold with precision >= 0.70" in table
    assert "MODERATION_FLAG_THRESHOLD: no threshold reaches precision >= 0.95" in table
    assert table.count("<svg") == 1 and "AUC 0.775" in table
    page = evaluation_html(report)
    assert page.startswith("<!doctype html>") and "<svg" in page and "&lt;image&gt;" not in page


def test_explanation_scores_count_disagreements_and_undecided() -> None:
    def prediction(label: str, explanation: str | None) -> Prediction:
        sample = Sample(image="x.png", label="fake", cate="animal", reference=FAKE_TEXT)
        answer = label_from_answer(explanation) if explanation is not None else None
        return Prediction(sample, label, 0.5, explanation, answer)  # type: ignore[arg-type]

    scores = explanation_scores(
        [
            prediction("fake", FAKE_TEXT),
            prediction("fake", REAL_TEXT),  # the text says real: a disagreement
            prediction("real", FAKE_TEXT),  # and the other way round
            prediction("real", "The image is blurry."),  # states no label: undecided
            prediction("real", None),  # not explained: not scored
        ],
        bag_of_labels,
        "bag",
    )
    assert (scores.n, scores.disagreements, scores.undecided) == (4, 2, 1)
    assert scores.css == pytest.approx((1 + 0 + 1 + 0) / 4)  # "blurry" has no verdict word: [0, 2]


def test_empty_scopes_have_no_metrics() -> None:
    scores = explanation_scores([], bag_of_labels, "bag")
    assert (scores.n, scores.rouge_l, scores.css) == (0, None, None)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "cannot read"),
        ('{"image": "a.png"}', "expected a JSON list"),
        ('[{"image": "a.png", "label": 2}]', "'label' must be 0 (fake) or 1 (real)"),
        ('[{"image": "", "label": 0}]', "'image' must be a non-empty string"),
        ('[{"image": "a.png", "label": true}]', "'label' must be"),
    ],
)
def test_bad_datasets_are_refused_with_the_row(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "data.json"
    path.write_text(content)
    with pytest.raises(DatasetError, match=message.replace("(", r"\(").replace(")", r"\)")):
        load_fakeclue(path)


def test_fakeclue_labels_and_reference_are_read_as_the_paper_defines_them(tmp_path: Path) -> None:
    path = tmp_path / "data.json"
    rows = [fakeclue_row("a.png", 0, "animal", FAKE_TEXT), fakeclue_row("b.png", 1, "doc", REAL_TEXT)]
    rows.append({"image": "c.png", "label": "1"})  # no cate, no conversations: still usable
    path.write_text(json.dumps(rows))
    assert load_fakeclue(path) == [
        Sample("a.png", "fake", "animal", FAKE_TEXT),
        Sample("b.png", "real", "doc", REAL_TEXT),
        Sample("c.png", "real", "unknown", ""),
    ]


@pytest.mark.slow
def test_eval_command_end_to_end_with_the_in_process_detector(tiny_checkpoint: Path, tmp_path: Path) -> None:
    images = tmp_path / "images"
    paths = write_samples(images, 4)
    rows = [
        fakeclue_row(p.name, i % 2, "animal" if i < 2 else "object", FAKE_TEXT if i % 2 == 0 else REAL_TEXT)
        for i, p in enumerate(paths)
    ]
    data = tmp_path / "data.json"
    data.write_text(json.dumps(rows))
    out, markdown, predictions = tmp_path / "report.json", tmp_path / "report.md", tmp_path / "pred.jsonl"

    result = CliRunner().invoke(
        app,
        [
            "eval",
            str(data),
            "--images",
            str(images),
            "--checkpoint",
            str(tiny_checkpoint),
            "--out",
            str(out),
            "--markdown",
            str(markdown),
            "--predictions",
            str(predictions),
            "--batch-size",
            "3",
            "--no-free-generation",
        ],
    )

    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 4 and report["failed"] == 0
    assert (
        report["model"]["name"] == "fakevlm-in-process" and str(tiny_checkpoint.resolve()) in report["model"]["version"]
    )
    assert set(report["categories"]) == {"animal", "object"}
    assert report["explanations"]["embedding_model"].startswith(DEFAULT_EMBEDDING_MODEL)
    assert report["explanations"]["n"] == 4  # every image explained
    assert 0.0 <= report["explanations"]["rouge_l"] <= 1.0 and -1.0 <= report["explanations"]["css"] <= 1.0
    assert not math.isnan(report["overall"]["accuracy"])
    table = markdown.read_text()
    assert f"CSS embedding model: {DEFAULT_EMBEDDING_MODEL}" in table and "| overall | 4 |" in table
    assert "| overall | 4 |" in result.output and "<svg" not in result.output
    assert report["free_generation"] is None and "Free generation was not run" in table
    assert report["thresholds"]["n"] == 4 and len(report["thresholds"]["points"]) >= 1
    explained = [json.loads(line)["explanation"] for line in predictions.read_text().splitlines()]
    assert all(text.startswith("This is a") for text in explained)


@pytest.mark.slow
def test_eval_on_a_fakeclue_set_the_trained_model_has_never_seen(tmp_path: Path) -> None:
    """The whole `moderation eval` on a FakeClue-format set of held-out synthetic images, scored by the
    trained tiny FakeVLM: the figures must say what the model is known to do on them."""
    from moderation.devkit.synthetic import CATEGORIES, write_fakeclue
    from moderation.devkit.training import trained_checkpoint

    data = write_fakeclue(tmp_path / "set", 32, seed=777)
    out, markdown, html = tmp_path / "report.json", tmp_path / "report.md", tmp_path / "report.html"

    result = CliRunner().invoke(
        app,
        [
            *("eval", str(data), "--images", str(data.parent), "--model", str(trained_checkpoint())),
            *("--out", str(out), "--markdown", str(markdown), "--html", str(html), "--batch-size", "8"),
            *("--review-precision", "0.8", "--flag-precision", "0.95"),
        ],
    )

    assert result.exit_code == 0, result.output
    report = json.loads(out.read_text())
    assert report["n"] == 32 and report["failed"] == 0
    assert report["overall"]["accuracy"] >= 0.95 and report["fake"]["f1"] >= 0.95 and report["real"]["f1"] >= 0.95
    assert report["real"]["n"] == report["fake"]["n"] == 16
    assert set(report["categories"]) <= set(CATEGORIES) and sum(c["n"] for c in report["categories"].values()) == 32
    explanations = report["explanations"]
    assert explanations["n"] == 32 and explanations["disagreements"] == 0 and explanations["undecided"] == 0
    # Most answers name the right artifact and region word for word; the rest differ in a few words.
    assert explanations["rouge_l"] >= 0.85 and explanations["css"] >= 0.85
    assert "| overall | 32 | " in markdown.read_text()
    # Paper-comparable: free greedy answers (eval.py's settings) labelled by the text rule.
    free = report["free_generation"]
    assert free["max_new_tokens"] == 256 and free["answered"] == 32 and free["undecided"] == 0
    assert free["overall"]["accuracy"] >= 0.95 and free["fake"]["f1"] >= 0.95 and free["real"]["f1"] >= 0.95
    # The sweep: P(fake) separates the classes, and both targets are met with most fakes caught.
    sweep = report["thresholds"]
    assert sweep["n"] == 32 and sweep["positives"] == 16 and sweep["roc_auc"] >= 0.95
    for proposal in (sweep["review"], sweep["flag"]):
        point = proposal["threshold"]
        assert point["precision"] >= proposal["target_precision"] and point["recall"] >= 0.9
    assert sweep["review"]["threshold"]["threshold"] <= sweep["flag"]["threshold"]["threshold"]
    assert "Paper-comparable" in result.output and "MODERATION_FLAG_THRESHOLD=" in result.output
    assert "<svg" in html.read_text() and "<svg" in markdown.read_text()


def test_roc_auc_on_hand_made_scores() -> None:
    assert roc_auc([0.9, 0.8, 0.2, 0.1], [True, True, False, False]) == 1.0
    assert roc_auc([0.1, 0.2, 0.8, 0.9], [True, True, False, False]) == 0.0
    assert roc_auc([0.5, 0.5, 0.5], [True, False, True]) == 0.5  # all tied: chance
    # Fakes 0.9, 0.8, 0.1; reals 0.8, 0.3: wins 2 + (0.5 + 1) + 0 of 6 pairs.
    assert roc_auc([0.9, 0.8, 0.8, 0.3, 0.1], [True, True, False, False, True]) == pytest.approx(3.5 / 6)
    assert roc_auc([0.9, 0.1], [True, True]) is None  # one class: undefined


def test_sweep_proposes_the_lowest_threshold_that_meets_each_precision() -> None:
    scores = [0.95, 0.9, 0.8, 0.8, 0.6, 0.4, 0.3, 0.2]
    fake = [True, True, True, False, True, False, False, True]
    points = operating_points(scores, fake)
    # A tie is one threshold: 0.8 takes both of its images at once.
    assert [(p.threshold, p.precision, p.recall, p.fpr) for p in points] == [
        (0.95, 1.0, 0.2, 0.0),
        (0.9, 1.0, 0.4, 0.0),
        (0.8, 0.75, 0.6, pytest.approx(1 / 3)),
        (0.6, 0.8, 0.8, pytest.approx(1 / 3)),
        (0.4, pytest.approx(4 / 6), 0.8, pytest.approx(2 / 3)),
        (0.3, pytest.approx(4 / 7), 0.8, 1.0),
        (0.2, pytest.approx(5 / 8), 1.0, 1.0),
    ]
    result = sweep(scores, fake, review_precision=0.75, flag_precision=0.95)
    # Precision is not monotone in the threshold: 0.6 meets 0.75 although 0.8 just does; the lowest wins.
    assert result.review.threshold == points[3] and result.flag.threshold == points[1]
    assert lowest_meeting(points, 0.6) == points[6]
    assert lowest_meeting(points, 1.01) is None
    plot = svg(result)
    assert plot.startswith("<svg") and plot.endswith("</svg>") and "review 0.600" in plot and "flag 0.900" in plot


@pytest.mark.slow
def test_eval_on_triton_reports_the_sweep_and_says_free_generation_was_not_run(
    stack: localstack.StackInfo, tmp_path: Path
) -> None:
    """Triton serves verdict-first only: no free answers, so no paper-comparable figures, said twice."""
    from moderation.devkit.synthetic import write_fakeclue

    assert stack.triton_url is not None
    data = write_fakeclue(tmp_path / "set", 8, seed=99)
    out = tmp_path / "report.json"

    result = CliRunner().invoke(
        app, ["eval", str(data), "--images", str(data.parent), "--triton", stack.triton_url, "--out", str(out)]
    )

    assert result.exit_code == 0, result.output
    assert "free generation needs the weights" in result.output and "Free generation was not run" in result.output
    report = json.loads(out.read_text())
    assert report["n"] == 8 and report["failed"] == 0 and report["free_generation"] is None
    assert report["thresholds"]["n"] == 8 and report["thresholds"]["positives"] == 4
