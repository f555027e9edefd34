"""`moderation demo`: the whole flow on the local stack, for a first look."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from moderation.cli.options import DEFAULT_HOME, Checkpoint
from moderation.cli.output import console

app = typer.Typer()


@app.command()
def demo(
    workdir: Annotated[Path, typer.Option(help="Scratch directory for the stack and samples.")] = DEFAULT_HOME / "demo",
    checkpoint: Checkpoint = None,
    images: Annotated[int, typer.Option(min=1, help="Sample images to upload.")] = 12,
    keep_stack: Annotated[bool, typer.Option(help="Leave the stack up (for the review console).")] = False,
) -> None:
    """Bring the local stack up, push sample and bad uploads through a worker, show every outcome; then a
    reviewer's decision and a re-encoded copy of the fake it confirmed."""
    from moderation.devkit.demo import run_demo

    if not run_demo(workdir, checkpoint, console, images, keep_stack=keep_stack):
        raise typer.Exit(1)
