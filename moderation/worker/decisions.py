"""Reviewer decisions -> the near-duplicate bank. A decision about an image becomes that image's bank entry
(keyed by its sha256 on the compacted bank topic): every worker follows the bank, so the decision overrides
the verdict for these bytes and decides near-duplicates of them. `escalate` decides nothing."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from collections.abc import Callable

from PIL import Image
from pydantic import ValidationError

from moderation.errors import Reason, Rejected
from moderation.events import BankEntry, Decision, Label
from moderation.settings import Settings
from moderation.worker import metrics
from moderation.worker.neardup import bank_key, crop_hashes
from moderation.worker.publisher import Record
from moderation.worker.storage import ImageStore

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


def bank_record(settings: Settings, decision: Decision, crops: list[str]) -> Record | None:
    """The bank entry a decision makes, or None (escalations; images without a usable PDQ hash still get
    one, so the decision overrides the verdict for their exact bytes)."""
    label = DECIDED_LABEL.get(decision.decision)
    if label is None:
        return None
    entry = BankEntry(
        image_sha256=decision.image_sha256,
        pdq=decision.pdq,
        pdq_quality=decision.pdq_quality,
        pdq_crops=crops if decision.pdq is not None else [],
        event_id=decision.event_id,
        tenant=decision.tenant,
        label=label,
        decided_by="review",
        decided_at=decision.decided_at,
    )
    return Record(settings.topic_bank, bank_key(entry), entry.to_bytes())


async def crops_of(decision: Decision, store: ImageStore, examine: Callable[[bytes], Image.Image]) -> list[str]:
    """The PDQ hashes of the decided image's crops, so that cropped copies match it too; none when the image
    cannot be fetched or read any more (its entry then matches uncropped copies and its exact bytes)."""
    if decision.pdq is None or decision.decision not in DECIDED_LABEL or not (decision.bucket and decision.key):
        return []
    try:
        data = await store.fetch(decision.bucket, decision.key)
        if hashlib.sha256(data).hexdigest() != decision.image_sha256:
            raise Rejected(Reason.CHECKSUM_MISMATCH, "the object changed since it was reviewed")
        return await asyncio.to_thread(lambda: crop_hashes(examine(data)))
    except Rejected as exc:
        log.warning("decision %s banked without crop hashes: %s", decision.event_id, exc.detail)
        return []
