"""`moderation dev`: the embedded local stack."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import typer
from rich.table import Table

from moderation.cli.options import DEFAULT_HOME, Checkpoint, RunDir
from moderation.cli.output import console, yes

if TYPE_CHECKING:
    from moderation.devkit.localstack import ServerStatus

app = typer.Typer(
    name="dev", help="The embedded local stack: Tansu (Kafka), SeaweedFS (S3), Triton.", no_args_is_help=True
)


@app.command("up")
def up(run_dir: RunDir = DEFAULT_HOME / "stack", checkpoint: Checkpoint = None) -> None:
    """Start Tansu, SeaweedFS and Triton on free ports, create topics and bucket, write stack.env."""
    from moderation.devkit import localstack
    from moderation.devkit.checkpoints import default_checkpoint

    served: str | Path | None = checkpoint
    if served is None:
        served, trained = default_checkpoint(run_dir.parent)
        console.print(f"Serving the {'trained' if trained else 'RANDOM'} tiny FakeVLM at {served}")
    repository = localstack.model_repository_for(run_dir.parent, served)
    info = localstack.up(run_dir, model_repository=repository, progress=console.log)
    console.print(f"Stack is up. Point a worker or client at it with: --env-file {run_dir / 'stack.env'}")
    for name, value in info.env().items():
        console.print(f"  {name}={value}")


@app.command("down")
def down(run_dir: RunDir = DEFAULT_HOME / "stack") -> None:
    """Stop exactly the servers `dev up` started."""
    from moderation.devkit import localstack

    stopped = localstack.down(run_dir)
    console.print(f"Stopped: {', '.join(stopped) or 'nothing was running'}")


@app.command("status")
def status(run_dir: RunDir = DEFAULT_HOME / "stack") -> None:
    """Report each server of the local stack: alive, ready, address, log file."""
    from moderation.devkit import localstack

    statuses = localstack.status(run_dir)
    console.print(_servers_table(statuses))
    if not all(s.ready for s in statuses):
        raise typer.Exit(1)


def _servers_table(statuses: Sequence[ServerStatus]) -> Table:
    table = Table("server", "pid", "alive", "ready", "address", "log")
    for s in statuses:
        table.add_row(s.name, str(s.pid), yes(s.alive), yes(s.ready), s.address, str(s.log_file))
    return table
