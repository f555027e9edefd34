"""Who decides a verdict's label, by the tenant's policy: pure logic, no I/O.

In order: a reviewer's decision about these very bytes (the bank entry of their sha256), the file's own
provenance declaring AI generation, a banked near-duplicate (PDQ within the policy's distance), else the
model's P(fake) through the thresholds. A decided fake is flagged and a decided real allowed. A valid
manifest that claims a camera capture decides nothing: it is evidence shown to reviewers.
"""

from __future__ import annotations

from dataclasses import dataclass

from moderation.events import Action, BankEntry, DecidedBy, Label, Match, Provenance
from moderation.policy import Policy

DECIDED_ACTION: dict[Label, Action] = {"fake": "flag", "real": "allow"}


@dataclass(frozen=True)
class Decided:
    label: Label
    action: Action
    decided_by: DecidedBy
    match: Match | None = None


def without_model(
    policy: Policy,
    provenance: Provenance | None,
    reviewed: BankEntry | None,
    match: Match | None,
) -> Decided | None:
    """The decision when something other than the model makes it, else None. `reviewed` is the bank's entry
    for the image's exact bytes, `match` its nearest banked neighbour within the policy's distance."""
    if reviewed is not None and reviewed.decided_by == "review":
        return Decided(reviewed.label, DECIDED_ACTION[reviewed.label], "review", as_match(reviewed, 0))
    if provenance is not None and provenance.declares_ai and policy.provenance.declared_ai == "label_fake":
        return Decided("fake", "flag", "provenance", match)
    if match is not None and policy.match.enabled and policy.match.apply == "banked_label":
        return Decided(match.label, DECIDED_ACTION[match.label], "match", match)
    return None


def skips_model(policy: Policy, decided: Decided | None) -> bool:
    """Whether the policy lets this decision stand without the model's score (never for a review: the cache or
    the model still gives the score reviewers compare against)."""
    if decided is None:
        return False
    if decided.decided_by == "provenance":
        return policy.provenance.skip_model
    return decided.decided_by == "match" and policy.match.skip_model


def by_model(policy: Policy, score: float, label: Label, match: Match | None = None) -> Decided:
    """The model's decision; a near-duplicate found but not applied (evidence_only) is still reported."""
    return Decided(label, policy.action(score), "model", match)


def as_match(entry: BankEntry, distance: int) -> Match:
    return Match(
        event_id=entry.event_id,
        image_sha256=entry.image_sha256,
        distance=distance,
        label=entry.label,
        decided_by=entry.decided_by,
        source=entry.source,
    )
