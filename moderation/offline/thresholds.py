"""ROC-AUC of P(fake) and a threshold sweep that proposes the review and flag thresholds of the policy.

Fake is the positive class and an image counts as flagged at threshold t when P(fake) >= t, as
`Policy.action` decides. Pure numpy, plus an inline SVG of the curves drawn here (no plotting library).
"""

from __future__ import annotations

from collections.abc import Sequence
from html import escape

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

# The precision the proposed review and flag thresholds aim for, unless asked otherwise.
DEFAULT_REVIEW_PRECISION = 0.80
DEFAULT_FLAG_PRECISION = 0.95

CAVEAT = (
    "The lowest threshold meeting a target is the most recall that target allows on this set; on a"
    " small or cleanly separated set it sits at the edge of the real images' scores: use a set like"
    " your uploads, large enough that the precision is a measurement."
)


class Operating(BaseModel):
    """One threshold and what it does on the evaluation set."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    threshold: float
    precision: float = Field(description="Fake among the images at or above the threshold.")
    recall: float = Field(description="Fakes at or above the threshold among all fakes.")
    fpr: float = Field(description="Real images at or above the threshold among all real ones.")


class Proposal(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    target_precision: float
    threshold: Operating | None = Field(description="The lowest threshold that meets the target; None: none does.")


class Sweep(BaseModel):
    """ROC-AUC and every distinct threshold of the set, with the thresholds proposed for the policy."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    n: int
    positives: int = Field(description="Fake images among the scored ones.")
    roc_auc: float | None = Field(description="Area under the ROC of P(fake); None with one class only.")
    review: Proposal = Field(description="For MODERATION_REVIEW_THRESHOLD.")
    flag: Proposal = Field(description="For MODERATION_FLAG_THRESHOLD.")
    points: list[Operating] = Field(description="One per distinct score, highest threshold first.")

    def markdown(self) -> str:
        """ROC-AUC and the proposed thresholds as the settings a T&S team would set."""
        auc = "n/a (one class only)" if self.roc_auc is None else f"{self.roc_auc:.4f}"
        lines = [f"ROC-AUC of P(fake) (fake positive, {self.n} images): {auc}.", ""]
        for name, proposal in (("REVIEW", self.review), ("FLAG", self.flag)):
            point, target = proposal.threshold, f"precision >= {proposal.target_precision:.2f}"
            lines.append(
                f"- MODERATION_{name}_THRESHOLD: no threshold reaches {target} on this set."
                if point is None
                else f"- MODERATION_{name}_THRESHOLD={point.threshold:.4f}: the lowest threshold with {target}"
                f" (precision {point.precision:.3f}, recall {point.recall:.3f}, FPR {point.fpr:.3f})."
            )
        lines += ["", CAVEAT, ""]
        return "\n".join(lines)


def sweep(scores: Sequence[float], is_fake: Sequence[bool], *, review_precision: float, flag_precision: float) -> Sweep:
    """The operating point of every distinct score, ROC-AUC, and the two proposed thresholds."""
    points = operating_points(scores, is_fake)
    positives = int(np.sum(np.asarray(is_fake, dtype=bool)))
    return Sweep(
        n=len(scores),
        positives=positives,
        roc_auc=roc_auc(scores, is_fake),
        review=Proposal(target_precision=review_precision, threshold=lowest_meeting(points, review_precision)),
        flag=Proposal(target_precision=flag_precision, threshold=lowest_meeting(points, flag_precision)),
        points=points,
    )


def operating_points(scores: Sequence[float], is_fake: Sequence[bool]) -> list[Operating]:
    """Precision, recall and FPR at each distinct score used as threshold (P(fake) >= t), highest first."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_fake, dtype=bool)
    order = np.argsort(-s, kind="stable")
    s, y = s[order], y[order]
    tp, fp = np.cumsum(y), np.cumsum(~y)
    last = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1] if len(s) else np.array([], dtype=int)  # end of each tie
    pos, neg = int(y.sum()), int((~y).sum())
    return [
        Operating(
            threshold=float(s[i]),
            precision=float(tp[i] / (i + 1)),
            recall=float(tp[i] / pos) if pos else 0.0,
            fpr=float(fp[i] / neg) if neg else 0.0,
        )
        for i in last
    ]


def roc_auc(scores: Sequence[float], is_fake: Sequence[bool]) -> float | None:
    """P(a random fake scores above a random real), ties counting half: the Mann-Whitney form of ROC-AUC."""
    s = np.asarray(scores, dtype=np.float64)
    y = np.asarray(is_fake, dtype=bool)
    pos, neg = int(y.sum()), int((~y).sum())
    if pos == 0 or neg == 0:
        return None
    ranks = _average_ranks(s)
    return float((ranks[y].sum() - pos * (pos + 1) / 2) / (pos * neg))


def lowest_meeting(points: Sequence[Operating], target: float) -> Operating | None:
    """The lowest threshold whose precision meets `target`: the most recall that target allows on this set."""
    meeting = [p for p in points if p.precision >= target]
    return min(meeting, key=lambda p: p.threshold) if meeting else None


def _average_ranks(values: np.ndarray) -> np.ndarray:
    order = np.argsort(values, kind="stable")
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = np.arange(1, len(values) + 1)
    for value in np.unique(values):  # ties share their mean rank
        tied = values == value
        ranks[tied] = ranks[tied].mean()
    return ranks


# The plot: two panels side by side, each a unit square mapped onto PANEL pixels.
PANEL, PAD = 240, 36


def svg(result: Sweep) -> str:
    """Precision and recall against the threshold, and the ROC curve, as one inline SVG."""
    pts = sorted(result.points, key=lambda p: p.threshold)
    precision = [(p.threshold, p.precision) for p in pts]
    recall = [(p.threshold, p.recall) for p in pts]
    roc = [(0.0, 0.0), *((p.fpr, p.recall) for p in result.points), (1.0, 1.0)]
    auc = "n/a" if result.roc_auc is None else f"{result.roc_auc:.3f}"
    marks = [
        (proposal.threshold.threshold, colour, name)
        for proposal, colour, name in ((result.review, "#d80", "review"), (result.flag, "#c00", "flag"))
        if proposal.threshold is not None
    ]
    width, height = 2 * (PANEL + 2 * PAD), PANEL + 2 * PAD
    left, right = PAD, PANEL + 3 * PAD
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" font-family="sans-serif"'
        ' font-size="11">',
        *_axes(left, "threshold P(fake)", "precision (blue), recall (green)"),
        _line(left, precision, "#25c"),
        _line(left, recall, "#2a2"),
        *(_vertical(left, x, colour, f"{name} {x:.3f}", row) for row, (x, colour, name) in enumerate(marks)),
        *_axes(right, "false positive rate", f"true positive rate (AUC {auc})"),
        _line(right, [(0.0, 0.0), (1.0, 1.0)], "#bbb"),
        _line(right, roc, "#25c"),
        "</svg>",
    ]
    return "\n".join(parts)


def _xy(origin: int, x: float, y: float) -> str:
    return f"{origin + x * PANEL:.1f},{PAD + (1 - y) * PANEL:.1f}"


def _line(origin: int, points: Sequence[tuple[float, float]], colour: str) -> str:
    coords = " ".join(_xy(origin, x, y) for x, y in points)
    return f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.5"/>'


def _vertical(origin: int, x: float, colour: str, label: str, row: int) -> str:
    (x0, y0), (_, y1) = (_xy(origin, x, 0.0).split(","), _xy(origin, x, 1.0).split(","))
    # The label on the side with room, so a threshold near 0 or 1 keeps its label inside the panel.
    anchor, shift = ("start", 3) if x < 0.5 else ("end", -3)
    return (
        f'<line x1="{x0}" y1="{y0}" x2="{x0}" y2="{y1}" stroke="{colour}" stroke-dasharray="4 3"/>'
        f'<text x="{float(x0) + shift:.1f}" y="{PAD + 14 * (row + 1)}" fill="{colour}" text-anchor="{anchor}">'
        f"{escape(label)}</text>"
    )


def _axes(origin: int, x_label: str, y_label: str) -> list[str]:
    bottom = PAD + PANEL
    return [
        f'<rect x="{origin}" y="{PAD}" width="{PANEL}" height="{PANEL}" fill="none" stroke="#444"/>',
        *(
            f'<text x="{origin + t * PANEL:.1f}" y="{bottom + 12}" text-anchor="middle">{t:g}</text>'
            for t in (0, 0.5, 1)
        ),
        *(f'<text x="{origin - 4}" y="{PAD + (1 - t) * PANEL + 4:.1f}" text-anchor="end">{t:g}</text>' for t in (0, 1)),
        f'<text x="{origin + PANEL / 2:.1f}" y="{bottom + 26}" text-anchor="middle">{escape(x_label)}</text>',
        f'<text x="{origin + PANEL / 2:.1f}" y="{PAD - 18}" text-anchor="middle">{escape(y_label)}</text>',
    ]
