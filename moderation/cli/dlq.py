"""`moderation dlq`: the dead-letter topic, inspected and replayed."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Annotated

import typer
from rich.markup import escape
from rich.table import Table

from moderation.adapters.kafka import where
from moderation.cli.options import EnvFile, load_settings
from moderation.cli.output import console, yes
from moderation.errors import RETRYABLE, Reason

if TYPE_CHECKING:
    from moderation.offline.dlq import ReplayReport, Stored

app = typer.Typer(name="dlq", help="The dead-letter topic: inspect and replay.", no_args_is_help=True)

DETAIL_CHARS = 80  # of a letter's detail in the table


@app.command("inspect")
def inspect_letters(
    env_file: EnvFile = None,
    limit: Annotated[
        int, typer.Option(min=1, help="Show at most this many (reads at most this many a partition).")
    ] = 100,
    oldest: Annotated[bool, typer.Option("--oldest", help="The oldest first (default: the newest first).")] = False,
) -> None:
    """Show the dead letters, the newest first, with their reasons; records that are not dead letters are
    listed with where they are and why. Reading commits nothing."""
    from moderation.offline.dlq import read_dead_letters

    stored = asyncio.run(read_dead_letters(load_settings(env_file), limit=limit, newest_first=not oldest))
    console.print(_letters_table(stored))
    malformed = sum(s.letter is None for s in stored)
    console.print(
        f"{len(stored) - malformed} dead letters, {malformed} records that are not, "
        + ("oldest" if oldest else "newest")
        + " first"
    )


@app.command(
    "replay",
    help="Re-publish retryable dead letters to the uploads topic, byte for byte, with their attempt count. "
    "Progress is kept per reason code (consumer group <group>-dlq-replay.<reason>) and a replay moves only the "
    "groups of the reasons it replays, so a letter it skips for its reason is still there for a later replay "
    "of that reason; letters at the cap and permanent ones are final. Records that are not dead letters are "
    "reported and skipped. Run one replay at a time.",
)
def replay_letters(
    env_file: EnvFile = None,
    max_attempts: Annotated[
        int,
        typer.Option(min=1, help="Leave letters whose upload was delivered this often (attempts counts deliveries)."),
    ] = 5,
    reason: Annotated[
        list[str] | None, typer.Option(help="Only these retryable reason codes (repeatable; default: all of them).")
    ] = None,
    dry_run: Annotated[bool, typer.Option(help="Show what would be replayed; publish and commit nothing.")] = False,
) -> None:
    from moderation.offline.dlq import replay

    if wrong := [r for r in reason or () if r not in RETRYABLE]:
        retryable = ", ".join(sorted(RETRYABLE))
        raise typer.BadParameter(
            f"not a retryable reason code: {', '.join(wrong)} (retryable: {retryable})", param_hint="--reason"
        )
    reasons = {Reason(r) for r in reason} if reason else None
    settings = load_settings(env_file)
    report = asyncio.run(
        replay(settings, max_attempts=max_attempts, reasons=reasons, dry_run=dry_run, on_letter=_show_replayed)
    )
    console.print(_replay_summary(report) + (" (dry run: nothing published or committed)" if dry_run else ""))


def _letters_table(stored: Sequence[Stored]) -> Table:
    table = Table("event_id", "reason", "retryable", "attempts", "source", "dead letter", "last error", "detail")
    for s in stored:
        if (d := s.letter) is None:
            table.add_row("", "(not a dead letter)", "", "", "", s.where, "", escape(s.problem[:DETAIL_CHARS]))
            continue
        table.add_row(
            str(d.event_id),
            d.reason,
            yes(d.retryable),
            str(d.attempts),
            where(d.source_topic, d.source_partition, d.source_offset),
            s.where,
            d.last_error_at.isoformat(timespec="seconds"),
            escape(d.detail[:DETAIL_CHARS]),
        )
    return table


def _show_replayed(stored: Stored, verdict: str) -> None:
    """One line per record a replay reads, but those an earlier replay already did."""
    if (letter := stored.letter) is None:
        console.print(f"{verdict:>9}  {stored.where}  {stored.problem}", markup=False)
    elif verdict != "earlier":
        console.print(f"{verdict:>9}  {stored.where}  {letter.event_id}  {letter.reason}  attempts={letter.attempts}")


def _replay_summary(report: ReplayReport) -> str:
    return (
        f"replayed {report.replayed}, skipped {report.skipped}, over the cap {report.exhausted}, "
        f"not dead letters {report.malformed}, done by an earlier replay {report.earlier}"
    )
