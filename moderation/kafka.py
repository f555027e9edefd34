"""Kafka connection options (plaintext, SSL, SASL) for Faust and for plain aiokafka clients alike, and
Faust's aiokafka transport with a configurable fetch wait."""

from __future__ import annotations

import ssl
from typing import Any, cast

import aiokafka
import faust
from faust.transport.drivers import aiokafka as faust_aiokafka

from moderation.settings import Settings


def ssl_context(settings: Settings) -> ssl.SSLContext | None:
    if settings.kafka_security_protocol not in ("SSL", "SASL_SSL"):
        return None
    context = ssl.create_default_context(cafile=settings.kafka_ssl_cafile)
    if settings.kafka_ssl_certfile:
        context.load_cert_chain(settings.kafka_ssl_certfile, settings.kafka_ssl_keyfile)
    return context


def faust_credentials(settings: Settings) -> faust.types.auth.CredentialsT | None:
    context = ssl_context(settings)
    if settings.kafka_security_protocol.startswith("SASL"):
        return faust.SASLCredentials(
            username=settings.kafka_sasl_username,
            password=_password(settings),
            ssl_context=context,
            mechanism=settings.kafka_sasl_mechanism,
        )
    return faust.SSLCredentials(context) if context is not None else None


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
            "sasl_plain_password": _password(settings),
        }
    return options


def _password(settings: Settings) -> str:
    return settings.kafka_sasl_password.get_secret_value() if settings.kafka_sasl_password else ""


class _ConsumerThread(faust_aiokafka.AIOKafkaConsumerThread):
    def _create_worker_consumer(self, transport: faust_aiokafka.Transport) -> aiokafka.AIOKafkaConsumer:
        consumer = super()._create_worker_consumer(transport)
        # faust-streaming passes a fixed fetch_max_wait_ms=1500 here; aiokafka only reads it at start().
        consumer._fetch_max_wait_ms = cast("FaustTransport", transport).fetch_max_wait_ms
        return consumer


class _Consumer(faust_aiokafka.Consumer):
    def _new_consumer_thread(self) -> faust_aiokafka.AIOKafkaConsumerThread:
        return _ConsumerThread(self, loop=self.loop, beacon=self.beacon)


class FaustTransport(faust_aiokafka.Transport):
    """Faust's aiokafka transport, its consumer's fetch wait from MODERATION_KAFKA_FETCH_MAX_WAIT_MS.

    Kafka answers a waiting fetch as soon as records arrive, but Tansu (the local stack's broker) holds
    it for the whole wait, which then becomes the latency of every event that lands in an idle moment.
    """

    Consumer = _Consumer

    def __init__(self, url: Any, app: faust.App, *, fetch_max_wait_ms: int) -> None:
        super().__init__(url, app)
        self.fetch_max_wait_ms = fetch_max_wait_ms


def faust_transport(settings: Settings, app: faust.App) -> FaustTransport:
    return FaustTransport(app.conf.broker_consumer, app, fetch_max_wait_ms=settings.kafka_fetch_max_wait_ms)
