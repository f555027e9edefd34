"""The command's console: results on standard output, errors and warnings as one line on standard error."""

from __future__ import annotations

from rich.console import Console
from rich.markup import escape

console = Console()
# Resolved at each print, so a test runner's captured stream gets what the command says.
status = Console(stderr=True, soft_wrap=True, highlight=False)


def error(message: str) -> None:
    status.print(f"[red]error:[/] {escape(message)}")  # "[model]" in a message is no markup


def warn(message: str) -> None:
    status.print(f"[yellow]warning:[/] {escape(message)}")


def yes(flag: bool) -> str:
    return "[green]yes[/]" if flag else "[red]no[/]"
