"""The explainer's logic with in-memory stand-ins for S3 and Triton, and the worker's routing of explain requests;
the same paths run against the real stack (Tansu, SeaweedFS, Triton's fakevlm_explain) in
tests/stream/test_explanations.py."""

import hashlib
from datetime import UTC, datetime

import numpy as np

from moderation.devkit.samples import draw_image, encode
from moderation.errors import Reason, Rejected
from moderation.events import DeadLetter, ExplainRequest, Explanation, ImageInfo, ModelInfo, Timings, Verdict
from moderation.model.detectors import Detection
from moderation.policy import Policy
from moderation.settings import Settings
from moderation.worker.explainer import Explainer, explained_verdict
from moderation.worker.pipeline import Backoff, Incoming, Judged, Pipeline
from moderation.worker.policies import Policies
from moderation.worker.routing import records
from tests.fixtures.fakes import MemoryStore

NOW = datetime(2026, 12, 7, tzinfo=UTC)
JPEG = encode(draw_image(0, (64, 48)), "JPEG")
MODEL = ModelInfo(name="fakevlm", version="1", weights="sha256:" + "1" * 64)
SETTINGS = Settings(explain_deadline_s=5.0)
FAST = Backoff(deadline_s=5.0, base_s=0.001, cap_s=0.01)
TEXT = "This is a fake image. The fur melts into the background."


class Explaining:
    """Verdicts at `score`; explanations with TEXT, after `failures` faults of `fail`."""

    model = explain_model = MODEL

    def __init__(self, score: float = 0.9, fail: Exception | None = None, failures: int = 0) -> None:
        self.score, self.fail, self.failures, self.explained = score, fail, failures, 0

    async def detect(self, pixel_values: np.ndarray, **_: object) -> Detection:
        return Detection.of(self.score, None, None, None)

    async def explain(self, pixel_values: np.ndarray) -> Detection:
        self.explained += 1
        if self.fail is not None and self.explained <= self.failures:
            raise self.fail
        return Detection.of(self.score, None, TEXT, "fake")


def verdict(key: str = "a.jpg", data: bytes = JPEG, score: float = 0.9) -> Verdict:
    return Verdict(
        event_id="e1",
        bucket="uploads",
        key=key,
        tenant="t1",
        image_sha256=hashlib.sha256(data).hexdigest(),
        label="fake",
        score=score,
        action="flag",
        explanation=None,
        explanation_requested=True,
        model=MODEL,
        image=ImageInfo(width=64, height=48, format="JPEG"),
        timings=Timings(fetch_ms=1, decode_ms=1, inference_ms=1, total_ms=3),
        decided_at=NOW,
    )


def request_message(v: Verdict, offset: int = 7) -> Incoming:
    request = ExplainRequest(event_id=v.event_id, verdict=v, requested_at=NOW)
    return Incoming(
        value=request.to_bytes(), topic=SETTINGS.topic_explain_requests, partition=2, offset=offset, key=b"e1"
    )


def explainer(detector: Explaining, objects: dict[str, bytes] | None = None) -> Explainer:
    store = MemoryStore({"a.jpg": JPEG} if objects is None else objects)
    return Explainer(SETTINGS, store, detector, FAST, clock=lambda: NOW)  # type: ignore[arg-type]


async def test_an_explanation_names_the_verdict_it_explains_and_never_changes_it() -> None:
    answer = await explainer(Explaining()).answer(request_message(verdict()))
    assert isinstance(answer, Explanation)
    assert (answer.event_id, answer.explanation, answer.answer_label, answer.model) == ("e1", TEXT, "fake", MODEL)
    assert (answer.verdict_label, answer.verdict_score, answer.verdict_action) == ("fake", 0.9, "flag")
    assert answer.verdict_decided_at == NOW and answer.tenant == "t1"


async def test_transient_faults_are_retried_with_backoff_until_the_explanation_comes() -> None:
    detector = Explaining(fail=Rejected(Reason.INFERENCE_UNAVAILABLE, "fakevlm_explain queue full"), failures=3)
    answer = await explainer(detector).answer(request_message(verdict()))
    assert isinstance(answer, Explanation) and detector.explained == 4


async def test_an_outage_past_the_deadline_is_a_retryable_explanation_failed_letter() -> None:
    detector = Explaining(fail=Rejected(Reason.INFERENCE_UNAVAILABLE, "down"), failures=10**9)
    slow = Explainer(
        Settings(explain_deadline_s=0.05),
        MemoryStore({"a.jpg": JPEG}),
        detector,
        FAST,
        clock=lambda: NOW,  # type: ignore[arg-type]
    )
    message = request_message(verdict())
    letter = await slow.answer(message)
    assert isinstance(letter, DeadLetter)
    assert (letter.reason, letter.retryable, letter.event_id) == (Reason.EXPLANATION_FAILED, True, "e1")
    assert letter.detail.startswith("inference_unavailable:") and letter.payload() == message.value
    assert (letter.source_topic, letter.source_partition, letter.source_offset) == (
        SETTINGS.topic_explain_requests,
        2,
        7,
    )


async def test_a_replaced_or_missing_object_is_a_final_letter_and_the_model_is_not_asked() -> None:
    detector = Explaining()
    replaced = await explainer(detector, {"a.jpg": JPEG + b"x"}).answer(request_message(verdict()))
    missing = await explainer(detector, {}).answer(request_message(verdict()))
    for letter, why in ((replaced, "checksum_mismatch"), (missing, "object_missing")):
        assert isinstance(letter, DeadLetter) and letter.reason == Reason.EXPLANATION_FAILED
        assert letter.detail.startswith(f"{why}:") and not letter.retryable
    assert detector.explained == 0


async def test_a_record_that_is_no_request_is_an_invalid_event_letter() -> None:
    for value in (None, b"", b"{}", b"not json"):
        message = Incoming(value=value, topic=SETTINGS.topic_explain_requests, partition=0, offset=1)
        letter = await explainer(Explaining()).answer(message)
        assert isinstance(letter, DeadLetter) and letter.reason == Reason.INVALID_EVENT
        assert letter.payload_null == (value is None)


async def test_outcomes_go_to_their_topics_keyed_like_the_request() -> None:
    e = explainer(Explaining())
    message = request_message(verdict())
    [explained] = e.records(await e.answer(message), message)
    assert (explained.topic, explained.key) == (SETTINGS.topic_explanations, b"e1")
    [letter] = e.records(await explainer(Explaining(), {}).answer(message), message)
    assert (letter.topic, letter.key) == (SETTINGS.topic_dlq, b"e1")
    assert dict(letter.headers or [])["moderation.dlq.reason"] == b"explanation_failed"


def test_the_cache_learns_an_explanation_only_from_the_verdicts_own_weights() -> None:
    v = verdict()
    request = ExplainRequest(event_id="e1", verdict=v, requested_at=NOW)
    explanation = Explanation(
        event_id="e1",
        image_sha256=v.image_sha256,
        verdict_label="fake",
        verdict_score=0.9,
        verdict_action="flag",
        verdict_decided_at=NOW,
        explanation=TEXT,
        answer_label="fake",
        model=MODEL,
        requested_at=NOW,
        explained_at=NOW,
        explain_ms=1.0,
    )
    cached = explained_verdict(request, explanation)
    assert cached is not None and (cached.explanation, cached.explanation_requested) == (TEXT, False)
    rolled = explanation.model_copy(update={"model": MODEL.model_copy(update={"weights": "sha256:" + "2" * 64})})
    assert explained_verdict(request, rolled) is None


def test_the_worker_publishes_the_request_after_its_verdict_and_only_when_asked() -> None:
    upload = Incoming(value=b"{}", topic=SETTINGS.topic_uploads, partition=0, offset=0)
    policy = Policy(0.5, 0.8, 0.5)
    topics = [r.topic for r in records(SETTINGS, Judged(verdict(), policy), upload)]
    assert topics[0] == SETTINGS.topic_verdicts and topics[-1] == SETTINGS.topic_explain_requests
    request = ExplainRequest.model_validate_json(records(SETTINGS, Judged(verdict(), policy), upload)[-1].value)
    assert request.verdict == verdict()
    quiet = verdict().model_copy(update={"explanation_requested": False})
    assert SETTINGS.topic_explain_requests not in [r.topic for r in records(SETTINGS, Judged(quiet, policy), upload)]


async def test_a_verdict_asks_for_its_explanation_within_the_explain_band_only() -> None:
    upload = Incoming(
        value=b'{"schema_version": 1, "event_id": "e1", "bucket": "uploads", "key": "a.jpg"}',
        topic="uploads",
        partition=0,
        offset=0,
    )
    for score, wanted in ((0.9, True), (0.5, True), (0.2, False)):
        p = Pipeline(MemoryStore({"a.jpg": JPEG}), Explaining(score), Policies.of(Policy(0.5, 0.8, 0.5)), 10**7)  # type: ignore[arg-type]
        [outcome] = await p.moderate_batch([upload])
        assert isinstance(outcome, Verdict) and outcome.explanation_requested is wanted
        assert outcome.explanation is None
