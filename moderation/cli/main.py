"""The root of the `moderation` command: it registers the command modules and owns the one error handler.

A command raises; the root decides what the user sees. A `ModerationError` (a configuration the command cannot
run with, an unreachable server, a bad input file) or an invalid `MODERATION_*` value is one red line on standard
error and exit status 2; anything else is a bug, and crashes with its traceback and exit status 1.
"""

from __future__ import annotations

import logging
from typing import Any

import typer
from pydantic import ValidationError
from typer.core import TyperGroup

from moderation.cli import bank, contracts, demo, dev, dlq, model, offline, policy, review, topics, worker
from moderation.cli.options import load_settings
from moderation.cli.output import error
from moderation.errors import ModerationError
from moderation.settings import Settings, invalid_settings

# The command's groups and top-level commands, in the order `moderation --help` lists them.
COMMAND_MODULES = (worker, demo, topics, offline, contracts, dev, dlq, model, review, policy, bank)


class _Root(TyperGroup):
    """Every command, in any group, runs inside the root's `invoke`: its handler is every command's, under the
    console script and a test's CliRunner alike."""

    def invoke(self, ctx: typer.Context) -> Any:  # type: ignore[override]  # Typer's own click Context
        try:
            if not _asks_for_help(ctx):
                check_environment()
            return super().invoke(ctx)
        except ModerationError as exc:
            error(str(exc))
            raise typer.Exit(2) from exc
        except ValidationError as exc:
            if exc.title != Settings.__name__:
                raise  # a message or file the command should have refused itself: a bug
            error(invalid_settings(exc))
            raise typer.Exit(2) from exc


def _asks_for_help(ctx: typer.Context) -> bool:
    """Help needs no settings: `moderation worker --help` answers whatever the environment holds."""
    return any(arg in ctx.help_option_names for arg in ctx.args)


def check_environment() -> None:
    """Every `MODERATION_*` variable parses, whichever command runs: a bad value stops it before any work.
    Whether the values agree with each other is the command's own settings' check, as its --env-file may
    complete them."""
    try:
        load_settings(None)
    except ValidationError as exc:
        if any(problem["loc"] for problem in exc.errors()):
            raise


app = typer.Typer(cls=_Root, help="Spot AI-generated images in an upload stream with FakeVLM.", no_args_is_help=True)
for module in COMMAND_MODULES:
    app.add_typer(module.app)


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    app()
