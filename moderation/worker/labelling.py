"""The worker's choice of label and action for one upload, by the tenant's policy: pure logic, no I/O.

`choose` takes what the pipeline's I/O found out (the bytes' provenance, the bank's entries for them, what
the model said about them, fresh or cached) and returns the choice with the policy that made it. In order:
a reviewer's decision about these very bytes (the bank entry of their sha256), the file's own provenance
declaring AI generation, a banked near-duplicate (PDQ within the policy's distance), else the model's
P(fake) through the thresholds. A decided fake is flagged and a decided real allowed. A valid manifest that
claims a camera capture decides nothing: it is evidence shown to reviewers. The model is asked unless the
policy lets the evidence decide without its score (`needs_model`).
"""

from __future__ import annotations

from dataclasses import dataclass

from moderation.events import Action, BankEntry, CacheEntry, DecidedBy, ImageInfo, Label, Match, ModelInfo, Provenance
from moderation.policy import Policy

DECIDED_ACTION: dict[Label, Action] = {"fake": "flag", "real": "allow"}
UNSCORED_MODEL = "none"  # ModelInfo.name of a verdict the policy let be decided without the model
# The model a verdict names when the policy let the evidence decide alone (`_skips_model`), by who decided.
_UNSCORED: dict[DecidedBy, ModelInfo] = {
    by: ModelInfo(name=UNSCORED_MODEL, version=f"not run: decided by {by}") for by in ("provenance", "match")
}


@dataclass(frozen=True, slots=True)
class Evidence:
    """What is known of one upload's bytes besides the model's say: their sha256, size, format, PDQ hash and
    provenance (examined now, or remembered by the cache), the bank's entry for these very bytes (a reviewer's
    decision decides; a model's flag or an imported hash does not), and the nearest banked image within the
    policy's distance with that distance in bits."""

    image_sha256: str
    image: ImageInfo
    provenance: Provenance | None
    banked: BankEntry | None = None
    nearest: tuple[BankEntry, int] | None = None


@dataclass(frozen=True, slots=True)
class Choice:
    """The worker's choice for one upload: its label and action, who decided them, the banked image behind
    them (or found near), what the model said (where the policy let the evidence decide alone: a score of 1 or
    0 and the model named none), whether an explanation is wanted, and the policy that made it all, whose
    version the verdict carries and by which its outcome is routed and banked."""

    label: Label
    action: Action
    decided_by: DecidedBy
    match: Match | None
    score: float
    frame: int | None  # of a multi-frame image, the one the score is of
    model: ModelInfo
    explanation: str | None
    answer_label: Label | None
    explanation_requested: bool
    policy: Policy


_Decided = tuple[Label, Action, DecidedBy, Match | None]  # a decision the model did not make


def needs_model(policy: Policy, evidence: Evidence) -> bool:
    """Whether `choose` needs what the model says about these bytes: unless the evidence decides and the
    policy lets that decision stand without the model's score."""
    decided = _without_model(policy, evidence, None)
    return decided is None or not _skips_model(policy, decided[2])


def choose(policy: Policy, evidence: Evidence, said: CacheEntry | None) -> Choice:
    """The choice for one upload. `said` is what the model said about its bytes (a fresh score or a cache hit),
    None only where `needs_model` is false (else ValueError: a bug in the caller)."""
    match = _match(*evidence.nearest) if evidence.nearest is not None else None
    decided = _without_model(policy, evidence, match)
    if said is None:
        if decided is None or not _skips_model(policy, decided[2]):
            raise ValueError("the model was not asked, but the policy needs its score")
        label, action, by, match = decided
        score, frame, model, wanted = float(label == "fake"), None, _UNSCORED[by], False
        explanation = answer_label = None
    else:
        # A near-duplicate found but not applied (evidence_only) is still reported beside the model's decision.
        label, action, by, match = decided or (said.label, policy.action(said.score), "model", match)
        score, frame, model = said.score, said.frame, said.model
        explanation, answer_label = said.explanation, said.answer_label
        wanted = explanation is None and score >= policy.explain_above  # a cache hit may carry the text already
    return Choice(label, action, by, match, score, frame, model, explanation, answer_label, wanted, policy)


def _without_model(policy: Policy, evidence: Evidence, match: Match | None) -> _Decided | None:
    """The decision when something other than the model makes it, else None; `match` is the nearest banked
    image's, None where only who decides matters."""
    banked, provenance = evidence.banked, evidence.provenance
    if banked is not None and banked.decided_by == "review":
        return banked.label, DECIDED_ACTION[banked.label], "review", _match(banked, 0)
    if provenance is not None and provenance.declares_ai and policy.provenance.declared_ai == "label_fake":
        return "fake", "flag", "provenance", match
    if evidence.nearest is not None and policy.match.enabled and policy.match.apply == "banked_label":
        label = evidence.nearest[0].label
        return label, DECIDED_ACTION[label], "match", match
    return None


def _skips_model(policy: Policy, decided_by: DecidedBy) -> bool:
    """Whether the policy lets this decision stand without the model's score (never a reviewer's: the cache or
    the model still gives the score reviewers compare against)."""
    if decided_by == "provenance":
        return policy.provenance.skip_model
    return decided_by == "match" and policy.match.skip_model


def _match(entry: BankEntry, distance: int) -> Match:
    return Match(
        event_id=entry.event_id,
        image_sha256=entry.image_sha256,
        distance=distance,
        label=entry.label,
        decided_by=entry.decided_by,
        source=entry.source,
    )
