"""The ``confluent-share`` (alias ``kafka-share``) connector: inputs consumed through a Kafka share group.

Outputs and dead letters of such a queue are ordinary Kafka producers: they come from the ``confluent`` connector
given here, so that they share its producer clients.
"""

from __future__ import annotations

from volley.ports import DeliveryTerms, QueueSpec
from volley_kafka.connector import KafkaConnector
from volley_kafka.producer import KafkaProducer
from volley_kafka.share_consumer import ShareKafkaConsumer
from volley_kafka.share_settings import delivery_limit, share_settings


class ShareConnector:
    def __init__(self, producers: KafkaConnector) -> None:
        self._producers = producers

    def delivery_terms(self, queue: QueueSpec) -> DeliveryTerms:
        """No order (any member gets any record); no exactly-once; the broker's delivery count limit."""
        return DeliveryTerms(ordered=False, exactly_once=False, delivery_limit=delivery_limit(queue))

    def check(self, queue: QueueSpec) -> None:
        """Refuse impossible settings (exactly-once, implicit acknowledgement) at Engine construction."""
        if queue.role == "input":
            share_settings(queue)

    def create_consumer(self, queue: QueueSpec) -> ShareKafkaConsumer:
        return ShareKafkaConsumer(queue, share_settings(queue))

    def create_producer(self, queue: QueueSpec) -> KafkaProducer:
        return self._producers.create_producer(queue)
