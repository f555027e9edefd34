"""One exception root for the package, with exceptions that say what the caller should do."""

from __future__ import annotations

from enum import StrEnum


class Reason(StrEnum):
    """Stable dead-letter reason codes. Consumers key alerts and replays on these: never rename one."""

    INVALID_EVENT = "invalid_event"
    UNSUPPORTED_SCHEMA = "unsupported_schema"
    FORBIDDEN_BUCKET = "forbidden_bucket"
    OBJECT_MISSING = "object_missing"
    ACCESS_DENIED = "access_denied"
    STORAGE_UNAVAILABLE = "storage_unavailable"
    TOO_LARGE = "too_large"
    CHECKSUM_MISMATCH = "checksum_mismatch"
    EMPTY_OBJECT = "empty_object"
    INVALID_IMAGE = "invalid_image"
    TOO_MANY_PIXELS = "too_many_pixels"
    INFERENCE_FAILED = "inference_failed"
    INFERENCE_UNAVAILABLE = "inference_unavailable"
    INTERNAL_ERROR = "internal_error"
    UNSUPPORTED_FORMAT = "unsupported_format"
    # An object key with a `.` or `..` path segment: S3 servers, SDKs and proxies resolve them differently, so the
    # object fetched may not be the one named. Refused by us, before any request, never by chance upstream.
    UNSAFE_KEY = "unsafe_key"
    # An explanation request (not an upload) that no explanation came of: its verdict stands as published.
    EXPLANATION_FAILED = "explanation_failed"


RETRYABLE = frozenset(
    {
        Reason.STORAGE_UNAVAILABLE,
        Reason.INFERENCE_UNAVAILABLE,
        Reason.INFERENCE_FAILED,
        Reason.INTERNAL_ERROR,
        Reason.EXPLANATION_FAILED,
    }
)

# Faults of the system around an event, not of the event: retried with backoff before any dead letter.
TRANSIENT = frozenset({Reason.STORAGE_UNAVAILABLE, Reason.INFERENCE_UNAVAILABLE})


class ModerationError(Exception):
    """Root of our errors."""


class Rejected(ModerationError):
    """This event cannot be moderated: dead-letter it with a stable reason code."""

    def __init__(self, reason: Reason, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail

    @property
    def retryable(self) -> bool:
        return self.reason in RETRYABLE


class ModelError(ModerationError):
    """The model could not be loaded or run."""
