"""What the Kafka benchmarks share: the data and its model (from ``_orders.py``, with the latency timestamps),
the broker, and a cluster helper that makes topics, seeds them and checks what a run left behind (outputs
written, lag).

Every system measured does the same work per message: orjson decode, Pydantic v2 validation of ``Order``,
the handler (builds an ``Enriched``), JSON-mode dump, orjson encode, produce one output per input.
"""

from __future__ import annotations

import contextlib
import os
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import _orders as orders
from _orders import payload

N = 200_000
PARTITIONS = 4
BATCH = 500
HERE = Path(__file__).resolve().parent


@contextlib.contextmanager
def kafka_address() -> Iterator[str]:
    external = os.environ.get("KAFKA_BROKERS", "").strip()
    if external:
        yield external
        return
    sys.path.insert(0, str(HERE.parent / "tools"))
    from services.kafka import KafkaBroker

    with KafkaBroker() as broker:
        yield broker.bootstrap_servers


def write_model(directory: Path) -> None:
    """``bench_kafka_model`` in ``directory``: put it on sys.path (and a peer's PYTHONPATH)."""
    orders.write_model(directory, "bench_kafka_model", timestamps=True)


class Cluster:
    """Topics, seeding and counting with plain confluent-kafka clients."""

    def __init__(self, brokers: str, partitions: int = PARTITIONS) -> None:
        from confluent_kafka.admin import AdminClient

        self.brokers = brokers
        self.partitions = partitions  # of every topic it makes
        self.admin = AdminClient({"bootstrap.servers": brokers})
        self._counter: Any = None

    def topic(self, label: str, config: dict[str, str] | None = None) -> str:
        from confluent_kafka.admin import NewTopic

        name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        futures = self.admin.create_topics([NewTopic(name, num_partitions=self.partitions, replication_factor=1,
                                                     config=config or {})])
        for future in futures.values():
            future.result(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            topics = self.admin.list_topics(timeout=10).topics
            if name in topics and len(topics[name].partitions) == self.partitions:
                break
            time.sleep(0.05)
        return name

    def seed(self, topic: str, count: int) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.brokers, "linger.ms": 20, "batch.size": 1_000_000,
                             "enable.idempotence": True})
        for i in range(count):
            while True:
                try:
                    producer.produce(topic, payload(i), str(i).encode())
                    break
                except BufferError:
                    producer.poll(0.05)
        if producer.flush(120):
            raise SystemExit(f"seeding {topic} did not finish")

    def count(self, topic: str) -> int:
        """Records in the topic (the sum of its partitions' end offsets)."""
        return sum(self.end_offsets(topic))

    def end_offsets(self, topic: str) -> list[int]:
        """Each partition's end offset, asking again on transient errors."""
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        if self._counter is None:
            self._counter = Consumer({"bootstrap.servers": self.brokers, "group.id": "bench-counter"})
        for attempt in range(50):
            try:
                return [self._counter.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                        for p in range(self.partitions)]
            except KafkaException:  # a new topic's leader not known yet, and the like
                if attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def close(self) -> None:
        """Close the client this keeps (before the broker stops: left open, it retries its connection, logging
        each refusal, until the process ends)."""
        if self._counter is not None:
            self._counter.close()
            self._counter = None

    def lag(self, group: str, topic: str) -> int:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": group})
        try:
            committed = consumer.committed([TopicPartition(topic, p) for p in range(self.partitions)], timeout=10)
            ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in range(self.partitions)]
            return sum(end - max(tp.offset, 0) for tp, end in zip(committed, ends, strict=True))
        finally:
            consumer.close()

    def committed_outputs(self, topic: str, expected: int) -> tuple[int, int]:
        """(distinct order ids, duplicates) a ``read_committed`` reader sees in ``topic``, read to its end."""
        import orjson
        from confluent_kafka import Consumer, KafkaError, TopicPartition

        reader = Consumer({"bootstrap.servers": self.brokers, "group.id": f"bench-reader-{uuid.uuid4().hex[:6]}",
                           "enable.auto.commit": False, "isolation.level": "read_committed",
                           "enable.partition.eof": True})
        try:
            # the last stable offsets: where a read_committed reader's partitions end
            ends = {p: reader.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in range(self.partitions)}
            reader.assign([TopicPartition(topic, p, 0) for p in range(self.partitions) if ends[p]])
            pending = {p for p, end in ends.items() if end}
            seen: set[int] = set()
            duplicates = 0
            deadline = time.monotonic() + 120
            while pending and time.monotonic() < deadline:
                for message in reader.consume(1000, 0.5):
                    error = message.error()
                    if error is not None:
                        if error.code() == KafkaError._PARTITION_EOF:
                            pending.discard(message.partition())
                        continue
                    order_id = orjson.loads(message.value())["order_id"]
                    if order_id in seen:
                        duplicates += 1
                    seen.add(order_id)
            if len(seen) != expected and pending:
                raise SystemExit(f"reading {topic}: partitions {sorted(pending)} not read to the end in 120 s")
            return len(seen), duplicates
        finally:
            reader.close()
