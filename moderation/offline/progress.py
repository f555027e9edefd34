"""Progress over a number of files, shared by the offline tools (scan, evaluate, free generation)."""

from __future__ import annotations

import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn


class ProgressBar:
    """A rich progress bar over a number of files (on stderr unless a console is given), or a no-op."""

    def __init__(self, enabled: bool, console: Console | None, what: str, total: int) -> None:
        self._progress = (
            Progress(
                TextColumn(f"[bold]{what}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[rate]}"),
                TimeRemainingColumn(),
                console=console or Console(stderr=True),
            )
            if enabled
            else None
        )
        self._task = self._progress.add_task(what, total=total, rate="") if self._progress else None
        self._started = time.perf_counter()
        self._done = 0

    def advance(self, steps: int) -> None:
        self._done += steps
        if self._progress is not None and self._task is not None:
            rate = self._done / max(time.perf_counter() - self._started, 1e-9)
            self._progress.update(self._task, advance=steps, rate=f"{rate:.1f} files/s")

    def __enter__(self) -> ProgressBar:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._progress is not None:
            self._progress.stop()
