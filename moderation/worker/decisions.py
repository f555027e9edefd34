"""Reviewer decisions -> the near-duplicate bank. A decision about an image becomes that image's bank entry
(keyed by its sha256 on the compacted bank topic): every worker follows the bank, so the decision overrides
the verdict for these bytes and decides near-duplicates of them. `escalate` decides nothing."""

from __future__ import annotations

import logging

from pydantic import ValidationError

from moderation.events import BankEntry, Decision, Label
from moderation.settings import Settings
from moderation.worker import metrics
from moderation.worker.publisher import Record

log = logging.getLogger(__name__)

DECIDED_LABEL: dict[str, Label] = {"confirm_fake": "fake", "overturn_real": "real"}


def parse_decision(value: bytes | None, where: str) -> Decision | None:
    """The record's Decision; a malformed one is logged and counted, never fatal (a decision is not an upload:
    it has no dead letter to replay into the uploads topic)."""
    try:
        if not value:
            raise ValueError("null or empty value")
        return Decision.model_validate_json(value)
    except (ValidationError, ValueError) as exc:
        metrics.DECISIONS_REFUSED.inc()
        log.error("decision refused at %s: %s", where, str(exc)[:500])
        return None


def bank_record(settings: Settings, decision: Decision) -> Record | None:
    """The bank entry a decision makes, or None (escalations; images without a usable PDQ hash still get
    one, so the decision overrides the verdict for their exact bytes)."""
    label = DECIDED_LABEL.get(decision.decision)
    if label is None:
        return None
    entry = BankEntry(
        image_sha256=decision.image_sha256,
        pdq=decision.pdq,
        pdq_quality=decision.pdq_quality,
        event_id=decision.event_id,
        tenant=decision.tenant,
        label=label,
        decided_by="review",
        decided_at=decision.decided_at,
    )
    return Record(settings.topic_bank, decision.image_sha256.encode(), entry.to_bytes())
