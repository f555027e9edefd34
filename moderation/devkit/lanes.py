"""Lanes: private slices of one local stack (fresh topics, consumer group and bucket), so that tests and
benchmarks share the servers and never each other's records. A lane starts `moderation worker` processes
on it, reads their /metrics, logs and committed offsets, and publishes uploads into it."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from aiokafka import AIOKafkaConsumer, TopicPartition
from prometheus_client.parser import text_string_to_metric_families

from moderation.adapters.kafka import aiokafka_options, reader
from moderation.client import Outcomes, event_message, publish, read_outcomes, upload_images
from moderation.devkit import localstack
from moderation.devkit.demo import put_objects, settings_for, start_worker
from moderation.devkit.samples import BadUpload, bad_uploads, write_samples
from moderation.events import UploadEvent
from moderation.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Lane:
    """A private slice of the stack: fresh topics, bucket and consumer group. `broker` is the stack whose
    Kafka it uses (another stack's, e.g. a durable broker's, or `info` itself)."""

    info: localstack.StackInfo
    settings: Settings
    env: dict[str, str]
    workdir: Path
    broker: localstack.StackInfo

    metrics_port: int = 0  # the last started worker's
    ports: dict[str, int] = field(default_factory=dict)  # every worker's, by name

    def worker(self, name: str = "worker", *, role: str = "worker", **env: str) -> subprocess.Popen[bytes]:
        """`moderation worker` (or `role`) in its own process, with /metrics, /live and /ready on a free port
        unless `env` or the lane sets MODERATION_METRICS_PORT (0: off); its log is `workdir`/`name`.log."""
        env = {"MODERATION_METRICS_PORT": self.env.get("MODERATION_METRICS_PORT") or str(free_port())} | env
        self.metrics_port = self.ports[name] = int(env["MODERATION_METRICS_PORT"])
        return start_worker(self.env | env, self.workdir / f"{name}.log", role)

    def explainer(self, name: str = "explainer", **env: str) -> subprocess.Popen[bytes]:
        """`moderation explainer` in its own process, as `worker` starts a worker."""
        return self.worker(name, role="explainer", **env)

    def scrape(self, path: str = "/metrics", name: str | None = None) -> tuple[int, str]:
        port = self.ports[name] if name else self.metrics_port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return int(response.status), response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()
        except OSError as exc:  # not listening (yet, or any more)
            return 0, str(exc)

    def pending(self, name: str | None = None) -> float:
        """The worker's events taken and not yet acked, from its /metrics (0 while it does not answer)."""
        return self.counter("moderation_events_pending", name)

    def counter(self, sample: str, name: str | None = None, **labels: str) -> float:
        """The sum of a metric's samples with these labels on a worker's /metrics (0 while it does not answer)."""
        status, text = self.scrape("/metrics", name)
        if status != 200:
            return 0.0
        families = text_string_to_metric_families(text)
        return sum(
            s.value for f in families for s in f.samples if s.name == sample and labels.items() <= s.labels.items()
        )

    def log(self, name: str = "worker") -> str:
        path = self.workdir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""


def open_lane(
    info: localstack.StackInfo,
    workdir: Path,
    *,
    broker: localstack.StackInfo | None = None,
    prefix: str = "",
    own_bucket: bool = True,
    **settings: str,
) -> Lane:
    """Create a lane's topics (on `broker`'s Kafka, `info`'s by default) and, with `own_bucket`, its bucket
    (else the worker reads the stack's bucket). `settings` (MODERATION_* names, lower case, without the
    prefix) go to every worker of the lane; its Faust data and worker logs live in `workdir`."""
    broker = broker or info
    suffix = uuid.uuid4().hex[:10]
    overrides = {
        "kafka_bootstrap_servers": broker.kafka_bootstrap,
        "topic_uploads": f"{prefix}uploads-{suffix}",
        "topic_verdicts": f"{prefix}verdicts-{suffix}",
        "topic_flagged": f"{prefix}flagged-{suffix}",
        "topic_dlq": f"{prefix}dlq-{suffix}",
        "topic_cache": f"{prefix}cache-{suffix}",
        "topic_review": f"{prefix}review-{suffix}",
        "topic_decisions": f"{prefix}decisions-{suffix}",
        "topic_bank": f"{prefix}bank-{suffix}",
        "topic_explain_requests": f"{prefix}explain-requests-{suffix}",
        "topic_explanations": f"{prefix}explanations-{suffix}",
        "kafka_consumer_group": f"{prefix}group-{suffix}",
        "data_dir": str(workdir / "faust"),
    }
    if own_bucket:
        overrides["s3_allowed_buckets"] = f"{prefix}bucket-{suffix}"
        localstack.create_bucket(info, overrides["s3_allowed_buckets"])
    overrides |= settings
    workdir.mkdir(parents=True, exist_ok=True)
    lane_settings = settings_for(info, **overrides)
    topics = [getattr(lane_settings, name) for name in overrides if name.startswith("topic_")]
    asyncio.run(
        localstack.create_topics(
            broker.kafka_bootstrap,
            topics,
            lane_settings.kafka_topic_partitions,
            compacted=[lane_settings.topic_cache, lane_settings.topic_bank],
        )
    )
    env = info.env() | {f"MODERATION_{k.upper()}": v for k, v in overrides.items()}
    return Lane(info, lane_settings, env, workdir, broker)


# What goes into a lane and what comes out of it.


@dataclass
class Published:
    events: list[UploadEvent]
    bad: list[BadUpload]
    ends: dict[int, int]  # partition -> offset after the last message, from the produce acks

    @property
    def expected(self) -> set[str]:
        return {e.event_id for e in self.events} | {c.event_id for c in self.bad if c.event_id}

    @property
    def anonymous(self) -> int:
        return sum(1 for c in self.bad if c.event_id is None)

    @property
    def count(self) -> int:
        return len(self.events) + len(self.bad)

    def add(self, more: Published) -> None:
        """Another wave into the same topic: its events, and the ends its acks reached."""
        self.events += more.events
        self.bad += more.bad
        for partition, end in more.ends.items():
            self.ends[partition] = max(end, self.ends.get(partition, 0))


def publish_uploads(
    settings: Settings,
    directory: Path,
    good: int,
    *,
    with_bad: bool = True,
    seed: int = 0,
    between: Callable[[], object] | None = None,
) -> Published:
    """Store `good` fresh images (and the bad cases' objects) in S3, then publish their events;
    `between` runs after the uploads and before the events are published (e.g. a fault)."""
    bucket = settings.s3_allowed_buckets[0]
    images = write_samples(directory, good, seed=seed)
    events = asyncio.run(upload_images(settings, images, bucket=bucket, tenant="t1"))
    bad = bad_uploads(bucket) if with_bad else []
    for case in bad:
        put_objects(settings, bucket, case.objects)
    if between is not None:
        between()
    acked = asyncio.run(publish(settings, [event_message(e) for e in events] + [c.message for c in bad]))
    # End offsets from the produce acks: Tansu 0.6's ListOffsets answers per record batch, not per record.
    ends = {p: 1 + max(m.offset for m in acked if m.partition == p) for p in {m.partition for m in acked}}
    return Published(events, bad, ends)


def outcomes_for(settings: Settings, published: Published, timeout_s: float = 420) -> Outcomes:
    return asyncio.run(
        read_outcomes(settings, published.expected, expected_anonymous=published.anonymous, timeout_s=timeout_s)
    )


async def raw_messages(settings: Settings, topic: str) -> list[bytes]:
    consumer = reader(settings, topic)
    await consumer.start()
    try:
        values: list[bytes] = []
        while batch := await consumer.getmany(timeout_ms=1500):
            values += [record.value for records in batch.values() for record in records]
        return values
    finally:
        await consumer.stop()


async def committed_offsets(
    settings: Settings, *, group: str | None = None, topic: str | None = None
) -> dict[int, int]:
    """A group's committed offsets (the worker's on the uploads topic by default), read without joining it."""
    topic = topic or settings.topic_uploads
    consumer = AIOKafkaConsumer(
        group_id=group or settings.kafka_consumer_group, enable_auto_commit=False, **aiokafka_options(settings)
    )
    await consumer.start()
    try:
        await consumer.topics()
        partitions = sorted(consumer.partitions_for_topic(topic) or ())
        committed = {p: await consumer.committed(TopicPartition(topic, p)) for p in partitions}
        return {p: offset for p, offset in committed.items() if offset is not None}
    finally:
        await consumer.stop()


def wait_for_commits(settings: Settings, ends: dict[int, int], timeout_s: float = 60.0) -> dict[int, int]:
    deadline = time.monotonic() + timeout_s
    while (committed := asyncio.run(committed_offsets(settings))) != ends and time.monotonic() < deadline:
        time.sleep(1.0)
    return committed
