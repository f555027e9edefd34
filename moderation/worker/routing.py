"""Where each outcome of the worker goes: the verdict's topics by its action, the explainer's queue, the bank,
or the dead-letter topic; pure, so that the agent in `moderation.worker.app` only wires."""

from __future__ import annotations

from moderation.adapters.deadletters import dead_letter_headers
from moderation.adapters.publisher import Record
from moderation.events import BankEntry, DeadLetter, ExplainRequest, Verdict
from moderation.settings import Settings
from moderation.worker import neardup, tracing
from moderation.worker.pipeline import Incoming, Judged


def records(settings: Settings, judged: Judged, message: Incoming) -> list[Record]:
    """Where one outcome goes: every verdict to verdicts (and flagged, and the review queue, by the policy's
    action; the explainer's queue when it wants an explanation; the bank when the policy that decided it
    banks model flags); a dead letter to the dlq, keyed and headed like the record it answers, plus why and
    whence. Each carries its event's `traceparent`. Cache entries are not among them: they go out best
    effort (`CacheFeed`), never holding up an ack."""
    outcome = judged.outcome
    value, traced = outcome.to_bytes(), tracing.header_values(message.trace)
    if isinstance(outcome, DeadLetter):
        key = message.key if message.key is not None else _encoded(outcome.event_id)
        headers = dead_letter_headers(outcome, tracing.without_trace_headers(message.headers)) + traced
        return [Record(settings.topic_dlq, key, value, headers)]
    key = outcome.event_id.encode()
    out = [Record(settings.topic_verdicts, key, value, traced)]
    if outcome.action == "flag":
        out.append(Record(settings.topic_flagged, key, value, traced))
    if outcome.action in ("review", "flag"):  # the reviewers' queue
        out.append(Record(settings.topic_review, key, value, traced))
    if outcome.explanation_requested:  # after its verdict: an explanation is never out before what it explains
        request = ExplainRequest(event_id=outcome.event_id, verdict=outcome, requested_at=outcome.decided_at)
        out.append(Record(settings.topic_explain_requests, key, request.to_bytes(), traced))
    if outcome.action == "flag" and judged.policy is not None and judged.policy.match.bank_model_flags:
        out.extend(banked_flag(settings, outcome))
    return out


def banked_flag(settings: Settings, verdict: Verdict) -> list[Record]:
    """A flag the model decided, banked so that near-duplicates match it; keyed apart from the reviewers'
    entry for the same bytes (`<sha256>:model`), which compaction must never replace."""
    if verdict.decided_by != "model" or verdict.image.pdq is None:
        return []
    entry = BankEntry(
        image_sha256=verdict.image_sha256,
        pdq=verdict.image.pdq,
        pdq_quality=verdict.image.pdq_quality,
        event_id=verdict.event_id,
        tenant=verdict.tenant,
        label=verdict.label,
        decided_by="model",
        decided_at=verdict.decided_at,
    )
    return [Record(settings.topic_bank, neardup.bank_key(entry), entry.to_bytes())]


def _encoded(event_id: str | None) -> bytes | None:
    return event_id.encode() if event_id else None
