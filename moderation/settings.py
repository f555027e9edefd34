"""Every setting of the worker and the CLI, read once from `MODERATION_*` environment variables.

The README's configuration table is generated from this class (`moderation settings --markdown`)
and a test keeps the two in step.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, SecretStr, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

CommaList = Annotated[tuple[str, ...], NoDecode]
ENV_PREFIX = "MODERATION_"

# What bounds the worst batch time (`Settings.worst_batch_s`), from the code and the clients it uses;
# tests/test_settings.py checks each against its source.
S3_TRIES, S3_BACKOFF_S = 4, 7.0  # moderation/adapters/s3.py: botocore's standard mode, 3 retries <= 1, 2, 4 s apart
FAUST_REQUEST_TIMEOUT_S = 90.0  # Faust's broker_request_timeout: it refuses a longer session timeout


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=None, extra="ignore", frozen=True)

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
    kafka_rebalance_timeout_s: float = Field(
        1200.0,
        gt=0,
        description="Consumer-group rebalance timeout; above the worst batch time (README: Timeouts), as a "
        "member finishes its batches before it rejoins.",
    )
    kafka_session_timeout_s: float = Field(
        60.0, gt=0, description="Consumer-group session timeout (at most 90 s, Faust's request timeout)."
    )
    kafka_heartbeat_interval_s: float = Field(
        3.0, gt=0, description="Consumer-group heartbeat interval (at most a third of the session timeout)."
    )
    kafka_max_poll_interval_s: float = Field(
        1200.0,
        gt=0,
        description="Above the worst batch time (README: Timeouts): a consumer that fetched nothing this long "
        "leaves the group.",
    )
    kafka_accept_rebalance_overlap: bool = Field(
        False,
        description="Accept a rebalance timeout at or below the worst batch time: a worker still finishing a batch "
        "may lose its partitions and another redo them (duplicates, never loss). Only for brokers such as Tansu, "
        "which hold every JoinGroup for the whole rebalance timeout (the local stack sets it).",
    )
    kafka_topic_partitions: int = Field(4, ge=1, description="Partitions for topics the worker declares.")
    kafka_fetch_max_wait_ms: int = Field(
        100, ge=1, description="Longest a fetch waits for new records (Tansu always waits it out: latency floor)."
    )
    kafka_replication_factor: int = Field(
        1, ge=1, description="Replication factor of the topics the worker or `moderation dev up` creates (prod: 3)."
    )
    kafka_min_insync_replicas: int = Field(
        1,
        ge=1,
        description="min.insync.replicas of those topics: with acks=all a write needs this many replicas (prod: 2).",
    )
    kafka_declare_topics: bool = Field(
        True,
        description="The worker creates missing topics at start; false where they are provisioned (the topics Job "
        "or Strimzi) and the worker's principal may not create topics.",
    )

    # Topics
    topic_uploads: str = Field("moderation.uploads", description="Upload events in.")
    topic_verdicts: str = Field("moderation.verdicts", description="Every verdict out.")
    topic_flagged: str = Field("moderation.flagged", description="Verdicts whose action is flag.")
    topic_dlq: str = Field("moderation.dlq", description="Dead letters with reason and original bytes.")
    topic_review: str = Field(
        "moderation.review", description="Verdicts whose action is review or flag: the reviewers' queue."
    )
    topic_decisions: str = Field(
        "moderation.decisions", description="Reviewer decisions (confirm, overturn, escalate)."
    )
    topic_bank: str = Field(
        "moderation.hash-bank", description="Known images by PDQ hash (compacted): what near-duplicates are matched to."
    )
    topic_cache: str = Field(
        "moderation.verdict-cache", description="Compacted verdict cache keyed by image sha256, shared by workers."
    )
    topic_explain_requests: str = Field(
        "moderation.explain-requests",
        description="Verdicts to explain, published with them by the worker; the explainer's work queue.",
    )
    topic_explanations: str = Field(
        "moderation.explanations", description="FakeVLM's explanations, keyed by event_id, after their verdicts."
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
    max_frames: int = Field(
        16,
        ge=1,
        le=256,
        description="Frames of an animated or multi-page image judged at most, whatever a tenant's policy asks "
        "(its `frames`, 8 by default): each is one more verdict pass. 1: the first frame only.",
    )
    max_frame_decodes: int = Field(
        128,
        ge=1,
        description="Frames of one image decoded at most to reach the frames judged: a GIF, APNG or WebP frame "
        "is decoded after every frame before it, so those formats are judged within their first this many "
        "frames. Decoded frames count against MODERATION_MAX_IMAGE_PIXELS too.",
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
        False,
        description="Reduced-scale JPEG decoding, libspng PNG decoding and torch's vectorised resize: 1.8x faster "
        "preprocessing, but it moves the trained tiny model's P(fake) by up to 0.30 (mean 0.003, no label flip "
        "in 300 images; bench/preprocess_drift.py), over the 0.01 a forensic score may drift; false: CLIP's "
        "exact path.",
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
    triton_explain_model: str = Field(
        "fakevlm_explain", description="The explanation model in Triton's repository (its own queue and batching)."
    )
    triton_explain_timeout_s: float = Field(300.0, gt=0, description="Deadline of one explanation request.")

    # Policy
    label_threshold: float = Field(0.5, ge=0, le=1, description="P(fake) at or above this is labelled fake.")
    review_threshold: float = Field(0.5, ge=0, le=1, description="P(fake) at or above this goes to review.")
    flag_threshold: float = Field(0.8, ge=0, le=1, description="P(fake) at or above this is flagged.")
    explain_above: float = Field(
        0.5,
        ge=0,
        description="Generate an explanation when P(fake) is at or above this (0: always, >1: never).",
    )
    policy_file: Path | None = Field(
        None,
        description="Per-tenant policy YAML (README: Per-tenant policy); unset: the thresholds above for every "
        "tenant, policy version `settings`.",
    )
    policy_reload_s: float = Field(
        10.0,
        gt=0,
        description="How often the worker re-reads MODERATION_POLICY_FILE; an edit that validates is in force "
        "without a restart, one that does not is refused and counted.",
    )
    c2pa_trust_anchors: Path | None = Field(
        None,
        description="PEM file of C2PA trust anchors: the C2PA conformance trust list (C2PA-TRUST-LIST.pem) or your "
        "own CAs. A manifest whose signer chains to one reads Trusted; unset, a valid one reads Valid at best. "
        "Read at start; a file without a certificate stops the worker.",
    )

    # Verdict cache
    cache_max_entries: int = Field(100_000, ge=0, description="Entries each worker keeps in memory (0: no cache).")
    cache_ttl_s: float = Field(7 * 86400.0, gt=0, description="Entries older than this are not served.")
    cache_trust_event_sha256: bool = Field(
        False,
        description="Serve a cache hit on the sha256 the EVENT claims, before fetching: skips the bucket allowlist "
        "and never reads the bytes, so whoever can publish an upload event chooses the verdict it gets.",
    )
    cache_clock_skew_s: float = Field(
        60.0, ge=0, description="Cache entries dated more than this in the future are refused (clock skew allowance)."
    )
    cache_load_timeout_s: float = Field(
        60.0, ge=0, description="At start, read the cache topic to its end before consuming, for at most this long."
    )
    bank_load_timeout_s: float = Field(
        60.0, ge=0, description="At start, read the hash-bank topic to its end before consuming, for at most this long."
    )

    # Retries
    event_deadline_s: float = Field(
        300.0, gt=0, description="Transient faults (S3/Triton unavailable) are retried this long, then dead-lettered."
    )
    retry_backoff_max_s: float = Field(30.0, gt=0, description="Longest wait between two retries (with jitter).")

    # Batching
    batch_size: int = Field(16, ge=1, description="Events taken from the stream per batch.")
    batch_wait_s: float = Field(0.2, gt=0, description="Longest wait to fill a batch.")
    max_inflight_batches: int = Field(
        4,
        ge=1,
        description="Batches moderated at once (fetched, decoded, judged); up to twice as many are taken while "
        "the earlier ones wait for the broker to acknowledge their outcomes. Acks stay in stream order; images "
        "in flight to the detector are at most this times the batch size.",
    )

    # Explainer (`moderation explainer`)
    explain_batch_size: int = Field(
        8,
        ge=1,
        description="Explain requests an explainer takes at once (each its own Triton request, merged by the explain "
        "model's dynamic batcher); their offsets are committed once their explanations are acknowledged.",
    )
    explain_deadline_s: float = Field(
        600.0,
        gt=0,
        description="Transient faults of an explanation (S3 or the explain model unavailable) are retried this "
        "long, then it is an explanation_failed dead letter (its verdict stands).",
    )

    publish_timeout_s: float = Field(
        30.0,
        gt=0,
        description="The broker must acknowledge a batch's outcomes within this, retries included; "
        "else the worker exits (crash-only) and the group re-delivers the batch.",
    )

    # Liveness and shutdown
    ack_stall_s: float = Field(
        900.0,
        gt=0,
        description="/live turns red when events are pending and no ack progressed for this long (the pod restarts); "
        "keep it above the worst batch time (README: Timeouts), or a worker that waits out an outage restarts.",
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

    # Review console
    review_identity_header: str | None = Field(
        None,
        description="Request header a trusted proxy sets to the signed-in reviewer (e.g. X-Forwarded-User); "
        "honoured only when set, so the proxy must drop it from what clients send.",
    )
    review_tokens: SecretStr | None = Field(
        None,
        description="Comma-separated reviewer:token pairs (tokens of 16+ characters): a bearer token, or typed "
        "once into the console's login form; never logged.",
    )
    review_session_secret: SecretStr | None = Field(
        None,
        description="Key of the console's session cookies and CSRF tokens; unset: a random one per process "
        "(sessions end on restart; set one shared key when several replicas serve one host name).",
    )
    review_max_items: int = Field(
        100_000, ge=1, description="Review verdicts the console keeps in memory; the oldest read are dropped first."
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
            raise ValueError(f"{env_name('review_threshold')} must not exceed {env_name('flag_threshold')}")
        if self.kafka_min_insync_replicas > self.kafka_replication_factor:
            raise ValueError(
                f"{env_name('kafka_min_insync_replicas')} must not exceed {env_name('kafka_replication_factor')}"
            )
        return self

    @property
    def worst_batch_s(self) -> float:
        """The longest one batch can stay un-acked while its worker lives: transient retries until the event
        deadline, one more backoff and try (S3 with botocore's retries, then Triton), then the publisher's
        whole window (MODERATION_PUBLISH_TIMEOUT_S, a hard limit: past it the worker exits). With
        MODERATION_MAX_INFLIGHT_BATCHES out, the agent waits that long for a slot
        and Faust fetches nothing meanwhile (its buffer is full)."""
        one_try = S3_TRIES * 2 * self.s3_timeout_s + S3_BACKOFF_S + self.triton_timeout_s
        return self.event_deadline_s + self.retry_backoff_max_s + one_try + self.publish_timeout_s

    @property
    def worst_explain_batch_s(self) -> float:
        """The longest an explainer's batch stays uncommitted while it lives (as `worst_batch_s`, with the
        explanation's deadlines); its consumer fetches nothing meanwhile."""
        one_try = S3_TRIES * 2 * self.s3_timeout_s + S3_BACKOFF_S + self.triton_explain_timeout_s
        return self.explain_deadline_s + self.retry_backoff_max_s + one_try + self.publish_timeout_s

    @model_validator(mode="after")
    def _timeouts_agree(self) -> Settings:
        """Refuse timeouts that let the group hand a worker's partitions to another worker while the first
        still works on (and publishes for) their events: the second would redo them."""
        worst = (
            f"the worst batch time ({self.worst_batch_s:.0f} s = MODERATION_EVENT_DEADLINE_S + "
            f"MODERATION_RETRY_BACKOFF_MAX_S + one try: {S3_TRIES} x 2 x MODERATION_S3_TIMEOUT_S + {S3_BACKOFF_S:.0f} "
            f"+ MODERATION_TRITON_TIMEOUT_S, + MODERATION_PUBLISH_TIMEOUT_S)"
        )
        problems = []
        if self.kafka_max_poll_interval_s <= self.worst_batch_s:
            problems.append(
                f"MODERATION_KAFKA_MAX_POLL_INTERVAL_S ({self.kafka_max_poll_interval_s:g} s) must exceed {worst}: "
                "Faust fetches nothing while the agent waits on a batch, and aiokafka leaves the group once it has "
                "fetched nothing for that long"
            )
            worst = "the worst batch time"
        if self.kafka_rebalance_timeout_s <= self.worst_batch_s and not self.kafka_accept_rebalance_overlap:
            problems.append(
                f"MODERATION_KAFKA_REBALANCE_TIMEOUT_S ({self.kafka_rebalance_timeout_s:g} s) must exceed {worst}: "
                "in a rebalance Faust finishes and acks the batches in flight before it rejoins, and the group "
                "drops a member that has not rejoined by then (MODERATION_KAFKA_ACCEPT_REBALANCE_OVERLAP=true "
                "accepts the duplicates, for Tansu)"
            )
        if self.kafka_max_poll_interval_s <= self.worst_explain_batch_s:
            problems.append(
                f"MODERATION_KAFKA_MAX_POLL_INTERVAL_S ({self.kafka_max_poll_interval_s:g} s) must exceed the "
                f"explainer's worst batch time ({self.worst_explain_batch_s:.0f} s = MODERATION_EXPLAIN_DEADLINE_S + "
                "MODERATION_RETRY_BACKOFF_MAX_S + one try with MODERATION_TRITON_EXPLAIN_TIMEOUT_S + "
                "MODERATION_PUBLISH_TIMEOUT_S): its consumer fetches nothing while it explains a batch"
            )
        drain_limits = [("MODERATION_KAFKA_MAX_POLL_INTERVAL_S", self.kafka_max_poll_interval_s)]
        if not self.kafka_accept_rebalance_overlap:
            drain_limits.append(("MODERATION_KAFKA_REBALANCE_TIMEOUT_S", self.kafka_rebalance_timeout_s))
        problems += [
            f"MODERATION_SHUTDOWN_GRACE_S ({self.shutdown_grace_s:g} s) must be below {name} ({limit:g} s): the "
            "worker drains on SIGTERM with its fetcher stopped, and must not be dropped from the group meanwhile"
            for name, limit in drain_limits
            if self.shutdown_grace_s >= limit
        ]
        if self.kafka_session_timeout_s > FAUST_REQUEST_TIMEOUT_S:
            problems.append(
                f"MODERATION_KAFKA_SESSION_TIMEOUT_S ({self.kafka_session_timeout_s:g} s) must not exceed "
                f"{FAUST_REQUEST_TIMEOUT_S:g} s, Faust's broker_request_timeout (Faust refuses to start)"
            )
        if 3 * self.kafka_heartbeat_interval_s > self.kafka_session_timeout_s:
            problems.append(
                f"MODERATION_KAFKA_HEARTBEAT_INTERVAL_S ({self.kafka_heartbeat_interval_s:g} s) must be at most a "
                f"third of MODERATION_KAFKA_SESSION_TIMEOUT_S ({self.kafka_session_timeout_s:g} s), so that a "
                "lost heartbeat or two does not drop a live worker"
            )
        if problems:
            raise ValueError("timeouts that disagree (README: Timeouts): " + "; ".join(problems))
        return self


def env_name(field: str) -> str:
    """The environment variable that sets a field."""
    return f"{ENV_PREFIX}{field.upper()}"


def invalid_settings(exc: ValidationError) -> str:
    """One line naming each variable at fault and why, never its value (it may be a secret)."""
    problems = []
    for problem in exc.errors():
        why = problem["msg"].removeprefix("Value error, ")  # a validator's own message names its variables
        problems.append(f"{env_name(str(problem['loc'][0]))}: {why}" if problem["loc"] else why)
    return "invalid settings: " + "; ".join(problems)


def env_table() -> str:
    """Markdown table of every variable with its default and description."""
    rows = ["| Variable | Default | Description |", "| --- | --- | --- |"]
    for name, field in Settings.model_fields.items():
        default = field.default
        shown = ", ".join(default) if isinstance(default, tuple) else default
        shown = "(unset)" if shown in (None, "") else f"`{shown}`"
        rows.append(f"| `{env_name(name)}` | {shown} | {field.description or ''} |")
    return "\n".join(rows)
