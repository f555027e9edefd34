"""`moderation model`: tiny checkpoints built and trained here, and whether verdict-first holds for weights."""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from moderation.cli.options import Checkpoint, Device, Dtype, required_model
from moderation.cli.output import console, warn, yes
from moderation.model import EVAL_MAX_NEW_TOKENS

if TYPE_CHECKING:
    from moderation.devkit.training import TrainProgress
    from moderation.offline.modelcheck import CheckReport

app = typer.Typer(name="model", help="Model checkpoints.", no_args_is_help=True)


@app.command("build-tiny")
def build_tiny(out_dir: Annotated[Path, typer.Argument(help="Where to write the checkpoint.")]) -> None:
    """Build the tiny FakeVLM-architecture checkpoint used by tests and the demo (no downloads)."""
    from moderation.devkit.tinymodel import build_tiny_checkpoint

    console.print(f"Tiny checkpoint ready at {build_tiny_checkpoint(out_dir)}")


@app.command("train-tiny")
def train_tiny(
    out_dir: Annotated[
        Path | None,
        typer.Option("--out-dir", help="Where to save it (default: the repository's models/fakevlm-tiny-trained)."),
    ] = None,
    seed: Annotated[int, typer.Option(help="Seeds the initial weights and the training images.")] = 0,
    steps: Annotated[int | None, typer.Option(min=1, help="Training steps (default: the committed model's).")] = None,
) -> None:
    """Train the tiny FakeVLM on synthetic images with known answers (CPU, minutes, deterministic)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn

    from moderation.devkit.training import DEFAULT_STEPS, TRAINED_CHECKPOINT, read_metrics, train_tiny_fakevlm

    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, TextColumn("{task.fields[loss]}"), console=console) as bar:
        tasks: dict[str, TaskID] = {}

        def show(p: TrainProgress) -> None:
            if p.phase not in tasks:
                tasks[p.phase] = bar.add_task(p.phase, total=p.total, loss="")
            loss = f"loss {p.loss:.4f}  verdict {p.verdict_loss:.4f}" if p.loss is not None else ""
            bar.update(tasks[p.phase], completed=p.done, loss=loss)
            if not console.is_terminal and (p.done % 25 == 0 or p.done == p.total):
                console.print(f"{p.phase} {p.done}/{p.total} {loss}")  # a log file gets no live bar

        path = train_tiny_fakevlm(out_dir or TRAINED_CHECKPOINT, seed=seed, steps=steps or DEFAULT_STEPS, progress=show)
    console.print_json(json.dumps(read_metrics(path)))
    console.print(f"Trained tiny FakeVLM saved to {path}")


@app.command("check")
def check_weights(
    images: Annotated[list[Path], typer.Argument(help="Image files or folders: a few dozen, real and fake.")],
    checkpoint: Checkpoint = None,
    device: Device = "cpu",
    dtype: Dtype = None,
    max_new_tokens: Annotated[
        int, typer.Option(min=1, help="Free answer length (the default is FakeVLM's eval.py's).")
    ] = EVAL_MAX_NEW_TOKENS,
    out: Annotated[Path | None, typer.Option(help="Write the report, every answer included, as JSON.")] = None,
) -> None:
    """Is verdict-first valid for this checkpoint? Free greedy answers (as FakeVLM's eval.py) vs the forced verdict."""
    from moderation.model.fakevlm import FakeVLM
    from moderation.offline.modelcheck import check, load_images

    source = required_model(checkpoint)
    pixels, used, skipped = load_images(images)
    for reason in skipped:
        warn(f"skipped {reason}")
    if not used:
        raise typer.BadParameter("no readable image among IMAGES")
    vlm = FakeVLM.load(source, device=device, dtype=dtype.value if dtype else None)
    report = check(vlm, pixels, max_new_tokens=max_new_tokens)
    if out is not None:
        out.write_text(report.to_json() + "\n")
    console.print(f"{vlm.model_id}: {report.images} images")
    for line in _check_lines(report):
        console.print(f"  {line}")


def _check_lines(report: CheckReport) -> list[str]:
    from moderation.model.fakevlm import ANSWER_PREFIX

    agreement = "n/a" if report.agreement is None else f"{report.agreement:.1%}"
    lines = [
        f"free answers starting with {ANSWER_PREFIX!r}: {report.prefix_share:.1%}",
        f"verdict-first label = free answer's label (eval rule): {agreement} of {report.labelled}",
    ]
    if report.disagreements:
        lines.append(
            f"{report.disagreements} disagree; |P(fake) - 0.5| there: mean {report.margin_mean:.3f}, "
            f"max {report.margin_max:.3f}"
        )
    return [*lines, f"verdict-first valid for this checkpoint: {yes(report.verdict_first_valid)}"]
