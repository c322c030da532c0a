"""The Kafka consumer and producer on a real broker, without the engine: commits, pause, rebalance, transactions."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryFailure, PartitionId, QueueSpec
from volley_kafka import (
    KafkaConnector,
    KafkaConsumer,
    KafkaProducer,
    TransactionAbortedError,
    TransactionalKafkaConsumer,
)

pytestmark = pytest.mark.kafka


class Deliveries:
    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok: list[OutgoingMessage] = []
        self.failed: list[DeliveryFailure] = []

    def __call__(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        with self._lock:
            self.ok.extend(delivered)
            self.failed.extend(failed)

    def count(self) -> int:
        with self._lock:
            return len(self.ok) + len(self.failed)


@pytest.fixture
async def opened() -> AsyncIterator[list[Any]]:
    """Consumers and producers a test opened, closed at the end whatever happened."""
    resources: list[Any] = []
    yield resources
    for resource in reversed(resources):
        with contextlib.suppress(Exception):
            await asyncio.wait_for(resource.close(), 30)


def input_spec(bootstrap: str, topic: str, group: str, **extra: Any) -> QueueSpec:
    config = {"bootstrap.servers": bootstrap, "group.id": group, "volley.commit.interval.seconds": 0.0, **extra}
    return QueueSpec(name="in", value=topic, connector="confluent", config=config, app_name="adapter-test",
                     role="input")


def output_spec(bootstrap: str, topic: str, **extra: Any) -> QueueSpec:
    return QueueSpec(name="out", value=topic, connector="confluent", config={"bootstrap.servers": bootstrap, **extra},
                     app_name="adapter-test", role="output")


async def committed_offset(kit: Any, consumer: Any, group: str, topic: str) -> int:
    """The group's committed offset of partition 0, after one more fetch: the consumer sends commits from
    its fetch thread, as the engine fetches continuously."""
    assert not await consumer.consume(1, 0.05)
    return int(kit.committed(group, topic)[0])


async def take(consumer: Any, count: int, within: float = 20.0) -> list[Envelope]:
    got: list[Envelope] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got.extend(await consumer.consume(count - len(got), 0.2))
    assert len(got) == count, f"received {len(got)} of {count}"
    return got


async def test_commit_is_the_contiguous_low_watermark(kit: Any, opened: list[Any]) -> None:
    topic = kit.topic("watermark")
    group = kit.unique("g")
    kit.produce(topic, [f"m{i}".encode() for i in range(10)])
    consumer = KafkaConnector().create_consumer(input_spec(kit.bootstrap, topic, group))
    opened.append(consumer)
    await consumer.start()
    received = sorted(await take(consumer, 10), key=lambda e: e.position)
    assert [e.position for e in received] == list(range(10))
    assert all(isinstance(e.handle, object) and e.handle.offset() == e.position for e in received), \
        "Envelope.handle is the confluent Message (msg_ctx.raw)"

    await consumer.ack(received[3:10])  # later messages finish first
    assert await committed_offset(kit, consumer, group, topic) < 0, "nothing committed while 0 is unfinished"
    await consumer.ack([received[0]])

    async def first() -> bool:
        return await committed_offset(kit, consumer, group, topic) == 1

    await kit.eventually(first, what="the commit of offset 1")
    await consumer.ack([received[2]])
    assert await committed_offset(kit, consumer, group, topic) == 1, "offset 1 is unfinished: the commit stays"
    await consumer.ack([received[1]])

    async def everything() -> bool:
        return await committed_offset(kit, consumer, group, topic) == 10

    await kit.eventually(everything, what="commit of everything")


async def test_close_commits_finished_work_only(kit: Any, opened: list[Any]) -> None:
    topic = kit.topic("close")
    group = kit.unique("g")
    kit.produce(topic, [f"m{i}".encode() for i in range(6)])
    spec = input_spec(kit.bootstrap, topic, group, **{"volley.commit.interval.seconds": 3600})
    consumer = KafkaConnector().create_consumer(spec)
    await consumer.start()
    received = sorted(await take(consumer, 6), key=lambda e: e.position)
    await consumer.ack(received[:2] + received[3:])
    await consumer.close()
    assert kit.committed(group, topic)[0] == 2, "close commits up to the first unfinished message"
    again = KafkaConnector().create_consumer(spec)
    opened.append(again)
    await again.start()
    redelivered = await take(again, 4)
    assert [e.position for e in redelivered] == [2, 3, 4, 5], "the next consumer starts at the commit"


async def test_pause_stops_fetching_and_resume_continues(kit: Any, opened: list[Any]) -> None:
    topic = kit.topic("pause", partitions=2)
    kit.produce(topic, [f"a{i}".encode() for i in range(4)])
    consumer = KafkaConnector().create_consumer(input_spec(kit.bootstrap, topic, kit.unique("g")))
    opened.append(consumer)
    await consumer.start()
    await take(consumer, 4)
    consumer.pause()
    kit.produce(topic, [f"b{i}".encode() for i in range(6)])
    started = time.monotonic()
    held: list[Envelope] = []
    while time.monotonic() - started < 1.5:
        held.extend(await consumer.consume(100, 1.0))
    assert held == [], "a paused consumer hands out nothing"
    consumer.resume()
    later = await take(consumer, 6)
    assert sorted(e.value for e in later) == [f"b{i}".encode() for i in range(6)]


async def test_nack_redelivers_in_session_with_attempt_count(kit: Any, opened: list[Any]) -> None:
    topic = kit.topic("nack")
    group = kit.unique("g")
    kit.produce(topic, [f"m{i}".encode() for i in range(5)])
    consumer = KafkaConnector().create_consumer(input_spec(kit.bootstrap, topic, group))
    opened.append(consumer)
    await consumer.start()
    first = sorted(await take(consumer, 5), key=lambda e: e.position)
    await consumer.ack([first[0], first[2], first[4]])
    await consumer.nack([first[1], first[3]], 0.0)
    again = await take(consumer, 2)
    assert [(e.position, e.attempt) for e in again] == [(1, 2), (3, 2)]
    assert await committed_offset(kit, consumer, group, topic) <= 1
    await consumer.ack(again)

    async def everything() -> bool:
        return await committed_offset(kit, consumer, group, topic) == 5

    await kit.eventually(everything, what="commit after the redeliveries")


async def test_revoke_lets_the_engine_finish_then_commits_before_moving(kit: Any, opened: list[Any],
                                                                        group_protocol: str) -> None:
    """A second member joins: the first finishes its in-flight work inside the revoke, commits, and the
    newcomer starts exactly where the first stopped: nothing lost, nothing done twice."""
    topic = kit.topic("revoke", partitions=4)
    group = kit.unique("g")
    kit.produce(topic, [f"m{i:03d}".encode() for i in range(200)])
    connector = KafkaConnector()
    first = connector.create_consumer(input_spec(kit.bootstrap, topic, group, **{
        "volley.commit.interval.seconds": 3600, "group.protocol": group_protocol}))  # only the revoke commits
    opened.append(first)
    revoked: list[list[PartitionId]] = []
    in_flight: list[Envelope] = []
    finished: list[Envelope] = []

    async def on_revoke(partitions: Sequence[PartitionId]) -> None:
        revoked.append(list(partitions))
        gone = set(partitions)
        mine = [e for e in in_flight if (e.source, e.partition) in gone]
        await first.ack(mine)  # "finish" the in-flight work of the revoked partitions
        finished.extend(mine)
        in_flight[:] = [e for e in in_flight if (e.source, e.partition) not in gone]

    first.set_revoke_handler(on_revoke)
    await first.start()
    in_flight.extend(await take(first, 120))

    second = connector.create_consumer(input_spec(kit.bootstrap, topic, group, **{"group.protocol": group_protocol}))
    opened.append(second)
    await second.start()
    seen_by_second: list[Envelope] = []

    async def pump_first() -> None:
        while not revoked:
            in_flight.extend(await first.consume(10, 0.1))

    pumping = asyncio.create_task(pump_first())
    deadline = time.monotonic() + 30
    while not revoked and time.monotonic() < deadline:
        seen_by_second.extend(await second.consume(100, 0.1))
    await asyncio.wait_for(pumping, 30)
    assert revoked, "the first member's partitions were never revoked"
    committed = kit.committed(group, topic, 4)
    per_partition: dict[int, int] = {}
    for e in finished:
        per_partition[int(e.partition or 0)] = max(per_partition.get(int(e.partition or 0), -1), e.position + 1)
    for partition, offset in per_partition.items():
        assert committed[partition] == offset, f"partition {partition}: the revoke committed what was finished"
    # Both members now share the topic; together they must see every message not finished before the revoke.
    # An eager rebalance (classic) revokes every partition, so nothing stays in flight; an incremental one (the
    # consumer protocol) revokes only what moves, and the first member keeps the rest of its in-flight work.
    kept = [e.value for e in in_flight]
    rest: list[Envelope] = list(seen_by_second)
    deadline = time.monotonic() + 30
    wanted = 200 - len(finished) - len(kept)
    while len(rest) < wanted and time.monotonic() < deadline:
        rest.extend(await second.consume(100, 0.1))
        rest.extend(await first.consume(100, 0.05))
    values = [e.value for e in rest]
    done = {e.value for e in finished}
    assert sorted(set(values) | done | set(kept)) == [f"m{i:03d}".encode() for i in range(200)]
    assert not (done & (set(values) | set(kept))), "finished work was handed out again"
    assert not (set(kept) & set(values)), "work still in flight was handed out again"


async def test_producer_survives_a_full_local_queue(kit: Any, opened: list[Any]) -> None:
    """More records than librdkafka's queue holds: the rest waits in order, the loop never blocks."""
    topic = kit.topic("backlog")
    producer = KafkaConnector().create_producer(output_spec(kit.bootstrap, topic, **{
        "queue.buffering.max.messages": 50}))
    opened.append(producer)
    await producer.start()
    deliveries = Deliveries()
    messages = [OutgoingMessage(topic, f"v{i:05d}".encode(), token=i) for i in range(3000)]
    started = time.monotonic()
    for start in range(0, 3000, 500):
        producer.produce(messages[start:start + 500], deliveries)
    blocked = time.monotonic() - started
    assert blocked < 1.0, f"produce() blocked the loop for {blocked:.2f} s"
    await producer.flush(60)
    assert deliveries.count() == 3000
    assert not deliveries.failed
    assert sorted(m.token for m in deliveries.ok) == list(range(3000))
    stored = [m.value() for m in kit.read_topic(topic)]
    assert stored == [m.value for m in messages], "every record stored once, in order"


async def test_delivery_failure_is_reported_not_dropped(kit: Any, opened: list[Any]) -> None:
    topic = kit.topic("toolarge")
    producer = KafkaConnector().create_producer(output_spec(kit.bootstrap, topic, **{"message.max.bytes": 2000}))
    opened.append(producer)
    await producer.start()
    deliveries = Deliveries()
    messages = [OutgoingMessage(topic, b"small", token="ok"), OutgoingMessage(topic, b"x" * 5000, token="big")]
    producer.produce(messages, deliveries)
    await producer.flush(20)
    assert [m.token for m in deliveries.ok] == ["ok"]
    assert [m.token for m, _ in deliveries.failed] == ["big"]
    assert "big" not in {m.value() for m in kit.read_topic(topic)}


async def test_a_delay_on_any_message_of_a_batch_is_warned_about(kit: Any, opened: list[Any],
                                                                 caplog: pytest.LogCaptureFixture) -> None:
    """Kafka cannot delay: the producer sends at once and warns once, whichever message of a batch asked for it."""
    topic = kit.topic("delay")
    producer = KafkaConnector().create_producer(output_spec(kit.bootstrap, topic))
    opened.append(producer)
    await producer.start()
    deliveries = Deliveries()

    def warnings() -> list[str]:
        return [r.getMessage() for r in caplog.records if "cannot delay" in r.getMessage()]

    with caplog.at_level(logging.WARNING, logger="volley_kafka"):
        producer.produce([OutgoingMessage(topic, b"now"), OutgoingMessage(topic, b"later", delay=30.0)], deliveries)
        assert len(warnings()) == 1, "the delay of the batch's second message was ignored silently"
        producer.produce([OutgoingMessage(topic, b"again", delay=5.0)], deliveries)
        await producer.flush(30)
    assert len(warnings()) == 1, f"one warning per producer: {warnings()}"
    assert not deliveries.failed
    assert sorted(m.value for m in deliveries.ok) == [b"again", b"later", b"now"], "sent at once, delay ignored"


async def test_transaction_commit_and_abort(kit: Any, opened: list[Any]) -> None:
    """Exactly-once at the adapter level: an aborted batch's outputs are invisible to read_committed readers,
    its inputs come back, and the committed batch carries the input offsets."""
    source = kit.topic("eos-in")
    sink = kit.topic("eos-out")
    group = kit.unique("g")
    kit.produce(source, [f"m{i}".encode() for i in range(10)])
    connector = KafkaConnector()
    consumer = connector.create_consumer(input_spec(kit.bootstrap, source, group, **{"volley.exactly.once": True}))
    assert isinstance(consumer, TransactionalKafkaConsumer) and consumer.transactional
    producer = connector.create_producer(output_spec(kit.bootstrap, sink))
    opened.extend([consumer, producer])
    await producer.start()
    await consumer.start()
    assert producer.client is consumer.client, "outputs share the input's transactional producer"

    async def process(batch: Sequence[Envelope]) -> Deliveries:
        deliveries = Deliveries()
        producer.produce([OutgoingMessage(sink, b"out-" + e.value, token=e) for e in batch], deliveries)
        await producer.flush(20)
        assert deliveries.count() == len(batch) and not deliveries.failed
        return deliveries

    batch = await take(consumer, 10)
    await consumer.begin()
    await process(batch[:4])
    await consumer.commit(batch[:4])  # 4 of 10 finished: offsets up to the first unfinished
    assert kit.committed(group, source)[0] == 4

    await consumer.begin()
    await process(batch[4:])
    await consumer.abort()  # mid-stream: these outputs must never be seen by read_committed readers
    again = await take(consumer, 6)
    assert [e.position for e in again] == [4, 5, 6, 7, 8, 9], "the aborted batch is consumed again"
    await consumer.begin()
    await process(again)
    await consumer.commit(again)
    assert kit.committed(group, source)[0] == 10

    committed_view = sorted(m.value() for m in kit.read_topic(sink))
    assert committed_view == sorted(b"out-m%d" % i for i in range(10)), "each input's output exactly once"
    uncommitted_view = [m.value() for m in kit.read_topic(sink, isolation="read_uncommitted")]
    assert len(uncommitted_view) == 16, "the aborted records are in the log, only hidden"

    late = Deliveries()  # e.g. an engine's retry of a record whose batch was aborted
    producer.produce([OutgoingMessage(sink, b"late", token="late")], late)
    await producer.flush(5)
    await kit.eventually(lambda: late.count() == 1, what="the late record's report")
    assert isinstance(late.failed[0][1], TransactionAbortedError), "outside a transaction nothing is sent"


async def test_consumer_is_typed_as_the_ports(kit: Any) -> None:
    from volley.ports import Consumer, Instrumented, LagReporter, Pausable, Producer, RebalanceAware, Transactional

    connector = KafkaConnector()
    consumer = connector.create_consumer(input_spec(kit.bootstrap, "x", "g"))
    producer = connector.create_producer(output_spec(kit.bootstrap, "x"))
    try:
        assert isinstance(consumer, KafkaConsumer)
        assert isinstance(producer, KafkaProducer)
        for protocol in (Consumer, Pausable, RebalanceAware, LagReporter, Instrumented):
            assert isinstance(consumer, protocol), protocol.__name__
        assert not isinstance(consumer, Transactional), "only the exactly-once consumer is transactional"
        assert isinstance(producer, Producer)
    finally:
        await consumer.close()
        await producer.close()


async def test_lag_and_drained(kit: Any, opened: list[Any]) -> None:
    topic = kit.topic("lag", partitions=2)
    kit.produce(topic, [f"m{i}".encode() for i in range(40)], keys=[b"a", b"b"] * 20)
    consumer = KafkaConnector().create_consumer(input_spec(kit.bootstrap, topic, kit.unique("g")))
    opened.append(consumer)
    await consumer.start()
    assert not await asyncio.to_thread(consumer.is_drained), "not even assigned yet"
    first = await consumer.consume(10, 10.0)
    assert first
    await kit.eventually(lambda: sum(consumer.lag().values()) > 0, what="lag behind the end of the partitions")
    assert not await asyncio.to_thread(consumer.is_drained)
    rest = await take(consumer, 40 - len(first))
    assert not await asyncio.to_thread(consumer.is_drained), "everything read, but not finished"
    await consumer.ack(first + rest)
    assert await asyncio.to_thread(consumer.is_drained)
    async def caught_up() -> bool:
        await consumer.consume(10, 0.05)  # the fetch thread refreshes the end offsets lag() uses
        return sum(consumer.lag().values()) == 0

    await kit.eventually(caught_up, what="no lag")


async def test_a_topic_created_after_start_is_consumed_within_seconds(kit: Any, opened: list[Any]) -> None:
    """The start-up check must not delay the subscription's discovery of the topic until librdkafka's next
    periodic metadata refresh (five minutes by default)."""
    topic = kit.unique("late-topic")
    consumer = KafkaConnector().create_consumer(input_spec(kit.bootstrap, topic, kit.unique("g")))
    opened.append(consumer)
    await consumer.start()  # warns that the topic does not exist yet
    # Created well after the start: within the first seconds librdkafka still looks for it on its own. (With
    # list_topics() on the member itself, a plain consumer missed a topic created 11 s and 20 s after it
    # subscribed, in some runs only: test_races checks deterministically that the check has its own client.)
    idle_until = time.monotonic() + 12.0
    while time.monotonic() < idle_until:
        assert await consumer.consume(10, 0.2) == []
    kit.create_topics([topic])
    kit.produce(topic, [b"first"])
    got = await take(consumer, 1, within=10.0)
    assert [e.value for e in got] == [b"first"]
