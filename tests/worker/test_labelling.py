"""Who decides a verdict's label, by the tenant's policy (pure logic; the end-to-end run on the real stack is
tests/stream/test_trust_and_safety.py)."""

from __future__ import annotations

from datetime import UTC, datetime

from moderation.events import BankEntry, C2paEvidence, Match, Provenance
from moderation.policy import MatchRule, Policy, ProvenanceRule
from moderation.worker import labelling

NOW = datetime(2026, 11, 29, tzinfo=UTC)
AI = Provenance(
    iptc_digital_source_type="http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia", declares_ai=True
)
CAPTURE = Provenance(
    c2pa=C2paEvidence(validation_state="Valid", valid=True, digital_source_types=["digitalCapture"]),
    declares_capture=True,
)


def reviewed(label: str, decided_by: str = "review") -> BankEntry:
    return BankEntry.model_validate(
        {"image_sha256": "ab" * 32, "event_id": "banked", "label": label, "decided_by": decided_by, "decided_at": NOW}
    )


def match(label: str = "fake", distance: int = 12) -> Match:
    return Match(event_id="banked", image_sha256="cd" * 32, distance=distance, label=label, decided_by="review")


def test_a_reviewers_decision_on_these_bytes_comes_first() -> None:
    decided = labelling.without_model(Policy(), AI, reviewed("real"), match("fake"))
    assert decided is not None and (decided.label, decided.action, decided.decided_by) == ("real", "allow", "review")
    assert decided.match is not None and decided.match.distance == 0
    assert not labelling.skips_model(Policy(provenance=ProvenanceRule(skip_model=True)), decided)


def test_a_model_flag_in_the_bank_is_not_a_review() -> None:
    assert labelling.without_model(Policy(), None, reviewed("fake", "model"), None) is None


def test_declared_ai_labels_fake_unless_the_policy_keeps_it_as_evidence() -> None:
    decided = labelling.without_model(Policy(), AI, None, None)
    assert decided is not None and (decided.label, decided.action, decided.decided_by) == ("fake", "flag", "provenance")
    assert not labelling.skips_model(Policy(), decided)
    assert labelling.skips_model(Policy(provenance=ProvenanceRule(skip_model=True)), decided)
    assert (
        labelling.without_model(Policy(provenance=ProvenanceRule(declared_ai="evidence_only")), AI, None, None) is None
    )


def test_a_capture_claim_never_decides() -> None:
    assert labelling.without_model(Policy(), CAPTURE, None, None) is None


def test_a_near_duplicate_takes_the_banked_label_or_stays_evidence() -> None:
    decided = labelling.without_model(Policy(), None, None, match("real"))
    assert decided is not None and (decided.label, decided.action, decided.decided_by) == ("real", "allow", "match")
    evidence_only = Policy(match=MatchRule(apply="evidence_only"))
    assert labelling.without_model(evidence_only, None, None, match()) is None
    by_model = labelling.by_model(evidence_only, 0.9, "fake", match())
    assert (by_model.action, by_model.decided_by, by_model.match) == ("flag", "model", match())
    assert labelling.without_model(Policy(match=MatchRule(enabled=False)), None, None, match()) is None


def test_the_model_decides_through_the_tenants_thresholds() -> None:
    strict = Policy(review_threshold=0.1, flag_threshold=0.2)
    assert labelling.by_model(strict, 0.25, "real").action == "flag"
    assert labelling.by_model(Policy(), 0.25, "real").action == "allow"
