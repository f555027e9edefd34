"""`moderation scan`, `moderation eval` and `moderation precision`: the offline tools, from a laptop or a batch
job (moderation/offline/)."""

from __future__ import annotations

import asyncio
import re
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moderation.cli.options import (
    BatchSize,
    Checkpoint,
    Device,
    Dtype,
    EnvFile,
    Markdown,
    TritonUrl,
    WeightsDtype,
    load_settings,
    required_model,
)
from moderation.cli.output import console, warn
from moderation.model import EVAL_MAX_NEW_TOKENS
from moderation.offline.thresholds import DEFAULT_FLAG_PRECISION, DEFAULT_REVIEW_PRECISION
from moderation.settings import Settings

if TYPE_CHECKING:
    from moderation.model.detectors import InProcessDetector, TritonDetector

app = typer.Typer()

ExplainAbove = Annotated[float | None, typer.Option(help="Explain when P(fake) >= this (default: settings).")]
EmbeddingModel = Annotated[str | None, typer.Option(help="CSS model: a sentence-transformers path or cached name.")]
Predictions = Annotated[Path | None, typer.Option(help="Per-image JSONL: prediction, explanation, reference.")]
ReportOut = Annotated[Path, typer.Option(help="The report as JSON.")]


@app.command("scan")
def scan(
    paths: Annotated[list[Path], typer.Argument(help="Image files and directories (searched recursively).")],
    out: Annotated[Path, typer.Option(help="JSONL: one record per file.")] = Path("results.jsonl"),
    html: Annotated[Path | None, typer.Option(help="Also write a self-contained HTML report.")] = None,
    checkpoint: Checkpoint = None,
    triton: TritonUrl = None,
    batch_size: BatchSize = 16,
    explain_above: ExplainAbove = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    env_file: EnvFile = None,
) -> None:
    """Detect AI-generated images among local files, offline; unreadable files are reported, never fatal."""
    from moderation.model.detectors import running
    from moderation.offline.results import ScanSummary
    from moderation.offline.scan import scan, summary_json
    from moderation.policy import Policy

    settings = load_settings(env_file)
    limit = settings.explain_above if explain_above is None else explain_above
    policy = Policy(settings.review_threshold, settings.flag_threshold, limit)
    detector = _detector(checkpoint, triton, device, dtype, batch_size, threshold=settings.label_threshold)

    async def run() -> ScanSummary:
        async with running(detector) as started:
            return await scan(
                paths,
                started,
                out=out,
                html=html,
                batch_size=batch_size,
                explain_above=limit,
                max_pixels=settings.max_image_pixels,
                policy=policy,
                progress=True,
                console=console,
            )

    summary = asyncio.run(run())
    console.print_json(summary_json(summary))
    console.print(f"Wrote {out}" + (f" and {html}" if html else ""))


@app.command("eval")
def evaluate(
    data: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="FakeClue-format json.")],
    images: Annotated[Path, typer.Option(exists=True, file_okay=False, help="Directory the json's images are in.")],
    checkpoint: Checkpoint = None,
    triton: TritonUrl = None,
    embedding_model: EmbeddingModel = None,
    out: ReportOut = Path("report.json"),
    markdown: Markdown = None,
    html: Annotated[Path | None, typer.Option(help="Also write the report, plots included, as HTML.")] = None,
    predictions: Predictions = None,
    batch_size: BatchSize = 16,
    device: Device = "cpu",
    dtype: Dtype = None,
    free_generation: Annotated[
        bool,
        typer.Option(help="Also answer freely as FakeVLM's eval.py (slow; in-process only): the paper's figures."),
    ] = True,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Free answer length (the default is FakeVLM's eval.py's).")
    ] = EVAL_MAX_NEW_TOKENS,
    review_precision: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Propose the lowest review threshold with this precision.")
    ] = DEFAULT_REVIEW_PRECISION,
    flag_precision: Annotated[
        float, typer.Option(min=0.0, max=1.0, help="Propose the lowest flag threshold with this precision.")
    ] = DEFAULT_FLAG_PRECISION,
) -> None:
    """Acc/F1 (verdict-first and, paper-comparable, free answers), ROUGE-L, CSS, ROC-AUC and thresholds on a
    FakeClue-format set."""
    from moderation.model.detectors import InProcessDetector, running
    from moderation.offline.evaluate import evaluate
    from moderation.offline.freegen import FreeAnswerer, free_answers
    from moderation.offline.report import evaluation_html
    from moderation.offline.results import Report

    detector = _detector(checkpoint, triton, device, dtype, batch_size)
    if free_generation and triton is not None:
        warn("free generation needs the weights in this process: not run with --triton (no paper-comparable figures)")

    def answerer(started: InProcessDetector) -> FreeAnswerer:
        # The detector's own model: the verdict-first pass is over when the free one starts.
        vlm = started.vlm
        return lambda pixels: free_answers(vlm, pixels, max_new_tokens=max_new_tokens)

    async def run() -> Report:
        async with running(detector) as started:
            free = answerer(started) if free_generation and isinstance(started, InProcessDetector) else None
            return await evaluate(
                data,
                images,
                started,
                embedding_model=embedding_model,
                batch_size=batch_size,
                predictions_out=predictions,
                progress=True,
                console=console,
                free_answerer=free,
                free_max_new_tokens=max_new_tokens,
                review_precision=review_precision,
                flag_precision=flag_precision,
            )

    report = asyncio.run(run())
    table = report.markdown()
    _write(out, report.model_dump_json(indent=2) + "\n")
    if markdown is not None:
        _write(markdown, table + "\n")
    if html is not None:
        _write(html, evaluation_html(report))
    print(re.sub(r"<svg.*?</svg>\n", "", table, flags=re.DOTALL))  # the plot is for the files, not the terminal
    console.print(f"Wrote {', '.join(str(p) for p in (out, markdown, html) if p is not None)}")


@app.command("precision")
def precision(
    source: Annotated[
        str,
        typer.Argument(
            help="`topic` (MODERATION_TOPIC_DECISIONS, read to its end, nothing committed) or a JSON-lines file "
            "of Decision messages."
        ),
    ],
    env_file: EnvFile = None,
    out: ReportOut = Path("precision.json"),
    markdown: Markdown = None,
) -> None:
    """The model's precision on its fake calls, per tenant and action, by the reviewers' decisions."""
    from moderation.offline import precision

    if source == "topic":
        settings = load_settings(env_file)
        found, bad = asyncio.run(precision.read_topic(settings))
        where = f"topic {settings.topic_decisions}"
    elif Path(source).is_file():
        found, bad = precision.read_file(Path(source))
        where = source
    else:
        raise typer.BadParameter(f"{source!r} is neither `topic` nor a file", param_hint="SOURCE")
    if bad:
        warn(f"{bad} records are not Decision messages: skipped")
    report = precision.precision_report(found, where)
    _write(out, report.model_dump_json(indent=2) + "\n")
    if markdown is not None:
        _write(markdown, report.markdown() + "\n")
    print(report.markdown())
    console.print(f"Wrote {', '.join(str(p) for p in (out, markdown) if p is not None)}")


def _detector(
    checkpoint: str | None,
    triton: str | None,
    device: str,
    dtype: WeightsDtype | None,
    batch_size: int,
    *,
    threshold: float = 0.5,
) -> InProcessDetector | TritonDetector:
    """The in-process or Triton detector of scan and eval, from their shared options: one of them is required,
    as no tool here falls back to a test model."""
    from moderation.model.detectors import InProcessDetector, TritonDetector

    if checkpoint is not None and triton is not None:
        raise typer.BadParameter("give --model or --triton, not both")
    if triton is not None:
        return TritonDetector(Settings.model_validate({"triton_url": triton}))
    return InProcessDetector(
        required_model(checkpoint),
        device=device,
        dtype=dtype.value if dtype else None,
        batch_size=batch_size,
        threshold=threshold,
    )


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
