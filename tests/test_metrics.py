"""What metrics.record counts for one published outcome (the headline stream test checks the totals
against a real worker's /metrics; this pins the per-verdict rules)."""

from __future__ import annotations

from datetime import UTC, datetime

from moderation import metrics
from moderation.events import ImageInfo, ModelInfo, Timings, Verdict


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
    metrics.record(verdict("fake", "fake"))
    metrics.record(verdict("real", None))  # not explained: nothing to disagree with
    assert disagreements() == before
    metrics.record(verdict("fake", "real"))
    assert disagreements() == before + 1
