"""Pipeline logic with in-memory stand-ins for S3 and Triton; the same paths run against the real stack in
tests/stream/test_stream.py."""

import json
from datetime import UTC, datetime

import numpy as np

from moderation.devkit.samples import draw_image, encode
from moderation.errors import Reason, Rejected
from moderation.events import DeadLetter, Verdict
from moderation.model.detectors import Detection
from moderation.policy import Policy
from moderation.worker.pipeline import MAX_DEAD_LETTER_PAYLOAD, Backoff, Incoming, Pipeline
from moderation.worker.policies import Policies
from tests.fixtures.fakes import FixedDetector, MemoryStore

NOW = datetime(2026, 11, 27, tzinfo=UTC)
JPEG = encode(draw_image(0, (64, 48)), "JPEG")
FAST = Backoff(deadline_s=5.0, base_s=0.001, cap_s=0.01)


def message(body: object, offset: int = 0) -> Incoming:
    value = body if isinstance(body, bytes) else json.dumps(body).encode()
    return Incoming(value=value, topic="uploads", partition=1, offset=offset)


def event(event_id: str, key: str = "a.jpg", **extra: object) -> dict[str, object]:
    return {"schema_version": 1, "event_id": event_id, "bucket": "uploads", "key": key} | extra


def pipeline(detector: FixedDetector, backoff: Backoff = FAST) -> Pipeline:
    store = MemoryStore({"a.jpg": JPEG, "text.jpg": b"text"})
    return Pipeline(store, detector, Policies.of(Policy(0.5, 0.8, 0.5)), 10**7, backoff=backoff, clock=lambda: NOW)


async def test_a_fake_image_is_flagged_at_once_and_its_explanation_asked_for() -> None:
    detector = FixedDetector(0.93)
    [outcome] = await pipeline(detector).moderate_batch([message(event("e1", attributes={"a": "b"}))])
    assert isinstance(outcome, Verdict)
    assert (outcome.event_id, outcome.label, outcome.action) == ("e1", "fake", "flag")
    assert (outcome.explanation, outcome.answer_label, outcome.explanation_requested) == (None, None, True)
    assert detector.calls == 1, "one verdict pass; the explainer, not the worker, asks for the text"
    assert (outcome.image.width, outcome.image.height, outcome.image.format) == (64, 48, "JPEG")
    assert outcome.attributes == {"a": "b"} and outcome.decided_at == NOW and outcome.model.name == "fixed"


async def test_a_real_image_is_allowed_without_explanation() -> None:
    [outcome] = await pipeline(FixedDetector(0.1)).moderate_batch([message(event("e2"))])
    assert isinstance(outcome, Verdict)
    assert (outcome.label, outcome.action, outcome.explanation) == ("real", "allow", None)


async def test_every_message_of_a_batch_gets_exactly_one_outcome_in_order() -> None:
    batch = [
        message(event("ok")),
        message(b"{broken", offset=1),
        message(event("gone", key="missing.jpg"), offset=2),
        message(event("text", key="text.jpg"), offset=3),
        message(event("elsewhere") | {"bucket": "other"}, offset=4),
        message(event("sum", sha256="0" * 64), offset=5),
    ]
    outcomes = await pipeline(FixedDetector(0.6)).moderate_batch(batch)
    assert [type(o).__name__ for o in outcomes] == ["Verdict"] + ["DeadLetter"] * 5
    letters = [o for o in outcomes if isinstance(o, DeadLetter)]
    assert [(d.event_id, d.reason) for d in letters] == [
        (None, Reason.INVALID_EVENT),
        ("gone", Reason.OBJECT_MISSING),
        ("text", Reason.INVALID_IMAGE),
        ("elsewhere", Reason.FORBIDDEN_BUCKET),
        ("sum", Reason.CHECKSUM_MISMATCH),
    ]
    assert [d.payload() for d in letters] == [m.value for m in batch[1:]]
    assert [d.source_offset for d in letters] == [1, 2, 3, 4, 5]
    assert outcomes[0].action == "review"


async def test_transient_faults_are_retried_with_backoff_until_they_pass() -> None:
    detector = FixedDetector(0.2, Rejected(Reason.INFERENCE_UNAVAILABLE, "Triton down"), failures=3)
    [outcome] = await pipeline(detector).moderate_batch([message(event("e3"))])
    assert isinstance(outcome, Verdict) and detector.calls == 4


async def test_a_transient_fault_past_the_deadline_is_a_retryable_dead_letter() -> None:
    detector = FixedDetector(0.5, Rejected(Reason.INFERENCE_UNAVAILABLE, "Triton down"))
    slow = Backoff(deadline_s=0.05, base_s=0.01, cap_s=0.01)
    [outcome] = await pipeline(detector, slow).moderate_batch([message(event("e3"))])
    assert isinstance(outcome, DeadLetter) and outcome.reason == Reason.INFERENCE_UNAVAILABLE and outcome.retryable
    assert detector.calls > 1 and outcome.attempts == 1, "attempts counts deliveries, not retries within one"


async def test_permanent_inference_errors_are_not_retried() -> None:
    detector = FixedDetector(0.5, Rejected(Reason.INFERENCE_FAILED, "bad input"))
    [outcome] = await pipeline(detector).moderate_batch([message(event("e5"))])
    assert isinstance(outcome, DeadLetter) and outcome.reason == Reason.INFERENCE_FAILED and detector.calls == 1


async def test_a_bug_costs_one_dead_letter_not_the_worker() -> None:
    [outcome] = await pipeline(FixedDetector(0.5, ZeroDivisionError("boom"))).moderate_batch([message(event("e4"))])
    assert isinstance(outcome, DeadLetter)
    assert (outcome.reason, outcome.event_id, outcome.retryable) == (Reason.INTERNAL_ERROR, "e4", True)
    assert "ZeroDivisionError" in outcome.detail


async def test_identical_bytes_are_served_from_the_cache() -> None:
    from moderation.worker.cache import VerdictCache

    detector = FixedDetector(0.9)
    store = MemoryStore({"a.jpg": JPEG, "copy.jpg": JPEG})
    cached = Pipeline(
        store, detector, Policies.of(Policy(0.5, 0.8, 0.5)), 10**7, backoff=FAST, cache=VerdictCache(10, 3600)
    )
    [first] = await cached.moderate_batch([message(event("e1"))])
    [second] = await cached.moderate_batch([message(event("e2", key="copy.jpg"))])
    assert isinstance(first, Verdict) and isinstance(second, Verdict)
    assert (first.cached, second.cached, detector.calls) == (False, True, 1)
    assert (second.score, second.explanation, second.image) == (first.score, first.explanation, first.image)
    assert second.timings.inference_ms == 0.0
    for verdict in (first, second):  # what is published reads back as the same verdict
        assert Verdict.model_validate_json(verdict.to_bytes()) == verdict


async def test_an_oversized_message_is_dead_lettered_with_its_start_so_the_broker_takes_it() -> None:
    huge = b"x" * (MAX_DEAD_LETTER_PAYLOAD + 100_000)
    [letter] = await pipeline(FixedDetector(0.5)).moderate_batch([message(huge)])
    assert isinstance(letter, DeadLetter) and letter.reason == Reason.INVALID_EVENT and not letter.retryable
    assert letter.payload() == huge[:MAX_DEAD_LETTER_PAYLOAD]
    assert f"first {MAX_DEAD_LETTER_PAYLOAD} of {len(huge)} bytes" in letter.detail
    assert len(letter.to_bytes()) < 1_000_000  # Kafka's default max.message.bytes is 1,048,588


async def test_what_is_routed_and_banked_follows_the_policy_that_judged_across_a_reload(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The policy file is reloaded between judging an upload and publishing its outcome: the verdict's
    policy_version, its action, the explanation it asks for, its routing and its banking all follow the policy
    that made the worker's choice (the publisher used to ask for the tenant's policy again, and could bank a
    model flag under a policy that says not to)."""
    from moderation.settings import Settings
    from moderation.worker.routing import records

    path = tmp_path / "policy.yaml"

    def write(version: str, banks: str, threshold: float) -> None:
        path.write_text(
            f'version: "{version}"\ndefault:\n  review_threshold: {threshold}\n  flag_threshold: {threshold}\n'
            f"  explain_above: {threshold}\n  match:\n    bank_model_flags: {banks}\n"
        )

    write("banks", "true", 0.8)
    settings = Settings()
    policies = Policies.from_file(path, settings)

    class Reloading(FixedDetector):
        async def detect(self, crop: np.ndarray) -> Detection:
            write("does-not-bank", "false", 0.99)
            assert policies.reload()
            return await super().detect(crop)

    judging = Pipeline(MemoryStore({"a.jpg": JPEG}), Reloading(0.95), policies, 10**7, backoff=FAST, clock=lambda: NOW)
    [judged] = await judging.judge_batch([message(event("e1"))])
    verdict = judged.outcome
    assert policies.default.version == "does-not-bank"
    assert isinstance(verdict, Verdict) and verdict.action == "flag" and verdict.decided_by == "model"
    assert verdict.explanation_requested  # by the judging policy's band; the reloaded one's starts at 0.99
    assert judged.policy is not None and verdict.policy_version == judged.policy.version == "banks"
    routed, s = {r.topic for r in records(settings, judged, message(event("e1")))}, settings
    assert {s.topic_verdicts, s.topic_flagged, s.topic_review, s.topic_explain_requests, s.topic_bank} <= routed
