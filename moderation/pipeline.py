"""Moderate a batch of raw upload messages: pure orchestration over narrow interfaces, no Faust, no boto.

Every message yields exactly one outcome, a Verdict or a DeadLetter; nothing here raises, so one
bad upload can never take the batch, or the worker, down with it.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

import numpy as np

from moderation.detector import Detector
from moderation.errors import Reason, Rejected
from moderation.events import (
    DeadLetter,
    ImageInfo,
    Timings,
    UploadEvent,
    Verdict,
    event_id_of,
    parse_upload,
    utcnow,
)
from moderation.imaging import decode, preprocess
from moderation.policy import Policy
from moderation.storage import ImageStore

log = logging.getLogger(__name__)

Outcome = Verdict | DeadLetter


@dataclass(frozen=True)
class Incoming:
    """One message from the uploads topic, before any parsing."""

    value: bytes
    topic: str
    partition: int
    offset: int

    @property
    def where(self) -> str:
        return f"{self.topic}[{self.partition}]@{self.offset}"


@dataclass(frozen=True)
class Prepared:
    pixels: np.ndarray
    sha256: str
    image: ImageInfo


@dataclass(frozen=True)
class Pipeline:
    store: ImageStore
    detector: Detector
    policy: Policy
    max_image_pixels: int
    clock: Callable[[], datetime] = utcnow

    async def moderate_batch(self, batch: Sequence[Incoming]) -> list[Outcome]:
        return list(await asyncio.gather(*(self.moderate(message) for message in batch)))

    async def moderate(self, message: Incoming) -> Outcome:
        event: UploadEvent | None = None
        try:
            event = parse_upload(message.value)
            return await self._judge(event)
        except Rejected as exc:
            return self._dead_letter(message, event, exc)
        except Exception as exc:  # a bug must cost one event a dead letter, never the worker
            log.exception("unexpected error", extra={"where": message.where})
            return self._dead_letter(
                message, event, Rejected(Reason.INTERNAL_ERROR, f"{type(exc).__name__}: {exc}")
            )

    async def _judge(self, event: UploadEvent) -> Verdict:
        started = time.perf_counter()
        data = await self.store.fetch(event.bucket, event.key)
        fetched = time.perf_counter()
        prepared = await asyncio.to_thread(prepare, data, self.max_image_pixels, event.sha256)
        decoded = time.perf_counter()
        detection = await self.detector.detect(prepared.pixels, explain_above=self.policy.explain_above)
        done = time.perf_counter()
        return Verdict(
            event_id=event.event_id,
            bucket=event.bucket,
            key=event.key,
            tenant=event.tenant,
            image_sha256=prepared.sha256,
            label="fake" if detection.label == "fake" else "real",
            score=min(max(detection.score, 0.0), 1.0),
            action=self.policy.action(detection.score),
            explanation=detection.explanation,
            answer_label=detection.answer_label if detection.answer_label in ("fake", "real") else None,  # type: ignore[arg-type]
            model=self.detector.model,
            image=prepared.image,
            timings=Timings(
                fetch_ms=_ms(started, fetched),
                decode_ms=_ms(fetched, decoded),
                inference_ms=_ms(decoded, done),
                total_ms=_ms(started, done),
            ),
            uploaded_at=event.uploaded_at,
            decided_at=self.clock(),
            attributes=event.attributes,
        )

    def _dead_letter(self, message: Incoming, event: UploadEvent | None, exc: Rejected) -> DeadLetter:
        now = self.clock()
        event_id = event.event_id if event else event_id_of(message.value)
        log.warning(
            "dead letter %s: %s",
            exc.reason,
            exc.detail,
            extra={"event_id": event_id, "where": message.where, "reason": str(exc.reason)},
        )
        return DeadLetter(
            event_id=event_id,
            reason=exc.reason,
            detail=exc.detail[:2000],
            retryable=exc.retryable,
            attempts=1,
            first_error_at=now,
            last_error_at=now,
            source_topic=message.topic,
            source_partition=message.partition,
            source_offset=message.offset,
            payload_base64=base64.b64encode(message.value).decode(),
        )


def prepare(data: bytes, max_pixels: int, expected_sha256: str | None = None) -> Prepared:
    """CPU-bound: hash, decode and preprocess one image (runs in a worker thread)."""
    digest = hashlib.sha256(data).hexdigest()
    if expected_sha256 is not None and digest != expected_sha256:
        raise Rejected(
            Reason.CHECKSUM_MISMATCH, f"object sha256 is {digest}, the event says {expected_sha256}"
        )
    decoded = decode(data, max_pixels=max_pixels)
    return Prepared(
        pixels=preprocess(decoded.image),
        sha256=digest,
        image=ImageInfo(width=decoded.width, height=decoded.height, format=decoded.format),
    )


def _ms(start: float, end: float) -> float:
    return round((end - start) * 1000, 3)
