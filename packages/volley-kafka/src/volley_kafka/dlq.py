"""Reading a dead-letter topic for ``volley dlq`` without consuming it, committing only what was dealt with, and
deleting records before a point.

Satisfies ``volley.ports.QueueBrowser``, ``SettlingBrowser`` (``removes_each`` False) and ``PurgeableBefore``. The
browser assigns itself every partition (no group membership, so no rebalance touches the app's own consumers),
starting at the commit of its own group ``volley-dlq.<app>.<topic>`` and ending at the high watermarks it saw at
``start``. Reading commits nothing. ``settle`` marks records done and commits, per partition, up to the first
browsed record that is not done: a topic cannot drop single records, so letters past a skipped one stay above
the commit (the replay journal remembers them).
"""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

from confluent_kafka import Consumer, KafkaError, KafkaException, TopicPartition
from confluent_kafka.admin import AdminClient

from volley.errors import BrokerUnavailableError
from volley.message import Envelope
from volley.ports import QueueSpec
from volley_kafka.settings import CONSUMER_ONLY, browser_settings

T = TypeVar("T")

STALL_SECONDS = 60.0
"""How long a browse may go without a record or an end-of-partition before it gives up (a broker gone)."""


class KafkaBrowser:
    removes_each = False

    def __init__(self, queue: QueueSpec) -> None:
        self.topic = queue.value
        self.config = browser_settings(queue)
        self._consumer: Any = None
        self._ends: dict[int, int] = {}
        self._open: set[int] = set()  # partitions not yet read to their end
        self._browsed: dict[int, deque[int]] = {}  # offsets handed out and not yet committed past, in order
        self._done: dict[int, set[int]] = {}

    def _require(self) -> Any:
        if self._consumer is None:
            raise RuntimeError("KafkaBrowser used before start()")
        return self._consumer

    async def start(self) -> None:
        await asyncio.to_thread(self._start)

    def _start(self) -> None:
        consumer = Consumer(self.config)
        self._consumer = consumer
        try:
            metadata = consumer.list_topics(self.topic, timeout=30)
        except KafkaException as exc:
            raise BrokerUnavailableError(f"cannot reach Kafka for topic {self.topic!r}: {exc}") from exc
        topic = metadata.topics.get(self.topic)
        if topic is not None and topic.error is not None and topic.error.code() != KafkaError.UNKNOWN_TOPIC_OR_PART:
            # (a leader being elected, ...): reading nothing here would count as reading the queue to its end, and the
            # replay journal would forget the letters it still needs
            raise BrokerUnavailableError(f"cannot read the partitions of topic {self.topic!r}: {topic.error}; "
                                         "try again")
        if topic is None or topic.error is not None or not topic.partitions:
            return  # no such topic yet: no dead letters
        partitions = sorted(topic.partitions)
        committed = {tp.partition: tp.offset for tp in _coordinated(
            lambda: consumer.committed([TopicPartition(self.topic, p) for p in partitions], timeout=30))}
        assignment = []
        for partition in partitions:
            low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, partition), timeout=30)
            begin = max(low, committed.get(partition, -1))
            self._ends[partition] = high
            self._browsed[partition] = deque()
            self._done[partition] = set()
            if begin < high:
                self._open.add(partition)
                assignment.append(TopicPartition(self.topic, partition, begin))
        if assignment:
            consumer.assign(assignment)

    async def browse(self, max_messages: int) -> Sequence[Envelope]:
        return await asyncio.to_thread(self._browse, max_messages)

    def _browse(self, max_messages: int) -> list[Envelope]:
        consumer = self._require()
        out: list[Envelope] = []
        last_progress = time.monotonic()
        while self._open and len(out) < max_messages:
            messages = consumer.consume(max_messages - len(out), 0.5)
            if messages:
                last_progress = time.monotonic()
            elif time.monotonic() - last_progress > STALL_SECONDS:
                raise TimeoutError(f"reading {self.topic!r} made no progress for {STALL_SECONDS:.0f} s")
            for message in messages:
                error = message.error()
                partition = message.partition()
                if error is not None:
                    if error.code() == KafkaError._PARTITION_EOF:
                        self._close_partition(partition)
                        continue
                    raise KafkaException(error)
                offset = message.offset()
                if partition not in self._open or offset >= self._ends[partition]:
                    self._close_partition(partition)
                    continue
                if offset + 1 >= self._ends[partition]:
                    self._close_partition(partition)
                self._browsed[partition].append(offset)
                kind, stamp = message.timestamp()
                out.append(Envelope(message.value() or b"", message.key(), _headers(message.headers()), self.topic,
                                    partition, offset, stamp / 1000.0 if kind and stamp >= 0 else None, 1, None))
        return out

    def _close_partition(self, partition: int) -> None:
        if partition in self._open:
            self._open.discard(partition)
            self._consumer.pause([TopicPartition(self.topic, partition)])

    async def settle(self, envelopes: Sequence[Envelope]) -> None:
        for envelope in envelopes:
            if envelope.partition is not None:
                self._done[envelope.partition].add(int(envelope.position))
        commits = []
        for partition, browsed in self._browsed.items():
            done = self._done[partition]
            upto = None
            while browsed and browsed[0] in done:
                upto = browsed.popleft()
                done.discard(upto)
            if upto is not None:
                commits.append(TopicPartition(self.topic, partition, upto + 1))
        if commits:
            consumer = self._require()
            await asyncio.to_thread(_coordinated, lambda: consumer.commit(offsets=commits, asynchronous=False))

    async def purge_before(self, *, offset: int | None = None, timestamp: float | None = None) -> Mapping[int, int]:
        return await asyncio.to_thread(self._purge_before, offset, timestamp)

    def _purge_before(self, offset: int | None, timestamp: float | None) -> dict[int, int]:
        consumer = self._require()
        lows = {p: consumer.get_watermark_offsets(TopicPartition(self.topic, p), timeout=30)[0] for p in self._ends}
        if timestamp is not None:
            found = consumer.offsets_for_times([TopicPartition(self.topic, p, int(timestamp * 1000))
                                                for p in self._ends], timeout=30)
            points = {tp.partition: tp.offset if tp.offset >= 0 else self._ends[tp.partition] for tp in found}
        else:
            points = {p: min(int(offset or 0), end) for p, end in self._ends.items()}
        wanted = [TopicPartition(self.topic, p, point) for p, point in points.items() if point > lows[p]]
        if not wanted:
            return dict.fromkeys(self._ends, 0)
        admin = AdminClient({k: v for k, v in self.config.items() if k not in CONSUMER_ONLY})
        futures = admin.delete_records(wanted)
        dropped = dict.fromkeys(self._ends, 0)
        for tp, future in futures.items():
            result = future.result(30)
            dropped[tp.partition] = int(result.low_watermark) - lows[tp.partition]
        return dropped

    async def close(self) -> None:
        consumer, self._consumer = self._consumer, None
        if consumer is not None:
            await asyncio.to_thread(consumer.close)


_COORDINATOR_MOVING = frozenset({KafkaError.NOT_COORDINATOR, KafkaError.COORDINATOR_LOAD_IN_PROGRESS,
                                 KafkaError.COORDINATOR_NOT_AVAILABLE, KafkaError._WAIT_COORD})


def _coordinated(call: Callable[[], T], within: float = 30.0) -> T:
    """``call``, tried again while the group's coordinator is being found or moves (a new group, a restart)."""
    deadline = time.monotonic() + within
    pause = 0.1
    while True:
        try:
            return call()
        except KafkaException as exc:
            if exc.args[0].code() not in _COORDINATOR_MOVING or time.monotonic() > deadline:
                raise
        time.sleep(pause)
        pause = min(pause * 2, 2.0)


def _headers(raw: Any) -> dict[str, bytes] | None:
    if not raw:
        return None
    return {name: value if value is not None else b"" for name, value in raw}
