"""Batches in flight at once, acked strictly in the order they were taken (the agent's OrderedAcks).

The Faust side (a committed offset only after the outcomes are acknowledged, across restarts and
faults) is covered against the real broker by test_stream and test_faults; this pins the ordering,
the backpressure and the failure rule, which those cannot force."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from moderation.worker.acks import OrderedAcks


class Recorder:
    def __init__(self) -> None:
        self.acked: list[Any] = []

    async def ack(self, event: Any) -> None:
        self.acked.append(event)


async def test_batches_finishing_out_of_order_are_acked_in_order() -> None:
    recorder = Recorder()
    acks = OrderedAcks(recorder.ack, limit=3)
    gates = [asyncio.Event() for _ in range(3)]

    def work(i: int) -> Any:
        async def run(_release: Any = None) -> None:
            await gates[i].wait()

        return run

    for i in range(3):
        await acks.submit([f"{i}a", f"{i}b"], work(i))
    gates[2].set()
    gates[1].set()
    await asyncio.sleep(0.01)
    assert recorder.acked == []  # batch 0 is still in flight: nothing after it may be acked
    gates[0].set()
    await acks.close()
    assert recorder.acked == ["0a", "0b", "1a", "1b", "2a", "2b"]


async def test_submit_waits_while_the_limit_is_in_flight() -> None:
    recorder = Recorder()
    acks = OrderedAcks(recorder.ack, limit=2)
    release = asyncio.Event()
    started: list[int] = []

    def work(i: int) -> Any:
        async def run(_release: Any = None) -> None:
            started.append(i)
            await release.wait()

        return run

    await acks.submit([0], work(0))
    await acks.submit([1], work(1))
    third = asyncio.create_task(acks.submit([2], work(2)))
    await asyncio.sleep(0.01)
    assert not third.done() and started == [0, 1]
    release.set()
    await third
    await acks.close()
    assert recorder.acked == [0, 1, 2] and started == [0, 1, 2]


async def test_a_failed_batch_leaves_itself_and_later_batches_unacked_and_is_raised() -> None:
    recorder = Recorder()
    acks = OrderedAcks(recorder.ack, limit=2)
    fail = asyncio.Event()

    async def ok(_release: Any = None) -> None:
        return None

    async def broken(_release: Any = None) -> None:
        await fail.wait()
        raise ConnectionError("the broker never acknowledged")

    await acks.submit(["first"], ok)
    await acks.submit(["broken"], broken)
    await acks.submit(["after"], ok)  # done at once, but behind "broken" in the ack order
    fail.set()
    with pytest.raises(ConnectionError, match="never acknowledged"):
        await acks.submit(["later"], ok)
    with pytest.raises(ConnectionError):
        await acks.close()
    assert recorder.acked == ["first"]


async def test_a_failure_is_reported_at_once_even_while_nothing_is_submitted() -> None:
    failures: list[BaseException] = []
    acks = OrderedAcks(Recorder().ack, limit=2, on_failure=failures.append)

    async def broken(_release: Any = None) -> None:
        raise ConnectionError("not acknowledged")

    await acks.submit(["a"], broken)
    await asyncio.sleep(0.01)  # the agent would now be waiting for the next events
    assert [type(f) for f in failures] == [ConnectionError]


async def test_stalled_only_while_events_wait_and_no_ack_moves() -> None:
    now = [0.0]
    recorder = Recorder()
    acks = OrderedAcks(recorder.ack, limit=2, clock=lambda: now[0])
    release = asyncio.Event()

    async def slow(_release: Any = None) -> None:
        await release.wait()

    now[0] = 1000.0
    assert not acks.stalled(60), "an idle worker is not stalled"
    await acks.submit(["a", "b"], slow)
    assert acks.pending == 2 and not acks.stalled(60)
    now[0] = 1061.0
    assert acks.stalled(60)
    release.set()
    await asyncio.sleep(0.01)
    assert acks.pending == 0 and not acks.stalled(60)
    await acks.close()


async def test_drain_gives_up_after_its_grace_and_counts_what_is_left() -> None:
    recorder = Recorder()
    acks = OrderedAcks(recorder.ack, limit=3)
    never = asyncio.Event()

    async def ok(_release: Any = None) -> None:
        return None

    async def stuck(_release: Any = None) -> None:
        await never.wait()

    await acks.submit(["done"], ok)
    await acks.submit(["stuck-1", "stuck-2"], stuck)
    await acks.submit(["behind"], ok)
    assert await acks.drain(0.05) == 3
    assert recorder.acked == ["done"]


async def test_a_batch_that_releases_its_slot_lets_the_next_start_before_it_is_acked() -> None:
    """Once a batch's images are judged it gives its slot back and only waits for the broker: the next batch
    starts at once, acks stay in order, and no more than twice the limit are ever taken and not acked."""
    recorder = Recorder()
    acks = OrderedAcks(recorder.ack, limit=1)
    published = asyncio.Event()
    started: list[int] = []

    def work(i: int) -> Any:
        async def run(release: Any) -> None:
            started.append(i)
            release()
            release()  # at most once, however often it is called
            await published.wait()

        return run

    await acks.submit([0], work(0))
    await acks.submit([1], work(1))  # batch 0 released its slot: no wait
    third = asyncio.create_task(acks.submit([2], work(2)))
    await asyncio.sleep(0.01)
    assert started == [0, 1] and not third.done() and recorder.acked == []  # two taken, none acked: full
    published.set()
    await third
    await acks.close()
    assert recorder.acked == [0, 1, 2] and started == [0, 1, 2]
