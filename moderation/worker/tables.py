"""Compacted topics read as tables (the verdict cache, the hash bank): every worker follows the whole topic
from its start, with no consumer group, and starts consuming uploads once it has read it to its end."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiokafka import TopicPartition

from moderation.adapters.kafka import reader, where
from moderation.settings import Settings

log = logging.getLogger(__name__)

Partitions = Callable[[str], Awaitable[set[int]]]


@dataclass(frozen=True)
class Table:
    name: str  # in the logs: "verdict cache", "hash bank"
    topic: str
    load_timeout_s: float
    put: Callable[[bytes | None, bytes | None], object]  # a record's key and value -> None, or why it was refused
    size: Callable[[], int]

    def refused(self, refusal: object, where: str) -> None:
        # A refusal says whether it smells of tampering; one that does not is expected noise (e.g. expired).
        level = logging.WARNING if getattr(refusal, "suspicious", True) else logging.DEBUG
        log.log(level, "%s: record refused (%s) at %s", self.name, refusal, where)


async def load(table: Table, settings: Settings, partitions: Partitions) -> asyncio.Task[None]:
    """Follow the table's topic in a task; return it once the topic is read to its end (or after its load
    timeout), so a restarted worker starts with the whole table."""
    loaded = asyncio.Event()
    reader = asyncio.create_task(_follow(table, settings, partitions, loaded), name=table.name)
    started = time.monotonic()
    try:
        await asyncio.wait_for(loaded.wait(), table.load_timeout_s)
    except TimeoutError:
        log.warning(
            "%s: %d entries after %.0f s, consuming before the rest", table.name, table.size(), table.load_timeout_s
        )
    else:
        log.info("%s: %d entries loaded in %.1f s", table.name, table.size(), time.monotonic() - started)
    return reader


async def _follow(table: Table, settings: Settings, partitions: Partitions, loaded: asyncio.Event) -> None:
    consumer = reader(settings)
    await consumer.start()
    try:
        assigned = [TopicPartition(table.topic, p) for p in sorted(await partitions(table.topic))]
        if not assigned:
            log.warning("%s: topic %s has no partitions, so this worker's table is its own", table.name, table.topic)
        consumer.assign(assigned)
        ends = await consumer.end_offsets(assigned)
        while True:
            if not loaded.is_set() and all([await consumer.position(tp) >= end for tp, end in ends.items()]):
                loaded.set()
            for records in (await consumer.getmany(timeout_ms=1000)).values():
                for record in records:
                    if (refusal := table.put(record.key, record.value)) is not None:
                        table.refused(refusal, where(record.topic, record.partition, record.offset))
    except asyncio.CancelledError:
        raise
    except Exception:  # both tables are optimisations or extra signals: losing a feed must not stop the worker
        log.exception("%s feed stopped", table.name)
    finally:
        loaded.set()
        await consumer.stop()
