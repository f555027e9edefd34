"""Fault injection on the real local stack: whatever fails around it, every upload ends in an outcome,
all outcomes of one event_id agree, and none is lost. Duplicates (at-least-once) are counted and printed."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from moderation.client import Outcomes
from moderation.devkit import localstack
from moderation.devkit.demo import stop_worker
from moderation.devkit.lanes import outcomes_for, publish_uploads, wait_for_commits
from moderation.events import DeadLetter, Verdict
from moderation.worker.crashonly import EXIT_CRASHED, SHUTDOWN_MARGIN_S

pytestmark = [pytest.mark.integration, pytest.mark.slow]


class Supervisor:
    """Keeps one worker process running, as Kubernetes would restart a crashed pod."""

    def __init__(self, lane, **env: str) -> None:  # type: ignore[no-untyped-def]
        self.lane, self.env, self.starts, self.exits = lane, env, 0, []  # type: list[int]
        self.process = self._start()

    @property
    def name(self) -> str:
        return f"worker-{self.starts}"

    def _start(self) -> subprocess.Popen[bytes]:
        self.starts += 1
        return self.lane.worker(self.name, **({"MODERATION_EVENT_DEADLINE_S": "300"} | self.env))

    def kill(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait()
        self.process = self._start()

    def terminate(self) -> None:
        """SIGTERM, as Kubernetes stops a pod: the worker hands its in-flight batch back uncommitted."""
        assert stop_worker(self.process) == 0, self.lane.log(self.name)[-2000:]
        self.process = self._start()

    def keep_alive(self) -> None:
        if (code := self.process.poll()) is not None:
            self.exits.append(code)
            self.process = self._start()

    def stop(self) -> None:
        stop_worker(self.process)


def wait_until_some_outcomes(lane, published, supervisor: Supervisor, count: int = 5) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + 180
    while len(outcomes_for(lane.settings, published, timeout_s=1).decided()) < count:
        supervisor.keep_alive()
        assert time.monotonic() < deadline, lane.log("worker-1")[-3000:]


def events_in_flight(lane, name: str, more: More, waves: int = 10) -> float:  # type: ignore[no-untyped-def]
    """Events the worker has taken and not acked, from its own counters: the fault must hit some. The tiny
    model is quick, so fresh waves of uploads are published until the worker is caught with some."""
    for _ in range(waves):
        more(6)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if pending := lane.pending(name):
                return pending
            time.sleep(0.02)
    return 0.0


More = Callable[..., None]  # more(n, between=None): n fresh uploads into the stream
Fault = Callable[[Supervisor, More], None]


def run_with_fault(lane, tmp_path: Path, fault: Fault, good: int = 30, **env: str) -> Outcomes:  # type: ignore[no-untyped-def]
    """Uploads through a supervised worker; `fault(supervisor, more)` hits it once events are in flight
    (`more(n)` publishes n fresh uploads into the stream while the fault holds)."""
    published = publish_uploads(lane.settings, tmp_path / "images", good)
    waves = iter(range(1, 100))

    def more(count: int, between: Callable[[], object] | None = None) -> None:
        wave = next(waves)
        directory, seed = tmp_path / f"images-{wave}", 1000 * wave  # fresh bytes: no verdict-cache hits
        published.add(publish_uploads(lane.settings, directory, count, with_bad=False, seed=seed, between=between))

    supervisor = Supervisor(lane, **env)
    try:
        wait_until_some_outcomes(lane, published, supervisor)
        in_flight = events_in_flight(lane, supervisor.name, more)
        assert in_flight > 0, "the fault must hit events in flight"
        fault(supervisor, more)
        deadline = time.monotonic() + 420
        while not published.expected <= (outcomes := outcomes_for(lane.settings, published, timeout_s=5)).decided():
            supervisor.keep_alive()
            assert time.monotonic() < deadline, f"lost: {published.expected - outcomes.decided()}"
        committed = wait_for_commits(lane.settings, published.ends)
    finally:
        supervisor.stop()
    check_nothing_lost(published, outcomes, committed)
    print(
        f"\n{len(published.expected)} events, {in_flight:.0f} in flight at the fault, "
        f"{duplicates(outcomes)} duplicates, {supervisor.starts} worker starts"
    )
    return outcomes


def wait_for_retries(lane, name: str, reason: str, timeout_s: float = 120) -> float:  # type: ignore[no-untyped-def]
    """The worker's own count of events that met the fault and were retried (its /metrics)."""
    deadline = time.monotonic() + timeout_s
    while (retried := lane.counter("moderation_retries_total", name, reason=reason)) == 0:
        assert time.monotonic() < deadline, f"no event met the fault\n{lane.log(name)[-2000:]}"
        time.sleep(0.2)
    return retried


def disagreements(outcomes: Outcomes) -> dict[str, list[str]]:
    """event_ids whose outcomes (after de-duplication by event_id) do not all say the same thing."""
    seen: dict[str, set[str]] = {}
    for event_id, verdicts in outcomes.verdicts.items():
        seen.setdefault(event_id, set()).update(_gist(v) for v in verdicts)
    for letter_id, letters in outcomes.dead_letters.items():
        if letter_id is not None:
            seen.setdefault(letter_id, set()).update(_gist(d) for d in letters)
    return {k: sorted(v) for k, v in seen.items() if len(v) > 1}


def duplicates(outcomes: Outcomes) -> int:
    counts = Counter({k: len(v) for k, v in outcomes.verdicts.items()})
    counts.update({k: len(v) for k, v in outcomes.dead_letters.items() if k is not None})
    return sum(n - 1 for n in counts.values())


def _gist(outcome: Verdict | DeadLetter) -> str:
    if isinstance(outcome, DeadLetter):
        return f"dead letter {outcome.reason}"
    return f"{outcome.label} {outcome.score:.4f} {outcome.action}"


def check_nothing_lost(published, outcomes: Outcomes, committed: dict[int, int]) -> None:  # type: ignore[no-untyped-def]
    assert not disagreements(outcomes), disagreements(outcomes)
    good_ids = {e.event_id for e in published.events}
    assert good_ids <= set(outcomes.verdicts), "no good upload was dead-lettered by the fault"
    assert committed == published.ends


def test_triton_killed_mid_stream_and_restarted(lane, tmp_path: Path) -> None:
    def fault(supervisor: Supervisor, more: More) -> None:
        assert localstack.stop_server(lane.info.run_dir, "triton")
        more(8)
        assert wait_for_retries(lane, supervisor.name, "inference_unavailable") > 0  # the worker backs off
        localstack.start_server(lane.info.run_dir, "triton")

    run_with_fault(lane, tmp_path, fault)


def test_worker_sigkilled_mid_batch_and_restarted(lane, tmp_path: Path) -> None:
    run_with_fault(lane, tmp_path, lambda supervisor, _: supervisor.kill())


def test_worker_sigterm_mid_stream_loses_nothing(lane, tmp_path: Path) -> None:
    run_with_fault(lane, tmp_path, lambda supervisor, _: supervisor.terminate())


def test_s3_stopped_briefly(lane, tmp_path: Path) -> None:
    def fault(supervisor: Supervisor, more: More) -> None:
        more(8, between=lambda: localstack.stop_server(lane.info.run_dir, "s3"))  # stored, then S3 goes away
        assert wait_for_retries(lane, supervisor.name, "storage_unavailable") > 0
        localstack.start_server(lane.info.run_dir, "s3")

    run_with_fault(lane, tmp_path, fault)


def test_broker_restarted_with_durable_storage(durable_lane, tmp_path: Path) -> None:
    def fault(_: Supervisor, __: More) -> None:
        assert localstack.stop_server(durable_lane.broker.run_dir, "kafka")
        time.sleep(3)
        localstack.start_server(durable_lane.broker.run_dir, "kafka")

    run_with_fault(durable_lane, tmp_path, fault)


def test_broker_away_longer_than_the_publish_window_ends_the_worker_and_a_restart_loses_nothing(
    durable_lane, tmp_path: Path
) -> None:
    """Crash-only: outcomes the broker would not take end the process (non-zero), never an agent restarted
    in-process on the same stream; the restarted worker redoes everything after the committed offset."""

    def fault(supervisor: Supervisor, more: More) -> None:
        # Events held in flight first (Triton away: they wait in their retries), so that the broker is gone
        # when their outcomes are published.
        triton = durable_lane.info.run_dir
        assert localstack.stop_server(triton, "triton")
        more(6)
        assert wait_for_retries(durable_lane, supervisor.name, "inference_unavailable") > 0
        assert localstack.stop_server(durable_lane.broker.run_dir, "kafka")
        localstack.start_server(triton, "triton")
        try:
            code = supervisor.process.wait(timeout=180)
        finally:
            localstack.start_server(durable_lane.broker.run_dir, "kafka")
        log = durable_lane.log(supervisor.name)
        assert code == EXIT_CRASHED, (code, log[-3000:])
        assert "worker crashed: outcomes not published" in log, log[-3000:]

    run_with_fault(durable_lane, tmp_path, fault, good=40, MODERATION_PUBLISH_TIMEOUT_S="5", MODERATION_BATCH_SIZE="4")


def test_two_workers_one_sigkilled_mid_stream_the_other_takes_over(lane, tmp_path: Path) -> None:
    """A rebalance: the killed worker's partitions move to the survivor, which redoes its un-acked events."""
    published = publish_uploads(lane.settings, tmp_path / "images", 40)
    env = {"MODERATION_EVENT_DEADLINE_S": "300", "MODERATION_BATCH_SIZE": "4"}
    workers = {name: lane.worker(name, **env) for name in ("worker-a", "worker-b")}
    try:
        wait_until_both_took_events(lane)
        victim, in_flight = caught_with_events_in_flight(lane, published, tmp_path)
        os.killpg(workers[victim].pid, signal.SIGKILL)
        workers[victim].wait()
        [survivor] = set(workers) - {victim}
        deadline = time.monotonic() + 420
        while not published.expected <= (outcomes := outcomes_for(lane.settings, published, timeout_s=5)).decided():
            assert workers[survivor].poll() is None, lane.log(survivor)[-3000:]
            assert time.monotonic() < deadline, f"lost: {published.expected - outcomes.decided()}"
        committed = wait_for_commits(lane.settings, published.ends)
    finally:
        for process in workers.values():
            stop_worker(process)
    check_nothing_lost(published, outcomes, committed)
    print(
        f"\n{len(published.expected)} events, {in_flight:.0f} in flight at the kill, {duplicates(outcomes)} duplicates"
    )


def wait_until_both_took_events(lane, timeout_s: float = 180) -> None:  # type: ignore[no-untyped-def]
    """Until each worker has taken events (each got partitions in the group), from their counters."""
    deadline = time.monotonic() + timeout_s
    while not all(lane.counter("moderation_events_in_total", name) for name in ("worker-a", "worker-b")):
        assert time.monotonic() < deadline, lane.log("worker-a")[-2000:] + lane.log("worker-b")[-2000:]
        time.sleep(0.2)


def caught_with_events_in_flight(lane, published, tmp_path: Path) -> tuple[str, float]:  # type: ignore[no-untyped-def]
    """A worker with events taken and not acked: fresh waves of uploads until one is caught so."""
    for wave in range(1, 11):
        more = publish_uploads(lane.settings, tmp_path / f"more-{wave}", 8, with_bad=False, seed=1000 * wave)
        published.add(more)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            for name in ("worker-a", "worker-b"):
                if pending := lane.pending(name):
                    return name, pending
            time.sleep(0.02)
    raise AssertionError("no worker was ever caught with events in flight")


def test_a_stuck_worker_is_not_live_and_still_stops_on_sigterm_within_its_grace(lane, tmp_path: Path) -> None:
    """Triton away: the batches in flight wait on their retries, nothing is acked. /live turns red after
    MODERATION_ACK_STALL_S (Kubernetes would restart the pod) and SIGTERM still ends the worker after
    MODERATION_SHUTDOWN_GRACE_S, leaving the un-acked events to the next worker."""
    grace_s = 3.0
    env = {"MODERATION_ACK_STALL_S": "4", "MODERATION_SHUTDOWN_GRACE_S": str(grace_s)}

    def fault(supervisor: Supervisor, more: More) -> None:
        assert localstack.stop_server(lane.info.run_dir, "triton")
        try:
            more(8)
            deadline = time.monotonic() + 120
            while lane.scrape("/live", supervisor.name)[0] != 503:
                assert time.monotonic() < deadline, lane.scrape("/live", supervisor.name)
                time.sleep(0.5)
            assert lane.pending(supervisor.name) > 0
            stopping = time.monotonic()
            code = stop_worker(supervisor.process, timeout_s=60)
            took = time.monotonic() - stopping
        finally:
            localstack.start_server(lane.info.run_dir, "triton")
        log = lane.log(supervisor.name)
        assert code == 0 and took < grace_s + SHUTDOWN_MARGIN_S + 5, (code, took, log[-3000:])
        assert re.search(r"stopping: [1-9]\d* events left un-acked", log), log[-3000:]
        supervisor.keep_alive()

    run_with_fault(lane, tmp_path, fault, **env)
