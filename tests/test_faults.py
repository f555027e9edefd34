"""Fault injection on the real local stack: whatever fails around it, every upload ends in an outcome,
all outcomes of one event_id agree, and none is lost. Duplicates (at-least-once) are counted and printed."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from support import disagreements, duplicates, outcomes_for, publish_uploads, wait_for_commits

from moderation import localstack
from moderation.client import Outcomes
from moderation.demo import stop_worker

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Supervisor:
    """Keeps one worker process running, as Kubernetes would restart a crashed pod."""

    def __init__(self, lane) -> None:  # type: ignore[no-untyped-def]
        self.lane, self.starts = lane, 0
        self.process = self._start()

    def _start(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        return self.lane.worker(f"worker-{self.starts}", MODERATION_EVENT_DEADLINE_S="300")

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = self._start()

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes stops a pod: the worker hands its in-flight batch back uncommitted."""
        assert stop_worker(self.process) == 0, self.lane.log(f"worker-{self.starts}")[-2000:]
        self.process = self._start()

    def keep_alive(self) -> None:
        if self.process.poll() is not None:
            self.process = self._start()

    def stop(self) -> None:
        stop_worker(self.process)


def wait_until_some_outcomes(lane, published, supervisor: Supervisor, count: int = 5) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 180
    while len(outcomes_for(lane.settings, published, timeout_s=1).decided()) < count:
        supervisor.keep_alive()
        assert time.monotonic() < deadline, lane.log("worker-1")[-3000:]


def run_with_fault(lane, tmp_path: Path, fault: Callable[[Supervisor], None], good: int = 30) -> Outcomes:  # type: ignore[no-untyped-def]
    published = publish_uploads(lane.settings, tmp_path / "images", good)
    supervisor = Supervisor(lane)
    try:
        wait_until_some_outcomes(lane, published, supervisor)
        fault(supervisor)
        deadline = time.monotonic() + 420
        while not published.expected <= (outcomes := outcomes_for(lane.settings, published, timeout_s=5)).decided():
            supervisor.keep_alive()
            assert time.monotonic() < deadline, f"lost: {published.expected - outcomes.decided()}"
        committed = wait_for_commits(lane.settings, published.ends)
    finally:
        supervisor.stop()
    assert not disagreements(outcomes), disagreements(outcomes)
    good_ids = {e.event_id for e in published.events}
    assert good_ids <= set(outcomes.verdicts), "no good upload was dead-lettered by the fault"
    assert committed == published.ends
    print(f"\n{len(published.expected)} events, {duplicates(outcomes)} duplicates, {supervisor.starts} worker starts")
    return outcomes


def test_triton_killed_mid_stream_and_restarted(lane, tmp_path: Path) -> None:
    def fault(_: Supervisor) -> None:
        assert localstack.stop_server(lane.info.run_dir, "triton")
        time.sleep(5)  # the worker backs off and takes no new events meanwhile
        localstack.start_server(lane.info.run_dir, "triton")

    run_with_fault(lane, tmp_path, fault)


def test_worker_sigkilled_mid_batch_and_restarted(lane, tmp_path: Path) -> None:
    run_with_fault(lane, tmp_path, lambda supervisor: supervisor.kill())


def test_worker_sigterm_mid_stream_loses_nothing(lane, tmp_path: Path) -> None:
    run_with_fault(lane, tmp_path, lambda supervisor: supervisor.terminate())


def test_s3_stopped_briefly(lane, tmp_path: Path) -> None:
    def fault(_: Supervisor) -> None:
        assert localstack.stop_server(lane.info.run_dir, "s3")
        time.sleep(5)
        localstack.start_server(lane.info.run_dir, "s3")

    run_with_fault(lane, tmp_path, fault)


@pytest.fixture(scope="session")
def durable_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[localstack.StackInfo]:
    run_dir = tmp_path_factory.mktemp("durable") / "stack"
    info = localstack.up(run_dir, with_triton=False, durable_kafka=True)
    try:
        yield info
    finally:
        localstack.down(run_dir)


def test_broker_restarted_with_durable_storage(lane, durable_broker, tmp_path: Path) -> None:
    """Tansu keeps its log in S3 here, so topics, messages and committed offsets survive the restart."""
    import asyncio

    from moderation.demo import settings_for

    s = lane.settings
    lane.env["MODERATION_KAFKA_BOOTSTRAP_SERVERS"] = durable_broker.kafka_bootstrap
    lane.settings = settings_for(
        lane.info, **{**_overrides(s), "kafka_bootstrap_servers": durable_broker.kafka_bootstrap}
    )
    topics = [s.topic_uploads, s.topic_verdicts, s.topic_flagged, s.topic_dlq]
    asyncio.run(localstack.create_topics(durable_broker.kafka_bootstrap, topics, s.kafka_topic_partitions))

    def fault(_: Supervisor) -> None:
        assert localstack.stop_server(durable_broker.run_dir, "kafka")
        time.sleep(3)
        localstack.start_server(durable_broker.run_dir, "kafka")

    run_with_fault(lane, tmp_path, fault)


def _overrides(s) -> dict[str, str]:  # type: ignore[no-untyped-def]
    return {
        "topic_uploads": s.topic_uploads,
        "topic_verdicts": s.topic_verdicts,
        "topic_flagged": s.topic_flagged,
        "topic_dlq": s.topic_dlq,
        "kafka_consumer_group": s.kafka_consumer_group,
        "s3_allowed_buckets": ",".join(s.s3_allowed_buckets),
        "data_dir": str(s.data_dir),
    }
