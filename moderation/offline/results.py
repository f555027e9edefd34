"""What the offline tools find, as data: a scan's records and summary, an evaluation's scores and report.

The tools (scan.py, evaluate.py) produce these and report.py renders them; this module imports neither,
so the renderer never reaches back into the code that computed what it shows.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from moderation.events import Action, ImageInfo, Label, ModelInfo, Timings
from moderation.offline.thresholds import Sweep, svg


class _Frozen(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ScanResult(_Frozen):
    """One scanned image: the stream's Verdict fields that apply, with `path` for bucket/key."""

    path: str
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    label: Label
    score: float = Field(ge=0.0, le=1.0)
    action: Action
    explanation: str | None
    answer_label: Label | None = None
    model: ModelInfo
    image: ImageInfo
    timings: Timings  # fetch = reading the file; inference = the wall time of its batch
    decided_at: AwareDatetime


class ScanError(_Frozen):
    """A file that got no verdict, with a stable reason code (a dead-letter reason or not_found/unreadable)."""

    path: str
    error: str
    detail: str


@dataclass
class ScanSummary:
    files: int = 0
    images: int = 0
    errors: int = 0
    labels: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    reasons: Counter[str] = field(default_factory=Counter)
    elapsed_s: float = 0.0

    @property
    def images_per_s(self) -> float:
        return self.images / self.elapsed_s if self.elapsed_s > 0 else 0.0


@dataclass(frozen=True)
class PaperFigures:
    """Published figures shown beside a run's for orientation, never as its own."""

    source: str
    rows: Sequence[tuple[str, str, float, float]]  # set, scope, Acc, F1
    notes: Sequence[str]

    def markdown(self) -> str:
        lines = [
            f"### The paper's figures ({self.source}), for reference only: not measured here",
            "",
            "| Set | Scope | Acc | F1 |",
            "| --- | --- | --- | --- |",
            *(f"| {name} | {scope} | {acc} | {f1} |" for name, scope, acc, f1 in self.rows),
            "",
            *self.notes,
        ]
        return "\n".join(lines) + "\n"


# FakeVLM's own numbers, for orientation only: they are the paper's, not this run's.
PAPER = PaperFigures(
    source="FakeVLM, arXiv 2503.14905",
    rows=[("DMimage", "real", 98.2, 99.1), ("DMimage", "fake", 89.7, 94.6), ("DMimage", "overall", 94.0, 94.3)],
    notes=[
        "FF++ AUC (paper): FF-DF 97.2, FF-F2F 96.0, FF-FS 96.8, FF-NT 95.0, mean 96.3.",
        "The paper's Table 2 also reports Acc, F1, ROUGE-L and CSS on FakeClue and LOKI.",
    ],
)
PAPER_FIGURES = PAPER.markdown()


@dataclass(frozen=True)
class Sample:
    image: str  # relative to the images directory
    label: Label  # FakeClue: 0 = fake, 1 = real
    cate: str
    reference: str  # the gpt answer


@dataclass(frozen=True)
class Prediction:
    sample: Sample
    label: Label | None  # None: the image could not be scored (see error)
    score: float | None
    explanation: str | None
    answer_label: str | None
    error: str | None = None
    free_text: str | None = None  # the free, greedy answer to the raw prompt, when generated
    free_label: Label | None = None  # by the official text rule; None: undecided or not generated


class Scores(_Frozen):
    """Detection metrics of one scope; F1 is None when it is undefined (no positives at all)."""

    n: int
    accuracy: float | None
    f1: float | None


class Explanations(_Frozen):
    n: int = Field(description="Images with both an explanation and a reference answer.")
    rouge_l: float | None = Field(description="Mean ROUGE-L F-measure (rouge-score, use_stemmer=True).")
    css: float | None = Field(description="Mean cosine similarity of sentence embeddings.")
    embedding_model: str
    disagreements: int = Field(description="Images whose explanation states the other label than the score.")
    undecided: int = Field(description="Explanations that state neither label (FakeVLM's eval rule).")


class FreeGeneration(_Frozen):
    """Detection by the official text rule on free answers: what the paper's eval.py computes."""

    max_new_tokens: int
    answered: int = Field(description="Scored images that were also answered freely.")
    undecided: int = Field(description="Free answers that state neither label; counted as wrong, as in eval.py.")
    overall: Scores
    real: Scores
    fake: Scores
    categories: dict[str, Scores]


class Report(_Frozen):
    data: str
    images: str
    model: ModelInfo
    n: int
    failed: int = Field(description="Images that could not be scored; left out of every metric.")
    failures: dict[str, int] = Field(description="Failed images per reason code.")
    overall: Scores
    real: Scores
    fake: Scores
    categories: dict[str, Scores]
    explanations: Explanations
    free_generation: FreeGeneration | None = Field(
        default=None, description="Paper-comparable figures; None when free generation was not run."
    )
    thresholds: Sweep | None = Field(default=None, description="ROC-AUC and threshold sweep of P(fake).")
    elapsed_s: float

    def markdown(self) -> str:
        lines = [
            f"## FakeVLM evaluation: {Path(self.data).name}",
            "",
            f"Model: {self.model.name} {self.model.version}. {self.n} images, {self.failed} not scored"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(self.failures.items()))})" if self.failures else "")
            + f". {self.elapsed_s:.1f} s.",
            "",
            "| Scope | n | Acc | F1 | Acc (free, text rule) | F1 (free, text rule) |",
            "| --- | --- | --- | --- | --- | --- |",
        ]
        lines += [f"| {name} | {s.n} | {pct(s.accuracy)} | {pct(s.f1)} | {_free(f)} |" for name, s, f in self.scopes()]
        lines += ["", self.comparability()]
        e = self.explanations
        lines += [
            "",
            "| Explanations | n | ROUGE-L | CSS |",
            "| --- | --- | --- | --- |",
            f"| all | {e.n} | {pct(e.rouge_l)} | {pct(e.css)} |",
            "",
            f"CSS embedding model: {e.embedding_model}. Acc and F1 take fake as positive (per class: that class);"
            " ROUGE-L and CSS score the verdict-first explanation.",
            f"The explanation states the other label than the score for {e.disagreements} images"
            f" and no label for {e.undecided}.",
            "",
            *([self.thresholds.markdown(), svg(self.thresholds), ""] if self.thresholds else []),
            PAPER_FIGURES,
        ]
        return "\n".join(lines)

    def scopes(self) -> list[tuple[str, Scores, Scores | None]]:
        """Each scope's verdict-first scores beside its free-generation ones (None: not generated)."""
        free = self.free_generation
        scopes: list[tuple[str, Scores, Scores | None]] = [
            ("overall", self.overall, free.overall if free else None),
            ("real", self.real, free.real if free else None),
            ("fake", self.fake, free.fake if free else None),
        ]
        return scopes + [
            (f"category: {name}", scores, free.categories.get(name) if free else None)
            for name, scores in sorted(self.categories.items())
        ]

    def comparability(self) -> str:
        free = self.free_generation
        if free is None:
            return "Free generation was not run: no figure here is comparable with the paper's."
        return (
            "Paper-comparable: the free, text rule columns (FakeVLM's scripts/eval.py: raw prompt, greedy,"
            f" max_new_tokens {free.max_new_tokens}, label from the answer's text; {free.undecided} of"
            f" {free.answered} answers state no label and count as wrong). The verdict-first columns are the"
            " service's own decision (P(fake) at the forced prefix \"This is a\"), not the paper's."
        )


def pct(value: float | None) -> str:
    """A share as a percentage with one decimal, or a dash when there is none."""
    return "–" if value is None else f"{100 * value:.1f}"


def _free(scores: Scores | None) -> str:
    return "– | –" if scores is None else f"{pct(scores.accuracy)} | {pct(scores.f1)}"
