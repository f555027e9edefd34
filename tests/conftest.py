"""One real local stack (Tansu, SeaweedFS, Triton with the tiny FakeVLM) per test session; every test
gets its own topics, bucket and consumer group."""

from __future__ import annotations

import asyncio
import os
import socket
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from moderation.devkit import localstack
from moderation.devkit.demo import settings_for, start_worker, stop_worker
from moderation.settings import Settings


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.StackInfo]:
    home = tmp_path_factory.mktemp("moderation")
    repository = localstack.model_repository_for(home, None)
    info = localstack.up(home / "stack", model_repository=repository)
    try:
        yield info
    finally:
        localstack.down(home / "stack")


@dataclass
class Lane:
    """A private slice of the stack: fresh topics, bucket and consumer group."""

    info: localstack.StackInfo
    settings: Settings
    env: dict[str, str]
    workdir: Path

    metrics_port: int = 0  # the last started worker's
    ports: dict[str, int] = field(default_factory=dict)  # every worker's, by name

    def worker(self, name: str = "worker", **env: str):  # type: ignore[no-untyped-def]
        """`moderation worker` in its own process, with /metrics, /live and /ready on a free port."""
        self.metrics_port = self.ports[name] = free_port()
        env = {"MODERATION_METRICS_PORT": str(self.metrics_port)} | env
        return start_worker(self.env | env, self.workdir / f"{name}.log")

    def scrape(self, path: str = "/metrics", name: str | None = None) -> tuple[int, str]:
        port = self.ports[name] if name else self.metrics_port
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return response.status, response.read().decode()
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


@pytest.fixture
def lane(stack: localstack.StackInfo, tmp_path: Path) -> Lane:
    suffix = uuid.uuid4().hex[:10]
    overrides = {
        "topic_uploads": f"uploads-{suffix}",
        "topic_verdicts": f"verdicts-{suffix}",
        "topic_flagged": f"flagged-{suffix}",
        "topic_dlq": f"dlq-{suffix}",
        "topic_cache": f"cache-{suffix}",
        "kafka_consumer_group": f"group-{suffix}",
        "s3_allowed_buckets": f"bucket-{suffix}",
        "data_dir": str(tmp_path / "faust"),
    }
    settings = settings_for(stack, **overrides)
    topics = [
        settings.topic_uploads,
        settings.topic_verdicts,
        settings.topic_flagged,
        settings.topic_dlq,
        settings.topic_cache,
    ]
    asyncio.run(
        localstack.create_topics(
            stack.kafka_bootstrap, topics, settings.kafka_topic_partitions, compacted=[settings.topic_cache]
        )
    )
    localstack.create_bucket(stack, f"bucket-{suffix}")
    env = stack.env() | {f"MODERATION_{k.upper()}": v for k, v in overrides.items()}
    return Lane(stack, settings, env, tmp_path)


@pytest.fixture
def running_worker(lane: Lane) -> Iterator[Lane]:
    process = lane.worker()
    try:
        yield lane
    finally:
        code = stop_worker(process)
        if code not in (0, -15, None) and os.environ.get("CI"):
            print(lane.log())
