"""`moderation bank`: the near-duplicate bank's PDQ hash lists, in and out."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, get_args

import typer
from rich.markup import escape

from moderation.cli.options import EnvFile, load_settings
from moderation.cli.output import console
from moderation.events import Label

if TYPE_CHECKING:
    from moderation.worker.hashlists import ListFormat

app = typer.Typer(
    name="bank",
    help="The near-duplicate bank: PDQ hash lists in and out (ThreatExchange signal files, CSV).",
    no_args_is_help=True,
)
ListFormatOption = Annotated[
    str | None,
    typer.Option(
        "--format",
        help="threatexchange (`pdq <hash>` a line, as python-threatexchange's file exchange) or csv "
        "(hash,label,source); default: csv for a .csv file, else threatexchange.",
    ),
]


@app.command("import")
def import_list(
    file: Annotated[Path, typer.Argument(exists=True, dir_okay=False, help="The hash list.")],
    source: Annotated[str | None, typer.Option(help="Where the list came from (default: the file's name).")] = None,
    list_format: ListFormatOption = None,
    label: Annotated[
        str, typer.Option(help="The label of a ThreatExchange file's hashes (it lists only positives).")
    ] = "fake",
    env_file: EnvFile = None,
) -> None:
    """Publish a list's PDQ hashes to the bank topic, each carrying its source: every worker matches uploads
    against them, below any reviewer's decision. Nothing is published if any line is not a PDQ hash."""
    from moderation.events import utcnow
    from moderation.worker.hashlists import InvalidList, bank_entry, publish_entries, read_list

    if label not in get_args(Label):
        raise typer.BadParameter(f"{label!r} is neither fake nor real", param_hint="--label")
    settings = load_settings(env_file)
    name = source or file.name
    try:
        text = file.read_text()
    except UnicodeDecodeError as exc:
        raise InvalidList(f"{file} is not UTF-8 text: {exc}") from exc
    parsed = read_list(text, _list_format(list_format, file), source=name, label=label)  # type: ignore[arg-type]
    now = utcnow()
    asyncio.run(publish_entries(settings, [bank_entry(h, now) for h in parsed.hashes]))
    skipped = f" ({parsed.other_signals} lines of other signal types skipped)" if parsed.other_signals else ""
    console.print(f"imported {len(parsed.hashes)} PDQ hashes from {escape(name)}{skipped}", highlight=False)


@app.command("export")
def export_list(
    out: Annotated[Path | None, typer.Option(help="Write here (default: standard output).")] = None,
    list_format: ListFormatOption = None,
    decided_by: Annotated[list[str] | None, typer.Option(help="Whose decisions (repeatable; default: review).")] = None,
    label: Annotated[list[str] | None, typer.Option(help="Which labels (repeatable; default: fake).")] = None,
    source: Annotated[str, typer.Option(help="The source column of this platform's own hashes (csv).")] = "moderation",
    env_file: EnvFile = None,
) -> None:
    """Write the bank's hashes (by default the reviewers' confirmed fakes) as a list another platform imports."""
    from moderation.worker.hashlists import exported, read_bank, write_list

    bank = asyncio.run(read_bank(load_settings(env_file)))
    hashes = exported(bank, decided_by=set(decided_by or ["review"]), labels=set(label or ["fake"]), source=source)
    text = write_list(hashes, _list_format(list_format, out))
    if out is None:
        print(text, end="")
        return
    out.write_text(text)
    console.print(f"wrote {len(hashes)} PDQ hashes to {out}", highlight=False)


@app.command("remove")
def remove(
    source: Annotated[str, typer.Option(help="The source the hashes were imported from.")],
    env_file: EnvFile = None,
) -> None:
    """Remove every hash imported from a source (tombstones on the bank topic: every worker forgets them)."""
    from moderation.worker.hashlists import remove_source

    removed = asyncio.run(remove_source(load_settings(env_file), source))
    console.print(f"removed {removed} PDQ hashes imported from {escape(source)}", highlight=False)


def _list_format(given: str | None, path: Path | None) -> ListFormat:
    from moderation.worker.hashlists import ListFormat

    if given is None:
        return ListFormat.CSV if path is not None and path.suffix.lower() == ".csv" else ListFormat.THREATEXCHANGE
    try:
        return ListFormat(given)
    except ValueError:
        raise typer.BadParameter(f"unknown format {given!r} (threatexchange or csv)", param_hint="--format") from None
