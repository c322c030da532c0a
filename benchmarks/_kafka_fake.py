"""An in-process stand-in for librdkafka, for counting the Python work of a Kafka program without a broker.

``install()`` swaps ``confluent_kafka.Consumer`` and ``Producer`` for the fakes below, and ``FakeCluster``
answers what ``bench_kafka.volley_run`` and ``_kafka_ceilings.pipelined`` ask of a cluster. Both programs then
run unchanged, against the same records: real ``confluent_kafka.Message`` objects in runs of 125 per partition
(as librdkafka hands them out), a producer that reports every record delivered at its next ``poll``, and
commits that are recorded per group. What is left to count is each program's own Python work per message,
which is what ``bench_kafka_instructions.py`` compares (the broker's and librdkafka's threads, the noisy part
of ``kafka.efficiency``, are not there at all).

Not a test double for correctness: rebalances, errors and back-pressure are not modelled.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections import defaultdict, deque
from typing import Any

import confluent_kafka
import confluent_kafka.admin
from confluent_kafka import Message, TopicPartition

RUN = 125  # records of one partition handed out in a row
COMMITTED: dict[str, dict[tuple[str, int], int]] = defaultdict(dict)  # group -> (topic, partition) -> offset
PRODUCED: dict[str, int] = defaultdict(int)  # topic -> records reported delivered
TOPICS: dict[str, list[Message]] = {}  # topic -> its records, in the order the consumer hands them out
ENDS: dict[str, list[int]] = {}  # topic -> end offset of each partition
_COUNTING = threading.Lock()  # PRODUCED is updated by whichever thread polls


class FakeConsumer:
    """Subscribes to one seeded topic; assigns all its partitions on the first consume."""

    def __init__(self, config: dict[str, Any]) -> None:
        self._group = str(config.get("group.id", ""))
        self._on_commit = config.get("on_commit")
        self._topic = ""
        self._on_assign: Any = None
        self._assigned = False
        self._next = 0
        self._stored: dict[tuple[str, int], int] = {}
        self._commit_results: list[list[TopicPartition]] = []  # served by the next consume, as librdkafka does

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        self._topic = topics[0]
        self._on_assign = on_assign

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[Message]:
        while self._commit_results:
            self._on_commit(None, self._commit_results.pop(0))
        if not self._assigned:
            self._assigned = True
            if self._on_assign is not None:
                self._on_assign(self, [TopicPartition(self._topic, p) for p in range(len(ENDS[self._topic]))])
        records = TOPICS[self._topic]
        if self._next >= len(records):
            if timeout and timeout > 0:
                time.sleep(min(timeout, 0.01))
            return []
        out = records[self._next:self._next + num_messages]
        self._next += len(out)
        return out

    def poll(self, timeout: float = -1) -> Message | None:
        records = self.consume(1, timeout)
        return records[0] if records else None

    def store_offsets(self, message: Any = None, offsets: list[TopicPartition] | None = None) -> None:
        for tp in offsets or ():
            self._stored[(tp.topic, tp.partition)] = tp.offset

    def commit(self, message: Any = None, offsets: list[TopicPartition] | None = None,
               asynchronous: bool = True) -> list[TopicPartition]:
        if offsets is None:
            offsets = [TopicPartition(t, p, o) for (t, p), o in self._stored.items()]
        for tp in offsets:
            COMMITTED[self._group][(tp.topic, tp.partition)] = tp.offset
        if asynchronous and self._on_commit is not None:
            self._commit_results.append(offsets)
        return offsets

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        mine = COMMITTED[self._group]
        return [TopicPartition(tp.topic, tp.partition, mine.get((tp.topic, tp.partition), -1001)) for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        return 0, ENDS[partition.topic][partition.partition]

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, ENDS[tp.topic][tp.partition]) for tp in partitions]

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        class Metadata:
            topics = {name: type("TopicMetadata", (), {"error": None})() for name in TOPICS}
        return Metadata()

    def pause(self, partitions: list[TopicPartition]) -> None:
        pass

    def resume(self, partitions: list[TopicPartition]) -> None:
        pass

    def seek(self, partition: TopicPartition) -> None:
        pass

    def close(self) -> None:
        pass


class FakeProducer:
    """Takes records; its next ``poll`` reports every one delivered (waiting about 2 ms when none is pending).

    Thread-safe like librdkafka: the event loop produces and polls while a poller thread may poll too. The
    pending records are a deque (``append`` and ``popleft`` are atomic), and ``PRODUCED`` is updated under a
    lock, so that no record is reported twice, lost, or left uncounted.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        self._pending: deque[tuple[str, Any]] = deque()

    def produce(self, topic: str, value: Any = None, key: Any = None, partition: int = -1, on_delivery: Any = None,
                timestamp: int = 0, headers: Any = None, callback: Any = None) -> None:
        self._pending.append((topic, on_delivery or callback))

    def poll(self, timeout: float = -1) -> int:
        pending = self._pending
        if not pending:
            if timeout and timeout > 0:
                time.sleep(min(timeout, 0.002))
            return 0
        taken: list[tuple[str, Any]] = []
        take = pending.popleft
        left = len(pending)  # what is there now: records produced meanwhile wait for the next poll
        while left:
            try:
                taken.append(take())
            except IndexError:  # another thread's poll took the rest meanwhile
                break
            left -= 1
        with _COUNTING:  # counted before they are reported: a program that saw its last report finds them all
            for topic, _ in taken:
                PRODUCED[topic] += 1
        for _, report in taken:
            if report is not None:
                report(None, None)
        return len(taken)

    def flush(self, timeout: float = -1) -> int:
        while self._pending:
            self.poll(0)
        return 0

    def __len__(self) -> int:
        return len(self._pending)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> None:
        return None

    def purge(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self, *args: Any, **kwargs: Any) -> None:
        pass


class _Answered:
    """A describe_configs future, answered already."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def result(self, timeout: float | None = None) -> Any:
        return self.value


class FakeAdmin:
    """What Volley's start-up check asks (a topic's max.message.bytes): the broker's default. Without it the check
    waited for its 5 s timeout on every start."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config

    def describe_configs(self, resources: list[Any], **kwargs: Any) -> dict[Any, _Answered]:
        return {resource: _Answered({"max.message.bytes": _Answered("1048588")}) for resource in resources}


def install() -> None:
    import volley_kafka.producer_checks

    confluent_kafka.Consumer = FakeConsumer  # type: ignore[misc,assignment]
    confluent_kafka.Producer = FakeProducer  # type: ignore[misc,assignment]
    confluent_kafka.admin.AdminClient = FakeAdmin  # type: ignore[misc,assignment]
    volley_kafka.producer_checks.AdminClient = FakeAdmin  # type: ignore[misc,assignment]  # bound at its import


class FakeCluster:
    """What the Kafka benchmark programs ask of ``_kafka.Cluster``, answered from the fakes' records."""

    brokers = "fake-broker:9092"
    partitions = 4

    def topic(self, label: str, config: dict[str, str] | None = None) -> str:
        name = f"{label}-{uuid.uuid4().hex[:6]}"
        TOPICS.setdefault(name, [])
        ENDS.setdefault(name, [0] * self.partitions)
        return name

    def seed(self, topic: str, bodies: list[bytes]) -> None:
        """The records of ``topic``, ``bodies`` in order, in runs of RUN per partition."""
        records, ends = TOPICS[topic], ENDS[topic]
        for i, body in enumerate(bodies):
            partition = (i // RUN) % self.partitions
            records.append(Message(topic=topic, partition=partition, offset=ends[partition], key=None, value=body,
                                   headers=None, timestamp=(1, 1_764_000_000_000)))
            ends[partition] += 1

    def count(self, topic: str) -> int:
        return PRODUCED[topic]

    def lag(self, group: str, topic: str) -> int:
        committed = COMMITTED[group]
        return sum(end - max(committed.get((topic, p), 0), 0) for p, end in enumerate(ENDS[topic]))
