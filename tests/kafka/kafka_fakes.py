"""Stand-ins for confluent-kafka's clients, shared by the tests that make a race or a rebalance deterministic
(test_consumer_policy.py scripts each call, test_races.py serves in-memory partitions), and the making of
producer clients over a fake ``confluent_kafka.Producer`` (test_races.py, test_producer_reports.py).

What both consumers share is here: a record as the adapter reads it, the subscription's callbacks fired inside
a call on the polling thread (as librdkafka fires them), pauses that outlive the assignment (as in librdkafka),
and every commit and seek recorded. Imported by name (``tests/kafka`` is on pytest's ``pythonpath``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from confluent_kafka import TopicPartition

from volley_kafka import producer as producer_module
from volley_kafka.producer import ProducerClient

Key = tuple[str, int]


def producer_clients(monkeypatch: pytest.MonkeyPatch, fake: type[Any],
                     name: str) -> Iterator[Callable[..., tuple[ProducerClient, Any]]]:
    """For a fixture (``yield from``): a maker of ProducerClients over ``fake``; each is released afterwards."""
    made: list[ProducerClient] = []

    def make(config: dict[str, Any] | None = None) -> tuple[ProducerClient, Any]:
        monkeypatch.setattr(producer_module.confluent_kafka, "Producer", fake)
        client = ProducerClient(config or {"bootstrap.servers": "fake:9092"}, name)
        made.append(client)
        return client, client.producer

    yield make
    for client in made:
        if not client.closed:
            client.release(1.0)


class FakeMessage:
    """A ``confluent_kafka.Message`` as the adapter reads it; without a value, one naming its place."""

    __slots__ = ("_offset", "_partition", "_topic", "_value")

    def __init__(self, topic: str, partition: int, offset: int, value: bytes | None = None) -> None:
        self._topic = topic
        self._partition = partition
        self._offset = offset
        self._value = b"%s-%d-%d" % (topic.encode(), partition, offset) if value is None else value

    def error(self) -> None:
        return None

    def topic(self) -> str:
        return self._topic

    def partition(self) -> int:
        return self._partition

    def offset(self) -> int:
        return self._offset

    def value(self) -> bytes:
        return self._value

    def key(self) -> None:
        return None

    def headers(self) -> None:
        return None

    def timestamp(self) -> tuple[int, int]:
        return (0, 0)


class FakeConsumerBase:
    """What a fake ``confluent_kafka.Consumer`` needs besides fetching: subclasses add poll/consume and what
    they answer about positions and committed offsets."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._cond = threading.Condition()
        self.callbacks: dict[str, Any] = {}
        self.assigned: set[Key] = set()
        self.paused: set[Key] = set()  # outlives the assignment, as in librdkafka
        self.positions: dict[Key, int] = {}
        self.committed_offsets: dict[Key, int] = {}  # the last commit per partition
        self.commits: list[tuple[Key, int, bool]] = []  # (partition, offset, asynchronous), every one sent
        self.seeks: list[tuple[Key, int]] = []
        self.closed = False

    def _called(self) -> None:
        """Every call of the adapter's comes through here (a subclass notes the calling thread)."""

    def _rebalanced(self, kind: str, keys: Sequence[Key]) -> None:
        """After an assign: what the subclass does with the new partitions."""

    def fire(self, kind: str, keys: Sequence[Key]) -> None:
        """Run a rebalance inside the current call: the adapter's callback, on the polling thread, then the
        assignment changes."""
        callback = self.callbacks.get(kind)
        if callback is not None:
            callback(self, [TopicPartition(t, p) for t, p in keys])
        with self._cond:
            if kind == "assign":
                self.assigned |= set(keys)
            else:
                self.assigned -= set(keys)
            self._rebalanced(kind, keys)

    def subscribe(self, topics: list[str], on_assign: Any = None, on_revoke: Any = None, on_lost: Any = None) -> None:
        self._called()
        self.callbacks = {"assign": on_assign, "revoke": on_revoke, "lost": on_lost}

    def pause(self, partitions: list[TopicPartition]) -> None:
        self._called()
        with self._cond:
            self.paused |= {(tp.topic, tp.partition) for tp in partitions}

    def resume(self, partitions: list[TopicPartition]) -> None:
        self._called()
        with self._cond:
            self.paused -= {(tp.topic, tp.partition) for tp in partitions}
            self._cond.notify_all()

    def seek(self, partition: TopicPartition) -> None:
        self._called()
        key = (partition.topic, partition.partition)
        with self._cond:
            self.seeks.append((key, partition.offset))
            self.positions[key] = partition.offset

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> Any:
        self._called()
        with self._cond:
            for tp in offsets or ():
                self.commits.append(((tp.topic, tp.partition), tp.offset, asynchronous))
                self.committed_offsets[(tp.topic, tp.partition)] = tp.offset
        return None if asynchronous else list(offsets or ())

    def close(self) -> None:
        self._called()
        self.closed = True
