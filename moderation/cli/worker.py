"""`moderation worker` and `moderation explainer`: the stream processes the worker image runs."""

from __future__ import annotations

import asyncio
import logging.config

import typer

from moderation.cli.options import EnvFile, load_settings
from moderation.errors import ModerationError

app = typer.Typer()


def _require_worker_extra() -> None:
    """The stream processes' libraries are the `worker` extra (the review console's image leaves them out)."""
    try:
        import faust  # noqa: F401
    except ModuleNotFoundError as exc:
        raise ModerationError(
            f"{exc.name} is not installed: the stream worker needs pip install 'moderation[worker]'"
        ) from exc


@app.command()
def worker(env_file: EnvFile = None) -> None:
    """Run the stream worker (a Faust app) until SIGTERM or Ctrl-C."""
    _require_worker_extra()
    from moderation.logs import logging_config
    from moderation.worker import tracing
    from moderation.worker.app import create_app
    from moderation.worker.crashonly import Worker

    settings = load_settings(env_file)
    settings.data_dir.mkdir(parents=True, exist_ok=True)
    if settings.event_loop == "uvloop":
        import mode.loop

        mode.loop.use("uvloop")  # the policy: Faust's consumer thread makes its own loop, uvloop too
    tracing.configure()
    Worker(
        create_app(settings),
        loglevel=settings.log_level,
        logging_config=logging_config(settings.log_level),
        quiet=True,
        shutdown_grace_s=settings.shutdown_grace_s,
    ).execute_from_commandline()


@app.command()
def explainer(env_file: EnvFile = None) -> None:
    """Run the explainer until SIGTERM or Ctrl-C: explanations for the verdicts that asked for one."""
    _require_worker_extra()
    from moderation.logs import logging_config
    from moderation.worker.explainer import serve

    settings = load_settings(env_file)
    logging.config.dictConfig(logging_config(settings.log_level))
    if settings.event_loop == "uvloop":
        import uvloop

        uvloop.run(serve(settings))
    else:
        asyncio.run(serve(settings))
