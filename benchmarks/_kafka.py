"""What the Kafka benchmarks share: the data, its model and the per-message work, the broker, and a cluster
helper that makes topics, seeds them and checks what a run left behind (outputs written, lag).

Every system measured does the same work per message: orjson decode, Pydantic v2 validation of ``Order``,
the handler (builds an ``Enriched``), JSON-mode dump, orjson encode, produce one output per input.
"""

from __future__ import annotations

import contextlib
import os
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

N = 200_000
PARTITIONS = 4
BATCH = 500
HERE = Path(__file__).resolve().parent

# The data model, as a module of its own so that py-volley (another venv) imports the very same classes.
MODEL_SOURCE = textwrap.dedent('''
    from datetime import datetime

    from pydantic import BaseModel


    class Order(BaseModel):
        order_id: int
        customer: str
        amount: float
        currency: str
        created_at: datetime
        tags: list[str]
        note: str | None = None
        sent_at: float | None = None


    class Enriched(BaseModel):
        order_id: int
        customer: str
        amount_cents: int
        currency: str
        created_at: datetime
        tags: list[str]
        priority: bool
        sent_at: float | None = None
        input_appended_at: float | None = None


    def handle(order: Order) -> Enriched:
        return Enriched(order_id=order.order_id, customer=order.customer, amount_cents=round(order.amount * 100),
                        currency=order.currency, created_at=order.created_at, tags=order.tags,
                        priority=order.amount > 1000, sent_at=order.sent_at)
''')


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
    (directory / "bench_kafka_model.py").write_text(MODEL_SOURCE)


def payload(i: int, sent_at: float | None = None) -> bytes:
    import orjson

    order: dict[str, Any] = {
        "order_id": i, "customer": f"customer-{i % 997:04d}", "amount": (i % 10_000) / 7, "currency": "EUR",
        "created_at": "2026-11-28T08:00:00+00:00", "tags": ["web", "eu", f"t{i % 13}"],
        "note": "deliver to the back door, please" if i % 3 else None,
    }
    if sent_at is not None:
        order["sent_at"] = sent_at
    return bytes(orjson.dumps(order))


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
