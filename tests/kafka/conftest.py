"""Helpers for the Kafka tests: topics, seeding, reading a topic back, committed offsets, waiting on conditions.

Every helper talks to the real broker of the ``kafka_bootstrap`` fixture with plain confluent-kafka clients,
so that what the tests assert is what Kafka holds, not what Volley believes. Tests get them through the
``kit`` fixture (``--import-mode=importlib`` rules out importing conftest).
"""

from __future__ import annotations

import asyncio
import os
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def unique(label: str) -> str:
    return f"t-{label}-{uuid.uuid4().hex[:10]}"


class KafkaKit:
    """Plain confluent-kafka helpers bound to the test broker."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    @staticmethod
    def unique(label: str) -> str:
        return unique(label)

    def topic(self, label: str, partitions: int = 1) -> str:
        name = unique(label)
        self.create_topics([name], partitions)
        return name

    def create_topics(self, names: Iterable[str], partitions: int = 1) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names], operation_timeout=30)
        for future in futures.values():
            future.result(30)
        wanted = set(futures)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # metadata propagates asynchronously, even on one broker
            topics = admin.list_topics(timeout=10).topics
            if all(n in topics and len(topics[n].partitions) == partitions and topics[n].error is None
                   for n in wanted):
                return
            time.sleep(0.05)
        raise AssertionError(f"topics {sorted(wanted)} did not appear in the metadata")

    def produce(self, topic: str, values: Sequence[bytes], *, keys: Sequence[bytes | None] | None = None,
                partition: int | None = None, headers: dict[str, bytes] | None = None) -> None:
        producer = Producer({"bootstrap.servers": self.bootstrap, "linger.ms": 5, "enable.idempotence": True})
        failures: list[Any] = []

        def report(err: Any, _msg: Any) -> None:
            if err is not None:
                failures.append(err)

        for i, value in enumerate(values):
            while True:
                try:
                    producer.produce(topic, value, keys[i] if keys else None, -1 if partition is None else partition,
                                     report, None, 0, headers)
                    break
                except BufferError:
                    producer.poll(0.1)
        left = producer.flush(60)
        assert left == 0 and not failures, f"seeding {topic} failed: {left} left, {failures[:3]}"

    def read_topic(self, topic: str, *, isolation: str = "read_committed", timeout: float = 30.0) -> list[Any]:
        """Every message of the topic from the beginning to its end (as of now), by a throwaway reader.

        read_committed readers stop at the last stable offset; this waits until open transactions are
        decided, so the result is final.
        """
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique("reader"),
                             "enable.auto.commit": False, "isolation.level": isolation,
                             "enable.partition.eof": False})
        try:
            metadata = consumer.list_topics(topic, timeout=10)
            partitions = sorted(metadata.topics[topic].partitions)
            ends = {p: high_watermark(consumer, topic, p) for p in partitions}
            consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
            positions = dict.fromkeys(partitions, 0)
            out: list[Any] = []
            deadline = time.monotonic() + timeout

            def behind() -> bool:
                for tp in consumer.position([TopicPartition(topic, p) for p in partitions]):
                    if tp.offset >= 0:
                        positions[tp.partition] = max(positions[tp.partition], tp.offset)
                return any(positions[p] < ends[p] for p in partitions)

            while behind():
                if time.monotonic() > deadline:
                    raise AssertionError(f"reading {topic} did not reach its end ({positions} of {ends})")
                out.extend(m for m in consumer.consume(1000, 0.2) if m.error() is None)
            return out
        finally:
            consumer.close()

    def committed(self, group: str, topic: str, partitions: int = 1) -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group, "enable.auto.commit": False})
        try:
            result = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
            return {tp.partition: tp.offset for tp in result}
        finally:
            consumer.close()

    def end_offsets(self, topic: str, partitions: int = 1) -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": unique("ends")})
        try:
            return {p: high_watermark(consumer, topic, p) for p in range(partitions)}
        finally:
            consumer.close()

    @staticmethod
    async def eventually(check: Callable[[], bool | Awaitable[bool]], within: float = 30.0,
                         what: str = "condition", interval: float = 0.05) -> None:
        deadline = time.monotonic() + within
        while True:
            result = check()
            if not isinstance(result, bool):
                result = await result
            if result:
                return
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} not reached within {within} s")
            await asyncio.sleep(interval)


@pytest.fixture
def kit(kafka_bootstrap: str) -> KafkaKit:
    return KafkaKit(kafka_bootstrap)


# The consumer group protocols the group tests run under: both by default; VOLLEY_KAFKA_GROUP_PROTOCOLS=classic
# (or =consumer) narrows a run to one.
GROUP_PROTOCOLS = tuple(
    p.strip() for p in os.environ.get("VOLLEY_KAFKA_GROUP_PROTOCOLS", "classic,consumer").split(",") if p.strip()
)


@pytest.fixture(params=GROUP_PROTOCOLS)
def group_protocol(request: pytest.FixtureRequest) -> str:
    """``group.protocol`` for a test's consumers: ``classic`` or ``consumer`` (KIP-848, the broker runs the group)."""
    protocol: str = request.param
    return protocol


def high_watermark(consumer: Consumer, topic: str, partition: int, within: float = 30.0) -> int:
    """The partition's end offset, retried while leadership settles (a new topic, a broker under load)."""
    deadline = time.monotonic() + within
    while True:
        try:
            return int(consumer.get_watermark_offsets(TopicPartition(topic, partition), timeout=10)[1])
        except KafkaException:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
