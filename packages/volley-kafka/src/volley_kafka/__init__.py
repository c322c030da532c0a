"""volley-kafka: Apache Kafka for Volley, through confluent-kafka (librdkafka).

Installing the distribution registers the ``confluent`` connector (alias
``kafka``) and the ``confluent*`` profiles; nothing needs importing.
"""

from volley.errors import TransactionAbortedError
from volley_kafka.connector import KafkaConnector
from volley_kafka.consumer import KafkaConsumer
from volley_kafka.offsets import OffsetTracker, PartitionOffsets
from volley_kafka.producer import KafkaProducer, ProducerClient
from volley_kafka.transactional import TransactionalKafkaConsumer

__all__ = [
    "KafkaConnector",
    "KafkaConsumer",
    "KafkaProducer",
    "OffsetTracker",
    "PartitionOffsets",
    "ProducerClient",
    "TransactionAbortedError",
    "TransactionalKafkaConsumer",
]
