"""Reviewer decisions -> the near-duplicate bank. A decision about an image becomes that image's bank entry
(keyed by its sha256 on the compacted bank topic): every worker follows the bank, so the decision overrides
the verdict for these bytes and decides near-duplicates of them. `escalate` decides nothing. `DecisionBanker`
is the decisions agent's work, one record at a time."""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime

from PIL import Image
from pydantic import ValidationError

from moderation.adapters.deadletters import dead_letter_headers
from moderation.adapters.publisher import Publisher, Record
from moderation.adapters.s3 import ImageStore
from moderation.errors import Reason, Rejected
from moderation.events import BankEntry, DeadLetter, Decision, Label, event_id_of, utcnow
from moderation.model import imaging
from moderation.settings import Settings
from moderation.worker import metrics
from moderation.worker.neardup import bank_key, crop_hashes, dihedral_hashes
from moderation.worker.pipeline import Incoming, dead_letter

log = logging.getLogger(__name__)

DECIDED_LABEL: dict[str, Label] = {"confirm_fake": "fake", "overturn_real": "real"}


@dataclass(frozen=True)
class ImageHashes:
    """A decided image's extra PDQ hashes for its bank entry (none when it cannot be fetched any more)."""

    crops: list[str] = field(default_factory=list)
    dihedral: list[str] = field(default_factory=list)


class DecisionBanker:
    """Each record of the decisions topic in turn: a reviewer's decision becomes its image's bank entry, a
    record that is not a decision a dead letter; either is published before `take` returns, so before the
    record is acked."""

    def __init__(self, settings: Settings, store: ImageStore, publisher: Publisher) -> None:
        self.settings, self.store, self.publisher = settings, store, publisher
        # The decided image is decoded under the worker's own limits (formats, pixel cap, structure budgets).
        self._decode = functools.partial(
            _decoded, max_pixels=settings.max_image_pixels, formats=imaging.readable(settings.image_formats)
        )

    async def take(self, message: Incoming) -> None:
        decision = parse_decision(message, utcnow())
        if isinstance(decision, DeadLetter):
            await self.publisher.publish([letter_record(self.settings, decision, message)])
            return
        hashes = await hashes_of(decision, self.store, self._decode)
        if (out := bank_record(self.settings, decision, hashes)) is not None:
            await self.publisher.publish([out])
            metrics.DECISIONS_BANKED.labels(decision.decision).inc()


def parse_decision(message: Incoming, now: datetime) -> Decision | DeadLetter:
    """The record's Decision, or the dead letter of a record that is not one (its bytes kept, reason
    invalid_event, never retryable: replaying it cannot make it valid)."""
    try:
        if not message.value:
            raise ValueError("null or empty value")
        return Decision.model_validate_json(message.value)
    except (ValidationError, ValueError) as exc:
        metrics.DECISIONS_REFUSED.inc()
        log.error("decision refused at %s: %s", message.where, str(exc)[:500])
        refused = Rejected(Reason.INVALID_EVENT, f"not a Decision: {str(exc)[:1000]}")
        return dead_letter(message, event_id_of(message.value), refused, None, now)


def letter_record(settings: Settings, letter: DeadLetter, message: Incoming) -> Record:
    """A refused decision on the dead-letter topic, keyed and headed like the record it answers."""
    key = message.key if message.key is not None else (letter.event_id or "").encode() or None
    return Record(settings.topic_dlq, key, letter.to_bytes(), dead_letter_headers(letter, message.headers))


def bank_record(settings: Settings, decision: Decision, hashes: ImageHashes) -> Record | None:
    """The bank entry a decision makes, or None (escalations; images without a usable PDQ hash still get
    one, so the decision overrides the verdict for their exact bytes)."""
    label = DECIDED_LABEL.get(decision.decision)
    if label is None:
        return None
    entry = BankEntry(
        image_sha256=decision.image_sha256,
        pdq=decision.pdq,
        pdq_quality=decision.pdq_quality,
        pdq_crops=hashes.crops if decision.pdq is not None else [],
        pdq_dihedral=hashes.dihedral if decision.pdq is not None else [],
        event_id=decision.event_id,
        tenant=decision.tenant,
        label=label,
        decided_by="review",
        decided_at=decision.decided_at,
    )
    return Record(settings.topic_bank, bank_key(entry), entry.to_bytes())


async def hashes_of(decision: Decision, store: ImageStore, examine: Callable[[bytes], Image.Image]) -> ImageHashes:
    """The PDQ hashes of the decided image's crops and of its mirrored and rotated copies, so that such copies
    match it too; none when the image cannot be fetched or read any more (its entry then matches unchanged
    copies and its exact bytes)."""
    if decision.pdq is None or decision.decision not in DECIDED_LABEL or not (decision.bucket and decision.key):
        return ImageHashes()
    try:
        data = await store.fetch(decision.bucket, decision.key)
        if hashlib.sha256(data).hexdigest() != decision.image_sha256:
            raise Rejected(Reason.CHECKSUM_MISMATCH, "the object changed since it was reviewed")
        return await asyncio.to_thread(_hashes, examine(data))
    except Rejected as exc:
        log.warning("decision %s banked without crop hashes: %s", decision.event_id, exc.detail)
        return ImageHashes()


def _decoded(data: bytes, *, max_pixels: int, formats: tuple[str, ...]) -> Image.Image:
    return imaging.decode(data, max_pixels=max_pixels, formats=formats).image


def _hashes(image: Image.Image) -> ImageHashes:
    return ImageHashes(crop_hashes(image), dihedral_hashes(image))
