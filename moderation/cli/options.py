"""The options several command groups take, and the one way a command reads its settings."""

from __future__ import annotations

from enum import StrEnum
from pathlib import Path
from typing import Annotated

import typer

from moderation.settings import Settings

DEFAULT_HOME = Path(".moderation")

EnvFile = Annotated[Path | None, typer.Option("--env-file", help="KEY=VALUE file, e.g. a stack's stack.env.")]
RunDir = Annotated[Path, typer.Option("--run-dir", help="Where the stack keeps its state and logs.")]
Checkpoint = Annotated[
    str | None,
    typer.Option(
        "--model",
        "--checkpoint",
        help="FakeVLM weights: a local directory, or a hub id such as lingcco/fakeVLM from the Hugging Face cache.",
    ),
]
TritonUrl = Annotated[str | None, typer.Option("--triton", help="Score on Triton at this gRPC host:port instead.")]
Device = Annotated[str, typer.Option(help="In-process device: cpu, cuda or cuda:N.")]
BatchSize = Annotated[int, typer.Option(min=1, help="Images per batch.")]
Markdown = Annotated[Path | None, typer.Option(help="Also write the markdown table here.")]


class WeightsDtype(StrEnum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


Dtype = Annotated[
    WeightsDtype | None,
    typer.Option(help="In-process weights dtype (default: bfloat16 on CUDA, float32 on CPU; bfloat16 halves the RAM)."),
]


def load_settings(env_file: Path | None) -> Settings:
    """The environment's settings, completed by `env_file`. A bad value is the root's to report (cli/main.py)."""
    return Settings(_env_file=env_file) if env_file else Settings()  # type: ignore[call-arg]


def required_model(checkpoint: str | None) -> str:
    """The weights asked for: no tool here falls back to a test model."""
    if checkpoint is None:
        raise typer.BadParameter(
            "which weights? --model lingcco/fakeVLM (or a directory); for a plumbing run on the trained tiny "
            "test model: --model models/fakevlm-tiny-trained",
            param_hint="--model",
        )
    return checkpoint
