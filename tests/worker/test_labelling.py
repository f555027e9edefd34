"""The worker's choice of label and action for one upload, by the tenant's policy: pure inputs (the evidence,
what the model said) in, the choice out (the end-to-end run on the real stack is
tests/stream/test_trust_and_safety.py)."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest

from moderation.events import BankEntry, C2paEvidence, CacheEntry, ImageInfo, Label, ModelInfo, Provenance
from moderation.policy import MatchRule, Policy, ProvenanceRule
from moderation.worker.labelling import UNSCORED_MODEL, Evidence, choose, needs_model

NOW = datetime(2026, 11, 29, tzinfo=UTC)
SHA = "ef" * 32
IMAGE = ImageInfo(width=64, height=48, format="JPEG", pdq="0f" * 32, pdq_quality=100)
MODEL = ModelInfo(name="fakevlm", version="1", weights="sha256:fixed")
AI = Provenance(
    iptc_digital_source_type="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia", declares_ai=True
)
CAPTURE = Provenance(
    c2pa=C2paEvidence(validation_state="Valid", valid=True, digital_source_types=["digitalCapture"]),
    declares_capture=True,
)


def banked(label: str, decided_by: str = "review", sha256: str = "ab" * 32) -> BankEntry:
    return BankEntry.model_validate(
        {"image_sha256": sha256, "event_id": "banked", "label": label, "decided_by": decided_by, "decided_at": NOW}
    )


def evidence(
    provenance: Provenance | None = None, same: BankEntry | None = None, near: BankEntry | None = None
) -> Evidence:
    """`same`: the bank's entry for these very bytes; `near`: a banked image 12 bits away."""
    return Evidence(SHA, IMAGE, provenance, same, (near, 12) if near is not None else None)


def said(score: float, explanation: str | None = None) -> CacheEntry:
    """What the model said about the bytes: a fresh score, or a cache hit (which may carry its explanation)."""
    label: Label = "fake" if score >= 0.5 else "real"
    return CacheEntry(
        image_sha256=SHA, label=label, score=score, explanation=explanation, model=MODEL, image=IMAGE, decided_at=NOW
    )


def test_the_model_decides_through_the_tenants_thresholds_and_asks_for_an_explanation_in_its_band() -> None:
    strict = Policy(review_threshold=0.1, flag_threshold=0.2, explain_above=0.9)
    assert needs_model(strict, evidence())
    choice = choose(strict, evidence(), said(0.25))
    assert (choice.label, choice.action, choice.decided_by, choice.match) == ("real", "flag", "model", None)
    assert (choice.score, choice.model, choice.explanation_requested, choice.policy) == (0.25, MODEL, False, strict)
    choice = choose(Policy(), evidence(), said(0.6))
    assert (choice.action, choice.explanation_requested) == ("review", True)
    assert choose(Policy(), evidence(), said(0.25)).action == "allow"


def test_the_frame_the_model_scored_is_the_choices_and_an_unscored_choice_names_none() -> None:
    scored = said(0.95).model_copy(update={"frame": 5})
    assert choose(Policy(), evidence(), scored).frame == 5
    skipping = Policy(provenance=ProvenanceRule(skip_model=True))
    assert choose(skipping, evidence(AI), None).frame is None


def test_a_cache_hit_that_carries_its_explanation_asks_for_none() -> None:
    choice = choose(Policy(), evidence(), said(0.95, "This is a fake image."))
    assert (choice.action, choice.explanation, choice.explanation_requested) == ("flag", "This is a fake image.", False)


def test_a_reviewers_decision_on_these_bytes_comes_first_and_never_skips_the_model() -> None:
    skipping = Policy(provenance=ProvenanceRule(skip_model=True), match=MatchRule(skip_model=True))
    reviewed = evidence(AI, banked("real", sha256=SHA), banked("fake"))
    assert needs_model(skipping, reviewed)
    choice = choose(skipping, reviewed, said(0.9))
    assert (choice.label, choice.action, choice.decided_by, choice.score) == ("real", "allow", "review", 0.9)
    assert choice.match is not None and (choice.match.distance, choice.match.image_sha256) == (0, SHA)
    with pytest.raises(ValueError, match="needs its score"):
        choose(skipping, reviewed, None)


def test_a_model_flag_in_the_bank_is_not_a_review() -> None:
    choice = choose(Policy(), evidence(same=banked("fake", "model")), said(0.1))
    assert (choice.label, choice.decided_by) == ("real", "model")


def test_declared_ai_labels_fake_unless_the_policy_keeps_it_as_evidence() -> None:
    assert needs_model(Policy(), evidence(AI))
    choice = choose(Policy(), evidence(AI), said(0.1))
    assert (choice.label, choice.action, choice.decided_by, choice.score) == ("fake", "flag", "provenance", 0.1)
    evidence_only = Policy(provenance=ProvenanceRule(declared_ai="evidence_only"))
    assert choose(evidence_only, evidence(AI), said(0.1)).decided_by == "model"


def test_declared_ai_decides_without_the_model_where_the_policy_says_so() -> None:
    skipping = Policy(provenance=ProvenanceRule(skip_model=True))
    assert not needs_model(skipping, evidence(AI))
    choice = choose(skipping, evidence(AI), None)
    assert (choice.label, choice.action, choice.decided_by, choice.score) == ("fake", "flag", "provenance", 1.0)
    assert choice.model.name == UNSCORED_MODEL and "provenance" in choice.model.version
    assert (choice.explanation, choice.explanation_requested, choice.policy) == (None, False, skipping)
    assert needs_model(skipping, evidence())  # nothing declared: the model decides


def test_a_capture_claim_never_decides() -> None:
    assert needs_model(Policy(provenance=ProvenanceRule(skip_model=True)), evidence(CAPTURE))
    assert choose(Policy(), evidence(CAPTURE), said(0.9)).decided_by == "model"


def test_a_near_duplicate_takes_the_banked_label_or_stays_evidence() -> None:
    choice = choose(Policy(), evidence(near=banked("real")), said(0.9))
    assert (choice.label, choice.action, choice.decided_by, choice.score) == ("real", "allow", "match", 0.9)
    assert choice.match is not None and (choice.match.distance, choice.match.label) == (12, "real")
    evidence_only = choose(Policy(match=MatchRule(apply="evidence_only")), evidence(near=banked("fake")), said(0.9))
    assert (evidence_only.action, evidence_only.decided_by) == ("flag", "model")
    assert evidence_only.match is not None and evidence_only.match.distance == 12  # reported all the same
    disabled = choose(Policy(match=MatchRule(enabled=False)), evidence(near=banked("real")), said(0.9))
    assert (disabled.label, disabled.decided_by) == ("fake", "model")


def test_a_near_duplicate_decides_without_the_model_where_the_policy_says_so() -> None:
    skipping = Policy(match=MatchRule(skip_model=True))
    assert not needs_model(skipping, evidence(near=banked("real")))
    choice = choose(skipping, evidence(near=banked("real")), None)
    assert (choice.label, choice.action, choice.decided_by, choice.score) == ("real", "allow", "match", 0.0)
    assert choice.model.name == UNSCORED_MODEL and "match" in choice.model.version
    assert needs_model(Policy(match=MatchRule(skip_model=True, apply="evidence_only")), evidence(near=banked("real")))
    with pytest.raises(ValueError, match="needs its score"):
        choose(Policy(), evidence(near=banked("real")), None)
