"""What metrics.record counts for a batch of published outcomes (the headline stream test checks the totals
against a real worker's /metrics; this pins the per-verdict rules)."""

from __future__ import annotations

from datetime import UTC, datetime

from moderation.events import ImageInfo, ModelInfo, Timings, Verdict
from moderation.worker import metrics


def verdict(label: str, answer_label: str | None) -> Verdict:
    now = datetime.now(UTC)
    return Verdict.model_validate(
        {
            "event_id": "e-1",
            "bucket": "uploads",
            "key": "a.png",
            "image_sha256": "0" * 64,
            "label": label,
            "score": 0.9 if label == "fake" else 0.1,
            "action": "flag" if label == "fake" else "allow",
            "explanation": None if answer_label is None else f"This is a {answer_label} image.",
            "answer_label": answer_label,
            "model": ModelInfo(name="m", version="1"),
            "cached": False,
            "image": ImageInfo(width=1, height=1, format="PNG"),
            "timings": Timings(fetch_ms=1, decode_ms=1, inference_ms=1, total_ms=3),
            "uploaded_at": now,
            "decided_at": now,
        }
    )


def disagreements() -> float:
    return metrics.REGISTRY.get_sample_value("moderation_answer_disagreements_total") or 0.0


def test_a_verdict_whose_explanation_says_the_other_label_is_counted() -> None:
    before = disagreements()
    metrics.record([verdict("fake", "fake"), verdict("real", None)])  # None: nothing to disagree with
    assert disagreements() == before
    metrics.record([verdict("fake", "real"), verdict("fake", "fake"), verdict("real", "fake")])
    assert disagreements() == before + 2


def sample(name: str, **labels: str) -> float:
    return metrics.REGISTRY.get_sample_value(name, labels) or 0.0


def test_a_batch_is_counted_by_label_and_hit() -> None:
    hit = verdict("fake", None).model_copy(update={"cached": True})
    names = [
        ("moderation_outcomes_total", {"outcome": "verdict", "reason": ""}),
        ("moderation_verdicts_total", {"label": "fake", "action": "flag"}),
        ("moderation_verdicts_total", {"label": "real", "action": "allow"}),
        ("moderation_cache_hits_total", {}),
    ]
    before = [sample(name, **labels) for name, labels in names]
    metrics.record([verdict("fake", None), hit, verdict("real", None), hit])
    after = [sample(name, **labels) for name, labels in names]
    assert [a - b for a, b in zip(after, before, strict=True)] == [4, 3, 1, 2]
