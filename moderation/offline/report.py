"""The offline HTML reports (`moderation scan --html`, `moderation eval --html`) from Jinja2 templates.

They render the results they are given (moderation.offline.results) and import neither tool that computes them.

The templates ship as package data in moderation/offline/templates. Autoescape is on for every one of
them: file names, explanations and model names are data, never markup. Each page is one
self-contained file (inline CSS, thumbnails and script; no CDN, no build step).
"""

from __future__ import annotations

import base64
import heapq
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import get_args

from jinja2 import Environment, PackageLoader, select_autoescape
from markupsafe import Markup

from moderation.events import Label, ModelInfo
from moderation.offline.results import PAPER, Report, ScanError, ScanResult, ScanSummary, pct
from moderation.offline.thresholds import CAVEAT, svg

# A 1,067-file scan with a thumbnail on every row was a 3 MB page. Every flag and review item keeps its
# thumbnail (that is what a reviewer looks at); of the rest, only the highest-scoring few do.
OTHER_THUMBNAILS = 100
TO_REVIEW: frozenset[str] = frozenset({"flag", "review"})


@dataclass(frozen=True)
class ScanRow:
    result: ScanResult
    thumbnail: str | None  # base64 JPEG


@dataclass
class ScanPage:
    """A scan's records, collected as they come, rendered reviewer-first once the scan is over."""

    model: ModelInfo
    started: str
    other_thumbnails: int = OTHER_THUMBNAILS
    results: list[ScanResult] = field(default_factory=list)
    errors: list[ScanError] = field(default_factory=list)
    _thumbnails: dict[int, bytes] = field(default_factory=dict)  # index in results -> JPEG
    _others: list[tuple[float, int]] = field(default_factory=list)  # min-heap of (score, -index), allowed items

    def add_result(self, result: ScanResult, thumbnail: bytes | None) -> None:
        index = len(self.results)
        self.results.append(result)
        if thumbnail is None:
            return
        if result.action in TO_REVIEW:
            self._thumbnails[index] = thumbnail
            return
        # Keep the thumbnails the page will show first among the rest: highest score, then earliest file.
        entry = (result.score, -index)
        if len(self._others) < self.other_thumbnails:
            heapq.heappush(self._others, entry)
        elif self._others and entry > self._others[0]:
            _, dropped = heapq.heapreplace(self._others, entry)
            del self._thumbnails[-dropped]
        else:
            return
        self._thumbnails[index] = thumbnail

    def add_error(self, error: ScanError) -> None:
        self.errors.append(error)

    def rows(self) -> list[ScanRow]:
        """Flag and review items first, then the rest; each part by score, highest first, then file order."""
        order = reviewer_order(self.results)
        return [ScanRow(self.results[i], _base64(self._thumbnails.get(i))) for i in order]

    def render(self, summary: ScanSummary) -> str:
        rows = self.rows()
        to_review = [row for row in rows if row.result.action in TO_REVIEW]
        return (
            _environment()
            .get_template("scan.html.j2")
            .render(
                model=self.model,
                started=self.started,
                summary=summary,
                rows=rows,
                to_review=len(to_review),
                errors=self.errors,
                labels=get_args(Label),
                actions=("flag", "review", "allow"),
                other_thumbnails=sum(row.thumbnail is not None for row in rows[len(to_review) :]),
            )
        )


def reviewer_order(results: Sequence[ScanResult]) -> list[int]:
    """Indices of `results`: flag and review items first, then the rest, each part by score, highest first."""
    return sorted(
        range(len(results)),
        key=lambda i: (results[i].action not in TO_REVIEW, -results[i].score, i),
    )


def evaluation_html(report: Report) -> str:
    """The evaluation report as one page: the tables, the proposed thresholds, the plot, the paper's figures."""
    # Markup (no escaping) only for the SVG: thresholds.svg draws it from numbers and escapes its own text.
    plot = Markup(svg(report.thresholds)) if report.thresholds is not None else None  # noqa: S704
    return (
        _environment()
        .get_template("evaluation.html.j2")
        .render(
            report=report,
            name=Path(report.data).name,
            plot=plot,
            paper=PAPER,
            caveat=CAVEAT,
        )
    )


@cache
def _environment() -> Environment:
    environment = Environment(
        loader=PackageLoader("moderation.offline", "templates"),
        autoescape=select_autoescape(enabled_extensions=("html", "html.j2"), default=True),
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    environment.filters["pct"] = pct
    environment.filters["counts"] = _counts
    return environment


def _base64(data: bytes | None) -> str | None:
    return base64.b64encode(data).decode("ascii") if data else None


def _counts(counter: Counter[str] | dict[str, int]) -> str:
    return ", ".join(f"{key} {value}" for key, value in sorted(counter.items())) or "none"
