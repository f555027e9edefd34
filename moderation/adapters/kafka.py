"""Kafka for every deployable, without Faust: connection options (plaintext, SSL, SASL) from the
MODERATION_KAFKA_* settings, a reader that takes partitions without joining a group, the record as the broker
gave it with its `topic[partition]@offset`, and reading a topic's partitions up to their ends."""

from __future__ import annotations

import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, Self

from aiokafka import AIOKafkaConsumer, ConsumerRecord, TopicPartition

from moderation.errors import ModerationError
from moderation.settings import Settings

Headers = tuple[tuple[str, bytes | None], ...]


class UnknownTopic(ModerationError):
    """A topic to read does not exist (yet)."""


def where(topic: str, partition: int, offset: int) -> str:
    """A record's place as logs, dead letters and the tools name it: `topic[partition]@offset`."""
    return f"{topic}[{partition}]@{offset}"


@dataclass(frozen=True)
class Received:
    """One record as the broker gave it: nothing in it is parsed or trusted (Kafka allows a null or empty
    value and key, and null or binary header values)."""

    value: bytes | None
    topic: str
    partition: int
    offset: int
    key: bytes | None = None
    headers: Headers = ()
    timestamp_ms: int = 0

    @classmethod
    def of(cls, record: ConsumerRecord[Any, Any], **more: Any) -> Self:
        """The consumed record, with what a subclass adds (`more`)."""
        return cls(
            record.value,
            record.topic,
            record.partition,
            record.offset,
            record.key,
            tuple(record.headers or ()),
            record.timestamp,
            **more,
        )

    @property
    def where(self) -> str:
        return where(self.topic, self.partition, self.offset)


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    return context


def aiokafka_options(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for AIOKafkaProducer, AIOKafkaConsumer and AIOKafkaAdminClient."""
    options: dict[str, Any] = {
        "bootstrap_servers": settings.kafka_bootstrap_servers,
        "security_protocol": settings.kafka_security_protocol,
        "ssl_context": ssl_context(settings),
    }
    if settings.kafka_security_protocol.startswith("SASL"):
        options |= {
            "sasl_mechanism": settings.kafka_sasl_mechanism,
            "sasl_plain_username": settings.kafka_sasl_username,
            "sasl_plain_password": password(settings),
        }
    return options


def password(settings: Settings) -> str:
    return settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""


def reader(settings: Settings, *topics: str, **options: Any) -> AIOKafkaConsumer:
    """A consumer outside every consumer group that commits nothing: it is given partitions (or `topics`,
    from the earliest offset unless `options` say otherwise) and reads them; a tool's or a console's view."""
    return AIOKafkaConsumer(
        *topics,
        group_id=None,
        enable_auto_commit=False,
        **({"auto_offset_reset": "earliest"} | options | aiokafka_options(settings)),
    )


async def partitions(consumer: AIOKafkaConsumer, *topics: str) -> list[TopicPartition]:
    """Every partition of `topics`, in order; UnknownTopic for a topic the broker does not have."""
    await consumer.topics()  # fetches the metadata partitions_for_topic reads
    found = []
    for topic in dict.fromkeys(topics):
        ids = consumer.partitions_for_topic(topic)
        if not ids:
            raise UnknownTopic(f"topic {topic} does not exist")
        found += [TopicPartition(topic, p) for p in sorted(ids)]
    return found


# Reading a topic to its end without a consumer group (dead letters, decisions, `moderation tail`).
IDLE_FETCHES = 10  # empty fetches in a row before a read gives up on reaching the end offsets


async def high_watermarks(consumer: AIOKafkaConsumer, partitions: list[TopicPartition]) -> dict[TopicPartition, int]:
    """Each partition's end offset (its high watermark), from a fetch: Tansu's ListOffsets answers with the
    last record batch's base offset + 1, short of the end when that batch holds several records."""
    listed = await consumer.end_offsets(partitions)
    consumer.assign(partitions)
    for tp in partitions:
        consumer.seek(tp, listed[tp])
    for _ in range(IDLE_FETCHES):
        if all(consumer.highwater(tp) is not None for tp in partitions):
            break
        await consumer.getmany(timeout_ms=500)  # records or not, the answer carries the high watermark
    return {tp: max(listed[tp], consumer.highwater(tp) or 0) for tp in partitions}


async def read_range(
    consumer: AIOKafkaConsumer, start: dict[TopicPartition, int], stop: dict[TopicPartition, int]
) -> AsyncIterator[list[ConsumerRecord[Any, Any]]]:
    """Records in [start, stop) of each partition, a partition's run at a time, in offset order."""
    pending = [tp for tp in start if start[tp] < stop[tp]]
    if not pending:
        return  # and assign() no empty list: aiokafka's consumer then never stops
    consumer.assign(pending)
    for tp in pending:
        consumer.seek(tp, start[tp])
    idle = 0
    while pending:
        batch = await consumer.getmany(*pending, timeout_ms=1000)
        idle = 0 if batch else idle + 1
        if idle >= IDLE_FETCHES:
            raise TimeoutError(f"no records from {pending} before their end offsets {[stop[tp] for tp in pending]}")
        for tp, records in batch.items():
            yield [r for r in records if r.offset < stop[tp]]
        pending = [tp for tp in pending if await consumer.position(tp) < stop[tp]]
        consumer.pause(*(tp for tp in consumer.assignment() if tp not in pending))


async def read_to_end(settings: Settings, topic: str) -> AsyncIterator[list[ConsumerRecord[Any, Any]]]:
    """Every record of `topic` from its beginning to its end as it is now, a partition's run at a time, without a
    consumer group; nothing for a topic that does not exist (yet)."""
    consumer = reader(settings)
    await consumer.start()
    try:
        try:
            tps = await partitions(consumer, topic)
        except UnknownTopic:
            return
        start, stop = await consumer.beginning_offsets(tps), await high_watermarks(consumer, tps)
        async for records in read_range(consumer, start, stop):
            yield records
    finally:
        await consumer.stop()
