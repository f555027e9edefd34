"""Every setting of the worker and the CLI, read once from `MODERATION_*` environment variables.

The README's configuration table is generated from this class (`moderation settings --markdown`)
and a test keeps the two in step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[tuple[str, ...], NoDecode]


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="MODERATION_", env_file=None, extra="ignore", frozen=True)

    # Kafka
    kafka_bootstrap_servers: str = Field("127.0.0.1:9092", description="Comma-separated host:port list.")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="PLAINTEXT, SSL, SASL_PLAINTEXT or SASL_SSL."
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] = Field(
        "PLAIN", description="PLAIN, SCRAM-SHA-256 or SCRAM-SHA-512."
    )
    kafka_sasl_username: str | None = Field(None, description="SASL user name.")
    kafka_sasl_password: SecretStr | None = Field(None, description="SASL password (never logged).")
    kafka_ssl_cafile: Path | None = Field(None, description="CA bundle for SSL/SASL_SSL.")
    kafka_ssl_certfile: Path | None = Field(None, description="Client certificate for mutual TLS.")
    kafka_ssl_keyfile: Path | None = Field(None, description="Private key of the client certificate.")
    kafka_consumer_group: str = Field("moderation", description="Consumer group, also the Faust app id.")
    kafka_rebalance_timeout_s: float = Field(60.0, gt=0, description="Consumer-group rebalance timeout.")
    kafka_session_timeout_s: float = Field(60.0, gt=0, description="Consumer-group session timeout.")
    kafka_heartbeat_interval_s: float = Field(3.0, gt=0, description="Consumer-group heartbeat interval.")
    kafka_max_poll_interval_s: float = Field(300.0, description="Keep above the worst batch time.")
    kafka_topic_partitions: int = Field(4, ge=1, description="Partitions for topics the worker declares.")
    kafka_fetch_max_wait_ms: int = Field(
        100, ge=1, description="Longest a fetch waits for new records (Tansu always waits it out: latency floor)."
    )

    # Topics
    topic_uploads: str = Field("moderation.uploads", description="Upload events in.")
    topic_verdicts: str = Field("moderation.verdicts", description="Every verdict out.")
    topic_flagged: str = Field("moderation.flagged", description="Verdicts whose action is flag.")
    topic_dlq: str = Field("moderation.dlq", description="Dead letters with reason and original bytes.")
    topic_cache: str = Field(
        "moderation.verdict-cache", description="Compacted verdict cache keyed by image sha256, shared by workers."
    )

    # S3
    s3_endpoint_url: str | None = Field(None, description="Unset for AWS itself.")
    s3_region: str = Field("us-east-1", description="S3 region.")
    s3_access_key_id: str | None = Field(None, description="Unset to use the standard AWS credential chain.")
    s3_secret_access_key: SecretStr | None = Field(None, description="With the key id; never logged.")
    s3_allowed_buckets: CommaList = Field((), description="Comma-separated; events naming any other are rejected.")
    s3_max_object_bytes: int = Field(25 * 1024 * 1024, ge=1, description="Objects above this are rejected.")
    s3_timeout_s: float = Field(10.0, gt=0, description="Connect and read timeout per S3 call.")

    # Images
    max_image_pixels: int = Field(50_000_000, ge=1, description="Checked from the header, before decoding.")
    image_formats: CommaList = Field(
        ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "HEIF", "AVIF"),
        description="Comma-separated Pillow format names parsed at all; any other is an unsupported_format dead "
        "letter. Names the installed Pillow cannot read (HEIF without the pillow-heif plugin) are left out.",
    )
    decode_threads: int = Field(
        2, ge=1, description="Threads that decode images: the worker's own pool, not asyncio's (sized by the node)."
    )
    decode_budget_mib: int = Field(
        768,
        ge=1,
        description="MiB of decoded pixels in flight across the decode threads; an image waits until its share fits "
        "(one larger than the whole budget decodes alone). Keep well below the pod's memory limit.",
    )

    # Detector
    detector: Literal["triton", "inprocess", "null"] = Field(
        "triton", description="triton (production), inprocess (transformers in the worker) or null (benchmarks)."
    )
    checkpoint: str | None = Field(None, description="FakeVLM weights for the inprocess detector (path or hub id).")
    device: str = Field("cpu", description="Torch device for the inprocess detector, e.g. cuda:0.")

    fast_preprocess: bool = Field(
        True,
        description="Reduced-scale JPEG decoding, libspng PNG decoding and torch's vectorised resize (JPEG within "
        "0.15 of CLIP's exact output, PNG within one 8-bit level; false: the exact path).",
    )

    # Triton
    triton_url: str = Field("127.0.0.1:8001", description="gRPC host:port.")
    triton_ssl: bool = Field(False, description="Talk TLS to Triton's gRPC endpoint.")
    triton_ssl_root_certificates: Path | None = Field(None, description="CA bundle for Triton TLS (default: system).")
    triton_ssl_private_key: Path | None = Field(None, description="Client key for mutual TLS with Triton.")
    triton_ssl_certificate_chain: Path | None = Field(None, description="Client certificate chain for mutual TLS.")
    triton_model: str = Field("fakevlm", description="Model name in Triton's repository.")
    triton_startup_timeout_s: float = Field(
        300.0, ge=0, description="How long a starting worker waits for the model to be ready."
    )
    triton_timeout_s: float = Field(120.0, gt=0, description="Deadline of one inference request.")

    # Policy
    label_threshold: float = Field(0.5, ge=0, le=1, description="P(fake) at or above this is labelled fake.")
    review_threshold: float = Field(0.5, ge=0, le=1, description="P(fake) at or above this goes to review.")
    flag_threshold: float = Field(0.8, ge=0, le=1, description="P(fake) at or above this is flagged.")
    explain_above: float = Field(
        0.5,
        ge=0,
        description="Generate an explanation when P(fake) is at or above this (0: always, >1: never).",
    )

    # Verdict cache
    cache_max_entries: int = Field(100_000, ge=0, description="Entries each worker keeps in memory (0: no cache).")
    cache_ttl_s: float = Field(7 * 86400.0, gt=0, description="Entries older than this are not served.")
    cache_trust_event_sha256: bool = Field(
        False, description="Look the event's own sha256 up before fetching (saves the S3 GET on a hit)."
    )
    cache_load_timeout_s: float = Field(
        60.0, ge=0, description="At start, read the cache topic to its end before consuming, for at most this long."
    )

    # Retries
    event_deadline_s: float = Field(
        600.0, gt=0, description="Transient faults (S3/Triton unavailable) are retried this long, then dead-lettered."
    )
    retry_backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between two retries (with jitter).")

    # Batching
    batch_size: int = Field(16, ge=1, description="Events taken from the stream per batch.")
    batch_wait_s: float = Field(0.2, gt=0, description="Longest wait to fill a batch.")
    max_inflight_batches: int = Field(
        4,
        ge=1,
        description="Batches moderated and published at once (acks stay in stream order); "
        "images in flight to the detector are at most this times the batch size.",
    )

    # Liveness and shutdown
    ack_stall_s: float = Field(
        300.0,
        gt=0,
        description="/live turns red when events are pending and no ack progressed for this long (the pod restarts).",
    )
    shutdown_grace_s: float = Field(
        25.0,
        gt=0,
        description="On SIGTERM, finish and ack the batches in flight for at most this long, then exit "
        "(what is left un-acked is re-delivered); keep below the pod's terminationGracePeriodSeconds.",
    )

    data_dir: Path = Field(
        Path(tempfile.gettempdir()) / "moderation", description="Faust's local state directory (writable)."
    )
    metrics_port: int = Field(8080, ge=0, le=65535, description="/metrics, /live and /ready (0: off).")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="Worker log level.")
    event_loop: Literal["uvloop", "asyncio"] = Field(
        "uvloop", description="The worker's event loop: uvloop (libuv; less CPU per message) or asyncio's own."
    )

    @field_validator("s3_allowed_buckets", "image_formats", mode="before")
    @classmethod
    def _split(cls, value: Any) -> Any:
        if isinstance(value, str):
            return tuple(part.strip() for part in value.split(",") if part.strip())
        return value

    @field_validator("image_formats")
    @classmethod
    def _upper(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        return tuple(name.upper() for name in value)

    @model_validator(mode="after")
    def _ordered(self) -> Settings:
        if self.review_threshold > self.flag_threshold:
            raise ValueError("review_threshold must not exceed flag_threshold")
        return self


def env_table() -> str:
    """Markdown table of every variable with its default and description."""
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = ", ".join(default) if isinstance(default, tuple) else default
        shown = "(unset)" if shown in (None, "") else f"`{shown}`"
        rows.append(f"| `MODERATION_{name.upper()}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)
