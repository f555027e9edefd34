"""Faust's side of Kafka: its credentials from the MODERATION_KAFKA_* settings, and its aiokafka transport
with a configurable fetch wait, a bounded shutdown and a lighter per-message delivery."""

from __future__ import annotations

import asyncio
import time
from typing import Any, cast

import aiokafka
import faust
from faust.transport.consumer import CONSUMER_FETCHING
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.types import TP, Message
from mode import Service, ServiceT

from moderation.adapters.kafka import password, ssl_context
from moderation.settings import Settings


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    context = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=password(settings),
            ssl_context=context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    return faust.SSLCredentials(context) if context is not None else None


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # faust-streaming passes a fixed fetch_max_wait_ms=1500 here; aiokafka only reads it at start().
        consumer._fetch_max_wait_ms = cast("FaustTransport", transport).fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)

    async def wait_empty(self) -> None:
        """Faust's wait for every event handed out to be acked: as Faust has it in a rebalance (the timeouts
        are set so that it ends in time), but for at most what is left of MODERATION_SHUTDOWN_GRACE_S
        when the worker stops, so that SIGTERM ends even a worker whose acking is stuck. (Faust's own loop
        cannot be cut short from outside: cancelling it hung in a stuck worker.)"""
        if not self.app.should_stop:
            await super().wait_empty()
            return
        deadline = time.monotonic() + cast("FaustTransport", self.transport).shutdown.left()
        while self._unacked_messages and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            self._clean_unacked_messages()
        await self.commit_and_end_transactions()

    async def on_stop(self) -> None:
        """Commit what is acked and go: the waiting was done, within the grace, by `wait_empty` and the agent;
        what is left un-acked is for the group to re-deliver."""
        await self.commit_and_end_transactions()

    async def _drain_messages(self, fetcher: ServiceT) -> None:
        """faust-streaming's drain loop, racing each fetch's delivery against a flow suspension once.

        Faust races every message's delivery against a suspension (a rebalance) with four tasks and an
        asyncio.wait, about 30 us a message: a seventh of what a cache hit costs the worker in all.
        Racing the delivery of the whole fetch keeps the guarantee (a suspension abandons the rest of
        the fetch; the partitions are then sought to their committed offsets) at one race per fetch."""
        consumer_stopped, fetcher_stopped = cast(Service, self)._stopped.is_set, cast(Service, fetcher)._stopped.is_set
        try:
            while not (consumer_stopped() or fetcher_stopped()):
                self.diag.set_flag(CONSUMER_FETCHING)
                messages = [item async for item in self.getmany(timeout=1.0)]
                generation = self.app.consumer_generation_id  # getmany's own: it yields nothing past a change
                await self.sleep(0)  # getmany can return at once, again and again
                if messages and not self.should_stop:
                    await self.wait_first(self._deliver(messages, generation), self.suspend_flow.wait())
                self.diag.unset_flag(CONSUMER_FETCHING)
        except self.consumer_stopped_errors:
            if self.transport.app.should_stop:
                self.log.info("Broker stopped consumer, shutting down...")
                return
            raise
        except asyncio.CancelledError:
            if self.transport.app.should_stop:
                self.log.info("Consumer shutting down for user cancel.")
                return
            raise
        except Exception as exc:
            self.log.exception("Drain messages raised: %r", exc)
            raise
        finally:
            self.diag.unset_flag(CONSUMER_FETCHING)

    async def _deliver(self, messages: list[tuple[TP, Message]], generation: int) -> None:
        """Faust's per-message bookkeeping (read offsets, gaps, commit_every), each message to its stream;
        like getmany, nothing more once the flow stops or the group's generation changes."""
        read_offset = self._read_offset
        for count, (tp, message) in enumerate(messages, 1):
            if not self.flow_active or self.app.consumer_generation_id != generation:
                return
            if count % 100 == 0:
                await asyncio.sleep(0)  # let the agents run
            offset, last = message.offset, read_offset[tp]
            if last is not None and offset < last:
                continue  # already delivered (Faust logs and drops these too)
            if last and offset - last > 1 and self.app.topics.acks_enabled_for(message.topic):
                await self._add_gap(tp, last + 1, offset)
            if self._commit_every is not None and self._n_acked >= self._commit_every:
                self._n_acked = 0
                await asyncio.shield(self.commit())  # a suspension must not cut a commit short
            await self.callback(message)
            read_offset[tp] = offset


class FaustTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, its consumer's fetch wait from MODERATION_KAFKA_FETCH_MAX_WAIT_MS.

    Kafka answers a waiting fetch as soon as records arrive, but Tansu (the local stack's broker) holds
    it for the whole wait, which then becomes the latency of every event that lands in an idle moment.
    """

    Consumer = _Consumer

    def __init__(self, url: Any, app: faust.App, *, fetch_max_wait_ms: int, shutdown_grace_s: float) -> None:
        super().__init__(url, app)
        self.fetch_max_wait_ms = fetch_max_wait_ms
        self.shutdown = Grace(shutdown_grace_s)


class Grace:
    """MODERATION_SHUTDOWN_GRACE_S, counted once from the first wait of the shutdown: Faust's wait for acks
    and the agent's drain share it."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self._started: float | None = None

    def left(self) -> float:
        now = time.monotonic()
        if self._started is None:
            self._started = now
        return max(0.0, self.seconds - (now - self._started))


def faust_transport(settings: Settings, app: faust.App) -> FaustTransport:
    return FaustTransport(
        app.conf.broker_consumer,
        app,
        fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms,
        shutdown_grace_s=settings.shutdown_grace_s,
    )
