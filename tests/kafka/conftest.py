"""Helpers for the Kafka tests: topics, seeding, reading a topic back, committed offsets, waiting on conditions.

Every helper talks to the real broker of the ``kafka_bootstrap`` fixture with plain confluent-kafka clients,
so that what the tests assert is what Kafka holds, not what Volley believes. Tests get them through the
``kit`` fixture (``--import-mode=importlib`` rules out importing conftest).
"""

from __future__ import annotations

import asyncio
import os
import struct
import threading
import time
import uuid
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Any

import pytest
from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic


def unique(label: str) -> str:
    return f"t-{label}-{uuid.uuid4().hex[:10]}"


def _coordinator_busy(exc: KafkaException) -> bool:
    error = exc.args[0] if exc.args else None
    return isinstance(error, KafkaError) and (error.retriable() or error.code() in (
        KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError.COORDINATOR_LOAD_IN_PROGRESS))


class KafkaKit:
    """Plain confluent-kafka helpers bound to the test broker."""

    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap

    @staticmethod
    def unique(label: str) -> str:
        return unique(label)

    def topic(self, label: str, partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = unique(label)
        self.create_topics([name], partitions, config)
        return name

    def create_topics(self, names: Iterable[str], partitions: int = 1, config: dict[str, str] | None = None) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics(
            [NewTopic(n, num_partitions=partitions, replication_factor=1, config=config or {}) for n in names],
            operation_timeout=30)
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

    coordinator_busy = staticmethod(_coordinator_busy)

    def committed(self, group: str, topic: str, partitions: int = 1, within: float = 20.0) -> dict[int, int]:
        """The group's committed offsets. A coordinator that is moving or loading (NOT_COORDINATOR and the like,
        under load or right after a broker restart) is asked again, until ``within`` seconds have passed."""
        deadline = time.monotonic() + within
        while True:
            consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": group, "enable.auto.commit": False})
            try:
                result = consumer.committed([TopicPartition(topic, p) for p in range(partitions)], timeout=10)
                return {tp.partition: tp.offset for tp in result}
            except KafkaException as exc:
                if not _coordinator_busy(exc) or time.monotonic() > deadline:
                    raise
            finally:
                consumer.close()
            time.sleep(0.2)  # a retry's pause, not synchronisation: the loop ends on success or the deadline

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


OFFSETS_TOPIC = "__consumer_offsets"


class CommitLedger:
    """Every offset commit the broker accepted for one group, in order, read from ``__consumer_offsets``.

    Polling ``committed()`` would miss a commit that went backwards and was overtaken a moment later; the
    offsets topic holds each one. Read with read_committed: a transactional offset commit (exactly-once)
    counts once its transaction committed. Starts at the topic's end when created, so make it before the
    group's first commit.
    """

    def __init__(self, bootstrap: str, group: str) -> None:
        self.group = group
        self._lock = threading.Lock()
        self._commits: list[tuple[str, int, int]] = []  # (topic, partition, offset), in the order accepted
        self._consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": unique("ledger"),
                                   "enable.auto.commit": False, "isolation.level": "read_committed",
                                   "enable.partition.eof": False})
        partitions = sorted(self._consumer.list_topics(OFFSETS_TOPIC, timeout=10).topics[OFFSETS_TOPIC].partitions)
        self._consumer.assign([TopicPartition(OFFSETS_TOPIC, p, high_watermark(self._consumer, OFFSETS_TOPIC, p))
                               for p in partitions])
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._read, name=f"ledger-{group}", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop.is_set():
            for message in self._consumer.consume(500, 0.05):
                if message.error() is None:
                    self._record(message.key(), message.value())

    def _record(self, key: bytes | None, value: bytes | None) -> None:
        if key is None or value is None or struct.unpack_from(">h", key)[0] not in (0, 1):
            return  # not an offset commit (group metadata, a deletion)
        position = 2
        fields: list[str] = []
        for _ in range(2):  # group, topic: int16 length + UTF-8
            (length,) = struct.unpack_from(">h", key, position)
            fields.append(key[position + 2:position + 2 + length].decode())
            position += 2 + length
        if fields[0] != self.group:
            return
        (partition,) = struct.unpack_from(">i", key, position)
        (offset,) = struct.unpack_from(">q", value, 2)  # every value version starts: int16 version, int64 offset
        with self._lock:
            self._commits.append((fields[1], partition, offset))

    def history(self, topic: str, partition: int) -> list[int]:
        with self._lock:
            return [o for t, p, o in self._commits if t == topic and p == partition]

    def count(self, topic: str) -> int:
        with self._lock:
            return sum(1 for t, _, _ in self._commits if t == topic)

    def latest(self, topic: str) -> dict[int, int]:
        with self._lock:
            return {p: o for t, p, o in self._commits if t == topic}

    def backwards(self) -> list[tuple[str, int, int, int]]:
        """Commits that moved a partition's offset back: (topic, partition, before, after)."""
        last: dict[tuple[str, int], int] = {}
        out: list[tuple[str, int, int, int]] = []
        with self._lock:
            for topic, partition, offset in self._commits:
                before = last.get((topic, partition))
                if before is not None and offset < before:
                    out.append((topic, partition, before, offset))
                last[(topic, partition)] = offset
        return out

    def close(self) -> None:
        self._stop.set()
        self._thread.join(10)
        self._consumer.close()


@pytest.fixture
def ledger(kafka_bootstrap: str) -> Iterator[Callable[[str], CommitLedger]]:
    """``ledger(group)``: a CommitLedger of that group, closed after the test."""
    made: list[CommitLedger] = []

    def make(group: str) -> CommitLedger:
        made.append(CommitLedger(kafka_bootstrap, group))
        return made[-1]

    yield make
    for ledger_ in made:
        ledger_.close()


class Member:
    """A Volley app (an ``@engine.stream_app`` function) running on a thread with its own event loop: one
    member of a consumer group next to others in the same test.

    ``consumer`` is the app's input consumer while it runs; ``stop()`` shuts it down gracefully and returns the
    run's report, or raises what ended the run.
    """

    def __init__(self, app: Any, name: str) -> None:
        self.app = app
        self.name = name
        self.report: Any = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"member-{name}", daemon=True)
        self._thread.start()

    def _main(self) -> None:
        try:
            self.report = asyncio.run(self.app.run_async())
        except BaseException as exc:  # handed to the test by stop() / ended()
            self.error = exc

    @property
    def consumer(self) -> Any:
        run = self.app._run
        return None if run is None else run.consumer

    def assignment(self) -> frozenset[tuple[str, int]]:
        consumer = self.consumer
        return frozenset() if consumer is None else frozenset(consumer._fetcher.assigned)

    def running(self) -> bool:
        return self._thread.is_alive()

    def ensure_running(self) -> None:
        if not self._thread.is_alive():
            raise AssertionError(f"member {self.name} stopped: {self.error!r}")

    def ended(self, within: float) -> BaseException | None:
        """Wait for the run to end by itself; what it raised (None if it returned)."""
        self._thread.join(within)
        if self._thread.is_alive():
            raise AssertionError(f"member {self.name} still running after {within} s")
        return self.error

    def is_drained(self) -> bool:
        """The consumer's own drain check (asked from this thread, off the member's loop)."""
        consumer = self.consumer
        return consumer is not None and bool(consumer.is_drained())

    def stop(self, within: float = 60.0) -> Any:
        self.app.stop()
        self._thread.join(within)
        if self._thread.is_alive():
            raise AssertionError(f"member {self.name} did not stop within {within} s")
        if self.error is not None:
            raise AssertionError(f"member {self.name} failed: {self.error!r}") from self.error
        return self.report


@pytest.fixture
def members() -> Iterator[Callable[[Any, str], Member]]:
    """``members(app, name)`` starts a Member; whatever is still running when the test ends is stopped."""
    made: list[Member] = []

    def start(app: Any, name: str) -> Member:
        made.append(Member(app, name))
        return made[-1]

    yield start
    for member in made:
        if member.running():
            member.app.stop()
    for member in made:
        member._thread.join(60)

