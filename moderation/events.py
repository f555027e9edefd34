"""Every message on every topic, as pydantic models; the committed JSON Schemas are generated from these.

Parsing an upload event never raises anything but `Rejected`, so a malformed message becomes a
dead letter with a stable reason instead of crashing a worker.
"""

from __future__ import annotations

import base64
import json
from datetime import UTC, datetime
from typing import Annotated, Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from moderation.errors import Reason, Rejected

SCHEMA_VERSION: Literal[1] = 1
SUPPORTED_SCHEMA_VERSIONS = frozenset({SCHEMA_VERSION})
MAX_ATTRIBUTES = 32
MAX_FRAMES_JUDGED = 256  # the most frames of one image a policy may ask to judge

Label = Literal["fake", "real"]
Action = Literal["allow", "review", "flag"]
# Who decided a verdict's label: the model's P(fake), the image's own provenance declaring AI generation,
# a near-duplicate of a banked image, or a reviewer's decision about these very bytes.
DecidedBy = Literal["model", "provenance", "match", "review"]
# Who made a banked decision: a reviewer here, the model (a flag banked by policy), or another platform whose
# hash list was imported (`moderation bank import`): ranked below a reviewer's, which it never overrides.
BankedBy = Literal["model", "provenance", "match", "review", "import"]
ReviewDecision = Literal["confirm_fake", "overturn_real", "escalate"]
PDQ_PATTERN = r"^[0-9a-f]{64}$"  # a 256-bit PDQ hash, hex
SHA256_PATTERN = r"^[0-9a-f]{64}$"
EventId = Annotated[str, Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9._:\-]+$")]


class _Message(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    def to_bytes(self) -> bytes:
        return self.model_dump_json(exclude_none=False).encode()


class UploadEvent(_Message):
    """Published by a platform backend after it stored an image in S3."""

    schema_version: Literal[1] = Field(description="Contract version; unknown versions are dead-lettered.")
    event_id: EventId = Field(description="Idempotency key: every output about this upload is keyed by it.")
    bucket: str = Field(min_length=3, max_length=63, pattern=r"^[a-z0-9][a-z0-9.\-]+[a-z0-9]$")
    key: str = Field(min_length=1, max_length=1024)
    content_type: str | None = Field(default=None, max_length=255)
    size_bytes: int | None = Field(default=None, ge=0)
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    tenant: str | None = Field(default=None, max_length=200)
    uploaded_at: AwareDatetime | None = None
    attributes: dict[Annotated[str, Field(max_length=128)], Annotated[str, Field(max_length=1024)]] = Field(
        default_factory=dict,
        max_length=MAX_ATTRIBUTES,
        description="Free key/value pairs passed through to the verdict untouched.",
    )

    @field_validator("schema_version", mode="before")
    @classmethod
    def _not_a_boolean(cls, value: Any) -> Any:
        if isinstance(value, bool):  # Literal[1] takes `true` for 1
            raise ValueError("schema_version must be a number")
        return value


class ModelInfo(_Message):
    name: str = Field(description="Triton model name or in-process backend name.")
    version: str = Field(description="Model version and checkpoint, e.g. '1 (lingcco/fakeVLM)'.")
    weights: str | None = Field(
        default=None,
        max_length=200,
        description="What the weights are, not where: 'hf:<repo>@<commit>' or 'sha256:<digest of every file>'; "
        "null when unknown (such a verdict is never served from the cache).",
    )


class ImageInfo(_Message):
    width: int
    height: int
    format: str
    pdq: str | None = Field(
        default=None,
        pattern=PDQ_PATTERN,
        description="PDQ perceptual hash (256 bits, hex) for near-duplicate matching.",
    )
    pdq_quality: int | None = Field(default=None, ge=0, le=100, description="PDQ's own quality: below 50, unmatched.")
    frames: int = Field(
        default=1,
        ge=1,
        description="Frames (or pages) the file holds: 1 for a still image. Counted no further than "
        "MODERATION_MAX_FRAME_DECODES + 1, so that number means 'at least'.",
    )
    frames_judged: list[int] = Field(
        default_factory=list,
        max_length=MAX_FRAMES_JUDGED,
        description="The 0-based frames the model judged (the pdq hash is the first frame's); empty in records "
        "written before frames were judged, which judged the first frame only.",
    )


class C2paEvidence(_Message):
    """What the image's C2PA manifest store says, as c2pa-python read and validated it."""

    validation_state: str = Field(description="c2pa's: Valid, Trusted or Invalid (the signature, hashes, chain).")
    valid: bool = Field(description="Signature and hard bindings check out (Valid or Trusted).")
    claim_generator: str | None = None
    signer: str | None = Field(default=None, description="The signing certificate's issuer, as c2pa reports it.")
    digital_source_types: list[str] = Field(
        default_factory=list, description="digitalSourceType URIs of the active manifest's c2pa.actions."
    )
    errors: list[str] = Field(default_factory=list, description="Validation failures (codes), when invalid.")
    ingredient_source_types: list[str] = Field(
        default_factory=list,
        description="digitalSourceType URIs that the manifests of the active manifest's ingredients (its parents, "
        "and theirs) declare in their c2pa.actions.",
    )


class Provenance(_Message):
    """What the file says about its own origin, read before the model runs. Evidence for reviewers: only a
    declaration of AI generation decides a label (`decided_by: provenance`); a capture claim never does."""

    c2pa: C2paEvidence | None = None
    iptc_digital_source_type: str | None = Field(
        default=None, description="XMP Iptc4xmpExt:DigitalSourceType (an IPTC NewsCodes URI)."
    )
    exif_software: str | None = None
    exif_make: str | None = None
    exif_model: str | None = None
    declares_ai: bool = Field(
        default=False,
        description="C2PA or IPTC declares trainedAlgorithmicMedia, a composite of it, or algorithmicMedia.",
    )
    declares_capture: bool = Field(
        default=False, description="A VALID C2PA manifest declares digitalCapture: shown to reviewers, never a verdict."
    )
    ingredient_declares_ai: bool = Field(
        default=False,
        description="An ingredient's C2PA manifest declares AI generation: part of this image came from a generator, "
        "whatever the image's own manifest says. Evidence for reviewers, its own kind: never a verdict by itself.",
    )


class Match(_Message):
    """The banked image this upload is a near-duplicate of."""

    event_id: str | None = Field(description="The banked image's upload event; null for an imported hash.")
    image_sha256: str | None = Field(pattern=SHA256_PATTERN, description="Null for an imported hash.")
    distance: int = Field(ge=0, le=256, description="Hamming distance between the two PDQ hashes.")
    label: Label = Field(description="The banked decision.")
    decided_by: BankedBy = Field(description="Where the banked decision came from (review first).")
    source: str | None = Field(default=None, description="The hash list an imported hash came from.")


class Timings(_Message):
    fetch_ms: float
    decode_ms: float
    inference_ms: float
    total_ms: float


class Verdict(_Message):
    """The model's decision about one upload, enough for a statement of reasons and an audit."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: EventId
    bucket: str
    key: str
    tenant: str | None = None
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    label: Label
    score: float = Field(ge=0.0, le=1.0, description="P(fake) from the verdict token's logits.")
    frame: int | None = Field(
        default=None,
        ge=0,
        description="For an animated or multi-page image, the 0-based frame whose P(fake) is the score, the "
        "highest of the frames judged (image.frames_judged), and the frame an explanation is asked for; null "
        "for a still image.",
    )
    action: Action
    explanation: str | None = Field(
        description="FakeVLM's answer text when it was already known for these bytes (a cache hit); otherwise null, "
        "and `explanation_requested` says whether an Explanation record follows."
    )
    answer_label: Label | None = Field(
        default=None, description="The label the explanation's first sentence states (official eval rule)."
    )
    explanation_requested: bool = Field(
        default=False,
        description="An explanation was asked for (policy: P(fake) at or above the tenant's explain_above): an "
        "Explanation with this event_id follows on the explanations topic. The verdict never waits for it.",
    )
    model: ModelInfo
    cached: bool = False
    image: ImageInfo
    timings: Timings
    uploaded_at: AwareDatetime | None = None
    decided_at: AwareDatetime
    attributes: dict[str, str] = Field(default_factory=dict)
    decided_by: DecidedBy = Field(default="model", description="Who decided the label (model unless stated).")
    provenance: Provenance | None = Field(default=None, description="The file's own claims about its origin.")
    match: Match | None = Field(default=None, description="The banked near-duplicate, when one was within range.")
    policy_version: str | None = Field(default=None, description="The tenant policy's version that decided the action.")


class Decision(_Message):
    """A reviewer's decision about one upload: topic moderation.decisions, keyed by event_id. Decisions feed
    the near-duplicate bank and override the verdict cache for the image's bytes."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: EventId
    image_sha256: str = Field(pattern=SHA256_PATTERN)
    pdq: str | None = Field(default=None, pattern=PDQ_PATTERN, description="The image's PDQ hash, from its verdict.")
    pdq_quality: int | None = Field(default=None, ge=0, le=100)
    bucket: str | None = Field(default=None, description="Where the image is: the bank hashes its crops from it.")
    key: str | None = None
    tenant: str | None = None
    decision: ReviewDecision
    note: str | None = Field(default=None, max_length=2000)
    reviewer: str = Field(min_length=1, max_length=200, description="Who decided: never anonymous.")
    decided_at: AwareDatetime
    model_label: Label = Field(description="The verdict's label when it was reviewed.")
    model_score: float = Field(ge=0.0, le=1.0, description="The verdict's P(fake) when it was reviewed.")
    model_action: Action
    model_decided_by: DecidedBy = "model"

    @classmethod
    def about(
        cls,
        verdict: Verdict,
        decision: ReviewDecision,
        reviewer: str,
        *,
        note: str | None = None,
        at: datetime | None = None,
    ) -> Decision:
        """A reviewer's decision about a verdict, carrying what the bank needs of it (hash, location) and what
        the verdict said, for `moderation precision`."""
        return cls(
            event_id=verdict.event_id,
            image_sha256=verdict.image_sha256,
            pdq=verdict.image.pdq,
            pdq_quality=verdict.image.pdq_quality,
            bucket=verdict.bucket,
            key=verdict.key,
            tenant=verdict.tenant,
            decision=decision,
            note=note,
            reviewer=reviewer,
            decided_at=at or utcnow(),
            model_label=verdict.label,
            model_score=verdict.score,
            model_action=verdict.action,
            model_decided_by=verdict.decided_by,
        )


class BankEntry(_Message):
    """One known image in the near-duplicate bank: compacted topic moderation.hash-bank, keyed by image sha256."""

    schema_version: Literal[1] = SCHEMA_VERSION
    image_sha256: str | None = Field(
        pattern=SHA256_PATTERN, description="Null for a hash shared without its image (decided_by import)."
    )
    pdq: str | None = Field(
        default=None, pattern=PDQ_PATTERN, description="Null: matched by its exact bytes only (sha256)."
    )
    pdq_quality: int | None = Field(default=None, ge=0, le=100)
    pdq_crops: list[Annotated[str, Field(pattern=PDQ_PATTERN)]] = Field(
        default_factory=list,
        max_length=16,
        description="PDQ hashes of centred crops of the image (moderation.worker.neardup.crop_hashes): PDQ alone "
        "loses a copy cropped by a few percent, so the bank matches uploads against these too.",
    )
    pdq_dihedral: list[Annotated[str, Field(pattern=PDQ_PATTERN)]] = Field(
        default_factory=list,
        max_length=7,
        description="PDQ hashes of the image mirrored and rotated (moderation.worker.neardup.dihedral_hashes): "
        "PDQ of a mirrored copy is ~128 bits from the original's, as far as an unrelated image's.",
    )
    event_id: str | None = Field(description="The decided upload; null for an imported hash.")
    tenant: str | None = None
    label: Label
    decided_by: BankedBy = Field(description="review (a reviewer's decision) outranks import, which outranks model.")
    decided_at: AwareDatetime
    source: str | None = Field(
        default=None, max_length=200, description="The hash list an imported hash came from (removable by it)."
    )

    @model_validator(mode="after")
    def _imported_or_own(self) -> BankEntry:
        imported = self.decided_by == "import"
        if imported != (self.source is not None) or imported != (self.image_sha256 is None):
            raise ValueError("an imported entry has a source and no image_sha256; any other has an image_sha256")
        if imported and self.pdq is None:
            raise ValueError("an imported entry is its PDQ hash")
        return self


class DeadLetter(_Message):
    """An upload that got no verdict, with why, and its original bytes to replay."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: str | None = Field(description="Null when the payload was too broken to carry one.")
    reason: Reason
    detail: str
    retryable: bool
    attempts: int = Field(ge=1)
    first_error_at: AwareDatetime
    last_error_at: AwareDatetime
    source_topic: str
    source_partition: int
    source_offset: int
    payload_base64: str = Field(
        description="The original message value, byte for byte, base64-encoded; over 512 KiB only its start "
        "(the detail says so, and such a letter is not retryable)."
    )
    payload_null: bool = Field(
        default=False, description="The original value was null (a tombstone), not empty: payload_base64 is ''."
    )

    def payload(self) -> bytes:
        return base64.b64decode(self.payload_base64)


class ExplainRequest(_Message):
    """Work for the explainer: topic moderation.explain-requests, keyed by event_id, published with the verdict it
    asks about (so it is never lost: the upload's offset is committed only once both are acknowledged)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: EventId
    verdict: Verdict = Field(description="The verdict to explain, as published: where the image is and what was said.")
    requested_at: AwareDatetime


class Explanation(_Message):
    """FakeVLM's answer text about one upload: topic moderation.explanations, keyed by event_id. Published after
    the verdict it explains (at least once: a restarted explainer may explain the same event again); it never
    changes that verdict's label, score or action."""

    schema_version: Literal[1] = SCHEMA_VERSION
    event_id: EventId
    image_sha256: str = Field(pattern=SHA256_PATTERN)
    tenant: str | None = None
    verdict_label: Label = Field(description="The explained verdict's label, as published.")
    verdict_score: float = Field(ge=0.0, le=1.0, description="The explained verdict's P(fake), as published.")
    verdict_action: Action
    verdict_decided_at: AwareDatetime = Field(description="With event_id, names the verdict this explains.")
    frame: int | None = Field(default=None, ge=0, description="The frame explained: the verdict's `frame`.")
    explanation: str = Field(description="FakeVLM's answer, greedy, from 'This is a ...'.")
    answer_label: Label | None = Field(
        default=None, description="The label the explanation's first sentence states (official eval rule)."
    )
    model: ModelInfo = Field(description="The weights that generated the text (the verdict's, unless rolled since).")
    requested_at: AwareDatetime
    explained_at: AwareDatetime
    explain_ms: float = Field(ge=0, description="Fetch, decode and generation for this explanation.")


class CacheEntry(_Message):
    """What one model (its weights) said about one image's bytes: the verdict cache topic, compacted, keyed by
    image sha256 and model identity (`moderation.worker.cache.cache_key`)."""

    schema_version: Literal[1] = SCHEMA_VERSION
    image_sha256: str = Field(pattern=r"^[0-9a-f]{64}$")
    label: Label
    score: float = Field(ge=0.0, le=1.0)
    frame: int | None = Field(default=None, ge=0, description="As the verdict's: the frame the score is of.")
    explanation: str | None
    answer_label: Label | None = None
    model: ModelInfo
    image: ImageInfo
    decided_at: AwareDatetime
    provenance: Provenance | None = Field(default=None, description="The bytes' own claims: as these bytes, cached.")

    @classmethod
    def of(cls, verdict: Verdict) -> CacheEntry:
        return cls(
            image_sha256=verdict.image_sha256,
            label=verdict.label,
            score=verdict.score,
            frame=verdict.frame,
            explanation=verdict.explanation,
            answer_label=verdict.answer_label,
            model=verdict.model,
            image=verdict.image,
            decided_at=verdict.decided_at,
            provenance=verdict.provenance,
        )


MESSAGES: dict[str, type[BaseModel]] = {
    "upload_event": UploadEvent,
    "verdict": Verdict,
    "dead_letter": DeadLetter,
    "cache_entry": CacheEntry,
    "explain_request": ExplainRequest,
    "explanation": Explanation,
    "decision": Decision,
    "bank_entry": BankEntry,
}


def parse_upload(payload: bytes | None) -> UploadEvent:
    """A record's value from the uploads topic -> UploadEvent, or `Rejected` with a stable reason."""
    if not payload:  # Kafka allows both: a tombstone (null) and an empty value
        raise Rejected(Reason.INVALID_EVENT, "null value (a tombstone)" if payload is None else "empty value")
    try:  # pydantic's own JSON parser: the common case, twice as fast as json.loads and model_validate
        return UploadEvent.model_validate_json(payload)
    except ValidationError:
        pass  # find out why, for the dead letter's reason
    try:
        data = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise Rejected(Reason.INVALID_EVENT, f"not JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise Rejected(Reason.INVALID_EVENT, f"expected a JSON object, got {type(data).__name__}")
    version = data.get("schema_version")
    if type(version) is not int or version not in SUPPORTED_SCHEMA_VERSIONS:  # bool is not int here; lists not hashable
        raise Rejected(
            Reason.UNSUPPORTED_SCHEMA,
            f"schema_version {version!r} is not one of {sorted(SUPPORTED_SCHEMA_VERSIONS)}",
        )
    try:
        return UploadEvent.model_validate(data)
    except ValidationError as exc:
        raise Rejected(Reason.INVALID_EVENT, _summarise(exc)) from exc


def parse_explain_request(payload: bytes | None) -> ExplainRequest:
    """A record's value from the explain-requests topic -> ExplainRequest, or `Rejected` (invalid_event)."""
    if not payload:
        raise Rejected(Reason.INVALID_EVENT, "null value (a tombstone)" if payload is None else "empty value")
    try:
        return ExplainRequest.model_validate_json(payload)
    except ValidationError as exc:
        raise Rejected(Reason.INVALID_EVENT, _summarise(exc)) from exc


def event_id_of(payload: bytes | None) -> str | None:
    """Best-effort event_id of a payload that failed validation, so its dead letter is still keyed."""
    if not payload:
        return None
    try:
        value = json.loads(payload).get("event_id")
    except Exception:
        return None
    return value if isinstance(value, str) and 0 < len(value) <= 200 else None


def json_schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema(mode="serialization") for name, model in MESSAGES.items()}


def utcnow() -> datetime:
    return datetime.now(UTC)


def _summarise(exc: ValidationError) -> str:
    parts = [f"{'.'.join(str(p) for p in err['loc']) or '<root>'}: {err['msg']}" for err in exc.errors()[:5]]
    more = exc.error_count() - len(parts)
    return "; ".join(parts) + (f" (+{more} more)" if more > 0 else "")
