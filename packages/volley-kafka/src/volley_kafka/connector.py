"""The ``confluent`` (alias ``kafka``) connector: builds consumers and producers, and shares producer clients.

Outputs with the same settings share one librdkafka producer (its connections,
batches and poller thread). In exactly-once mode the input's consumer owns a
transactional producer, and every Kafka output of the same app uses that one
instead, so that outputs, dead letters and input offsets commit together.
"""

from __future__ import annotations

import threading

from volley.errors import ConfigurationError
from volley.ports import QueueSpec
from volley_kafka.consumer import KafkaConsumer
from volley_kafka.dlq import KafkaBrowser
from volley_kafka.producer import KafkaProducer, ProducerClient
from volley_kafka.settings import (
    ProducerSettings,
    brokers_of,
    browser_settings,
    consumer_settings,
    producer_settings,
)
from volley_kafka.transactional import TransactionalKafkaConsumer


class KafkaConnector:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._clients: dict[tuple[tuple[str, str], ...], ProducerClient] = {}
        self._transactional: dict[str, ProducerClient] = {}

    def create_consumer(self, queue: QueueSpec) -> KafkaConsumer:
        settings = consumer_settings(queue)
        if not settings.exactly_once:
            return KafkaConsumer(queue, settings)
        client = ProducerClient(settings.producer_librdkafka, f"{queue.app_name}-transactional")
        with self._lock:
            self._transactional[queue.app_name] = client
        return TransactionalKafkaConsumer(queue, settings, client)

    def create_producer(self, queue: QueueSpec) -> KafkaProducer:
        settings = producer_settings(queue)
        key = settings.cache_key
        with self._lock:
            client = self._clients.get(key)
            if client is None or client.closed:
                # Built now so that a rejected setting fails here, at start-up, naming the setting.
                self._clients[key] = ProducerClient(settings.librdkafka, f"{queue.app_name}-{queue.name}")
        return KafkaProducer(queue, settings, lambda: self._acquire(queue, settings))

    def create_browser(self, queue: QueueSpec) -> KafkaBrowser:
        """For ``volley dlq``: read the topic by offsets, commit only what a replay dealt with."""
        return KafkaBrowser(queue)

    def locate(self, queue: QueueSpec) -> str:
        """The cluster: its bootstrap servers as the dead-letter tools' reader finds them (the queue's config, else
        KAFKA_CONSUMER_BROKERS or KAFKA_BROKERS), each without a scheme, lower-case, with the default port. Two apps
        that list different brokers of one cluster are told apart (a limit: docs/dead-letters-replay.md)."""
        return "kafka:" + ",".join(sorted({_server(s) for s in brokers_of(browser_settings(queue))}))

    def _acquire(self, queue: QueueSpec, settings: ProducerSettings) -> ProducerClient:
        with self._lock:
            transactional = self._transactional.get(queue.app_name)
            if transactional is not None and transactional.closed:
                del self._transactional[queue.app_name]
                transactional = None
            if transactional is not None:
                if transactional.brokers != brokers_of(settings.librdkafka):
                    raise ConfigurationError(
                        f"queue {queue.name!r}: the app {queue.app_name!r} consumes exactly-once, so every Kafka "
                        f"output must be on the input's cluster ({', '.join(sorted(transactional.brokers))}), not "
                        f"{', '.join(sorted(brokers_of(settings.librdkafka)))}"
                    )
                if transactional.acquire():
                    return transactional
            key = settings.cache_key
            client = self._clients.get(key)
            if client is None or not client.acquire():
                client = ProducerClient(settings.librdkafka, f"{queue.app_name}-{queue.name}")
                self._clients[key] = client
                client.acquire()
            return client


def _server(address: str) -> str:
    """``PLAINTEXT://Broker-1`` -> ``broker-1:9092``: one spelling of one bootstrap server."""
    address = address.split("://", 1)[-1].strip().lower()
    return address if address.rsplit(":", 1)[-1].isdigit() else f"{address}:9092"
