"""Races and rebalance paths of the Kafka adapter made deterministic with fake confluent-kafka clients.

The fakes stand in for ``confluent_kafka.Producer`` / ``Consumer`` (patched where the adapter looks them
up), so that an interleaving of threads, or a rebalance in the middle of a fetch, happens every run
instead of once in a while on a real broker. What the real broker does is tested in test_adapter.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka import KafkaError, KafkaException, TopicPartition
from kafka_fakes import FakeConsumerBase, FakeMessage, Key, producer_clients

from volley.errors import DeliveryError
from volley.message import Envelope, OutgoingMessage
from volley.observe import MultiObserver
from volley.ports import DeliveryFailure, PartitionId, QueueSpec
from volley_kafka import KafkaConnector, KafkaConsumer, TransactionalKafkaConsumer
from volley_kafka import consumer as consumer_module
from volley_kafka import fetcher as fetcher_module
from volley_kafka import rebalance as rebalance_module
from volley_kafka import transactional as transactional_module
from volley_kafka.envelope import KafkaEnvelope
from volley_kafka.producer import ProducerClient, TransactionAbortedError

RENDEZVOUS = 1.0
"""How long the fake waits for a second thread to produce the same record (only the buggy code ever does)."""


class FakeProducer:
    """``confluent_kafka.Producer`` with a queue whose room the test controls; reports served by poll/flush."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._lock = threading.Condition()
        self.room = 0  # records the local queue still accepts
        self.sent: list[bytes] = []  # every produce() accepted, in order
        self._unreported: list[Callable[[Any, Any], None]] = []
        self.gate_value: bytes | None = None  # a record whose producer waits for a second one (see RENDEZVOUS)
        self.gate = threading.Barrier(2)
        self.transaction_calls: list[str] = []
        self.transaction_state = "ready"  # ready -> open -> ready (commit or abort); a failed abort stays open
        self.abort_failures = 0  # abort_transaction raises this many times first
        self.flush_error: BaseException | None = None  # flush raises this once
        self.abort_gate: threading.Event | None = None  # abort_transaction waits for it (a slow coordinator)

    def set_room(self, room: int) -> None:
        with self._lock:
            self.room = room
            self._lock.notify_all()

    def produce(self, topic: str, value: bytes, key: Any, partition: int, on_delivery: Any, timestamp: Any,
                flags: Any, headers: Any) -> None:
        if value == self.gate_value:
            # The buggy drain: the other thread reads the same head and produces it too.
            with contextlib.suppress(threading.BrokenBarrierError):
                self.gate.wait(RENDEZVOUS)
        with self._lock:
            if self.room <= 0:
                raise BufferError("Local: Queue full")
            self.room -= 1
            self.sent.append(value)
            self._unreported.append(on_delivery)

    def _serve(self) -> int:
        with self._lock:
            reports, self._unreported = self._unreported, []
        for report in reports:
            report(None, None)
        return len(reports)

    def poll(self, timeout: float = 0.0) -> int:
        served = self._serve()
        if not served and timeout > 0:
            with self._lock:
                self._lock.wait(timeout)
            served = self._serve()
        return served

    def flush(self, timeout: float = 0.0) -> int:
        error, self.flush_error = self.flush_error, None
        if error is not None:
            raise error
        self._serve()
        return 0

    def purge(self, *_args: Any) -> None:
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self._unreported)

    def list_topics(self, *_args: Any, **_kwargs: Any) -> Any:
        return None

    # transactions
    def init_transactions(self, *_args: Any) -> None:
        self.transaction_calls.append("init")

    def begin_transaction(self) -> None:
        if self.transaction_state != "ready":
            raise KafkaException(KafkaError(KafkaError._STATE, "the previous transaction was not aborted"))
        self.transaction_state = "open"
        self.transaction_calls.append("begin")

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, *_args: Any) -> None:
        self.transaction_calls.append(f"offsets:{metadata}")

    def commit_transaction(self, *_args: Any) -> None:
        self.transaction_calls.append("commit")
        self.transaction_state = "ready"

    def abort_transaction(self, *_args: Any) -> None:
        self.transaction_calls.append("abort")
        if self.abort_gate is not None:
            assert self.abort_gate.wait(30), "the test never opened the abort gate"
        if self.abort_failures > 0:
            self.abort_failures -= 1
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "abort timed out", retriable=True))
        self.transaction_state = "ready"


class FakeConsumer(FakeConsumerBase):
    """``confluent_kafka.Consumer`` over in-memory partitions; rebalances happen inside poll/consume when the
    test scripts them. Like librdkafka, a partition's pause outlives its assignment."""

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.logs: dict[Key, list[bytes]] = {}
        self.fresh: set[Key] = set()  # assigned during the current call
        self.events: deque[tuple[str, list[Key]]] = deque()  # rebalances to run inside the next poll
        self.generation = 1
        self.threads: set[str] = set()  # names of the threads that called in (besides metadata)
        self.listed = 0  # list_topics() calls

    # the test's side
    def add(self, topic: str, partition: int, values: Sequence[bytes]) -> None:
        with self._cond:
            self.logs.setdefault((topic, partition), []).extend(values)
            self._cond.notify_all()

    def rebalance(self, kind: str, keys: Sequence[Key]) -> None:
        with self._cond:
            self.events.append((kind, list(keys)))
            self._cond.notify_all()

    # the client's side
    def _called(self) -> None:
        self.threads.add(threading.current_thread().name)

    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        self.listed += 1

        class Metadata:
            topics: dict[str, Any] = {}
        return Metadata()

    def _run_events(self) -> None:
        while True:
            with self._cond:
                if not self.events:
                    return
                kind, keys = self.events.popleft()
            self.fire(kind, keys)

    def _rebalanced(self, kind: str, keys: Sequence[Key]) -> None:
        if kind == "assign":
            self.fresh |= set(keys)  # fetching them takes a round trip: nothing in this call
            for key in keys:
                self.positions[key] = self.committed_offsets.get(key, 0)

    def _take(self, count: int) -> list[FakeMessage]:
        out: list[FakeMessage] = []
        with self._cond:
            for key in sorted(self.assigned - self.paused - self.fresh):
                log = self.logs.get(key, [])
                position = self.positions.get(key, 0)
                while position < len(log) and len(out) < count:
                    out.append(FakeMessage(key[0], key[1], position, log[position]))
                    position += 1
                self.positions[key] = position
        return out

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        self._called()
        try:
            self._run_events()
            out = self._take(num_messages)
            if not out and timeout > 0:
                with self._cond:
                    self._cond.wait(min(timeout, 0.05))
                self._run_events()
                out = self._take(num_messages)
            return out
        finally:
            with self._cond:
                self.fresh.clear()

    def poll(self, timeout: float = -1) -> FakeMessage | None:
        out = self.consume(1, timeout)
        return out[0] if out else None

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        self._called()
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get((tp.topic, tp.partition), -1001))
                for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        self._called()
        return 0, len(self.logs.get((partition.topic, partition.partition), []))

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        self._called()
        return [TopicPartition(tp.topic, tp.partition, self.positions.get((tp.topic, tp.partition), -1001))
                for tp in partitions]

    def consumer_group_metadata(self) -> str:
        return f"generation-{self.generation}"


class Reports:
    """A delivery callback that counts every report per record."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.ok: Counter[int] = Counter()
        self.failed: dict[int, BaseException] = {}
        self.failed_count: Counter[int] = Counter()

    def __call__(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        with self._lock:
            self.ok.update(int(m.token) for m in delivered)
            for m, exc in failed:
                self.failed[int(m.token)] = exc
                self.failed_count[int(m.token)] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.ok.values()) + sum(self.failed_count.values())


def wait_until(check: Callable[[], bool], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        time.sleep(0.005)


def spec(topic: str = "in", **extra: Any) -> QueueSpec:
    config = {"bootstrap.servers": "fake:9092", "group.id": "g", "volley.commit.interval.seconds": 0.0,
              "volley.startup.timeout.seconds": 0, **extra}
    return QueueSpec(name="in", value=topic, connector="confluent", config=config, app_name="race-test",
                     role="input")


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every confluent client the adapter builds in this test is a fake."""
    monkeypatch.setattr(confluent_kafka, "Producer", FakeProducer)
    monkeypatch.setattr(confluent_kafka, "Consumer", FakeConsumer)


async def take(consumer: KafkaConsumer, count: int, within: float = 10.0) -> list[Envelope]:
    got: list[Envelope] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got.extend(await consumer.consume(count - len(got), 0.05))
    assert len(got) == count, f"received {len(got)} of {count}"
    return got


def fake_of(consumer: KafkaConsumer) -> FakeConsumer:
    client = consumer._fetcher.client  # the fake behind the adapter
    assert isinstance(client, FakeConsumer)
    return client


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[ProducerClient, Any]]]:
    yield from producer_clients(monkeypatch, FakeProducer, "fake")


def test_backlog_sent_by_poller_and_flush_at_once_reports_each_record_once(fake_producer: Any) -> None:
    """The poller and a flushing thread (rebalance, shutdown, abort) drain the same backlog: each record is
    produced once, in order, and reported once; none is skipped, no IndexError."""
    client, fake = fake_producer()
    client.acquire()
    reports = Reports()
    messages = [OutgoingMessage("out", b"v%03d" % i, token=i) for i in range(50)]
    client.produce(messages, reports)  # no room: everything waits in the backlog
    assert client.pending() == 50
    fake.gate_value = b"v000"
    flushing = threading.Thread(target=client.flush_blocking, args=(20.0,))
    fake.set_room(1000)  # the poller starts draining ...
    flushing.start()  # ... and so does the flush
    flushing.join(30)
    assert not flushing.is_alive()
    wait_until(lambda: reports.total() >= 50, what="50 reports")
    client.release(5.0)
    assert fake.sent == [m.value for m in messages], "each record produced once, in order"
    assert reports.ok == Counter(range(50)), "each record reported delivered exactly once"
    assert not reports.failed


async def transactional(**extra: Any) -> tuple[TransactionalKafkaConsumer, FakeConsumer, ProducerClient, FakeProducer]:
    consumer = KafkaConnector().create_consumer(spec(**{"volley.exactly.once": True,
                                                        "volley.revoke.timeout.seconds": 2, **extra}))
    assert isinstance(consumer, TransactionalKafkaConsumer)
    await consumer.start()
    client = consumer.client
    fake = client.producer
    assert isinstance(fake, FakeProducer)
    return consumer, fake_of(consumer), client, fake


async def test_abort_fails_the_backlog_instead_of_sending_it_in_the_next_transaction(fakes: None) -> None:
    """Records of an aborted batch still waiting for room in librdkafka's queue are reported as aborted at
    once, and never produced later (they would land in the next transaction)."""
    consumer, _, client, fake = await transactional()
    try:
        await consumer.begin()
        reports = Reports()
        client.produce([OutgoingMessage("out", b"doomed%d" % i, token=i) for i in range(5)], reports)
        assert client.pending() == 5, "no room: the batch waits in the backlog"
        await asyncio.wait_for(consumer.abort(), 30)
        assert client.pending() == 0, "the aborted batch's backlog is gone"
        await asyncio.to_thread(wait_until, lambda: reports.total() == 5, 10.0, "the aborted records' reports")
        assert sorted(reports.failed) == list(range(5))
        assert all(isinstance(exc, TransactionAbortedError) for exc in reports.failed.values())
        await consumer.begin()
        fake.set_room(100)
        later = Reports()
        client.produce([OutgoingMessage("out", b"next", token=9)], later)
        await asyncio.to_thread(client.flush_blocking, 10.0)
        assert fake.sent == [b"next"], "only the next batch's record is in the next transaction"
        assert not reports.ok
    finally:
        await consumer.close()


async def consumer_of(**extra: Any) -> tuple[KafkaConsumer, FakeConsumer]:
    consumer = KafkaConnector().create_consumer(spec(**extra))
    await consumer.start()
    return consumer, fake_of(consumer)


async def test_a_consumed_record_becomes_the_envelope_the_constructor_builds(fakes: None) -> None:
    """``_envelopes`` sets a KafkaEnvelope's fields in place (no __init__ call per record): every slot must hold
    what ``KafkaEnvelope(...)`` puts there, and none may be left unset."""
    consumer, fake = await consumer_of()
    try:
        fake.add("in", 0, [b"a", b"b"])
        fake.rebalance("assign", [("in", 0)])
        got = await take(consumer, 2)

        def slots(env: Envelope) -> dict[str, Any]:
            names = [name for cls in type(env).__mro__ for name in getattr(cls, "__slots__", ())]
            return {name: getattr(env, name, "<unset>") for name in names}

        for env in got:
            assert type(env) is KafkaEnvelope
            built = KafkaEnvelope(env.value, env.source, env.partition, env.position, env.attempt, env.handle,
                                  env.era)
            assert slots(env) == slots(built)
        assert [(e.value, e.source, e.partition, e.position, e.attempt, e.pending) for e in got] == \
            [(b"a", "in", 0, 0, 1, 0), (b"b", "in", 0, 1, 1, 0)]
    finally:
        await consumer.close()


async def test_offsets_with_gaps_are_tracked_and_finished_in_any_order(fakes: None) -> None:
    """``_envelopes`` registers each run of consecutive offsets as a range (a gap, from compaction or a transaction
    marker, starts a new one) and ``_finish`` removes a run that is the oldest outstanding offsets in order at
    once: whatever order inputs finish in, the watermark is the lowest unfinished offset, or one past the last."""
    consumer, _fake = await consumer_of()
    try:
        assigned = frozenset({("in", 0), ("in", 1)})
        tracker = consumer._tracker
        consumer._fetcher.assigned = assigned
        offsets = {0: [3, 4, 5, 9, 10, 12], 1: [0, 1, 2]}
        records = [FakeMessage("in", 0, o) for o in offsets[0][:4]] + [FakeMessage("in", 1, o) for o in offsets[1]] \
            + [FakeMessage("in", 0, o) for o in offsets[0][4:]]
        envelopes = consumer._envelopes(records, consumer._fetcher.epoch, assigned, 0)  # type: ignore[arg-type]
        assert [(e.partition, e.position) for e in envelopes] == [(r.partition(), r.offset()) for r in records]
        p0, p1 = tracker.partition("in", 0), tracker.partition("in", 1)
        assert (list(p0.outstanding), p0.next, p0.first) == (offsets[0], 13, 3)
        assert (list(p1.outstanding), p1.next) == (offsets[1], 3)
        by_offset = {(e.partition, e.position): e for e in envelopes}

        def finish(*keys: tuple[int, int]) -> int:
            return consumer._finish([by_offset[k] for k in keys])

        assert finish((0, 4), (0, 9)) == 0  # ahead of their turn: 3 still runs
        assert tracker.watermark("in", 0) == 3
        assert finish((1, 0), (1, 1), (0, 3), (0, 5)) == 0  # in order, then the head: 3, 4, 5 and 9 are done
        assert (tracker.watermark("in", 0), tracker.watermark("in", 1)) == (10, 2)
        assert finish((0, 10), (0, 12), (1, 2)) == 0  # in order, runs of two partitions
        assert (tracker.watermark("in", 0), tracker.watermark("in", 1)) == (13, 3)
        assert not p0.done and not p0.outstanding and not p1.outstanding
        tracker.forget([("in", 1)])
        assert finish((1, 0), (1, 1)) == 2  # a partition no longer tracked: counted, nothing else
    finally:
        await consumer.close()


@pytest.mark.parametrize("resumed", ["while revoked", "after the revoke"])
async def test_a_partition_paused_when_revoked_is_resumed_when_assigned_back(fakes: None, resumed: str,
                                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    """librdkafka keeps a partition's pause across revoke and assign; Volley's view (not paused) and
    librdkafka's must agree again once the partition is back, or the worker never consumes it again."""
    monkeypatch.setattr(consumer_module, "HARD_PAUSE_AFTER", 0.0)
    consumer, fake = await consumer_of()
    p0 = ("in", 0)
    fake.add("in", 0, [b"a", b"b"])
    fake.rebalance("assign", [p0])
    try:
        first = await take(consumer, 2)
        consumer.pause()  # the buffer is full: a hard pause, at once here
        assert await consumer.consume(10, 0.05) == []
        await asyncio.to_thread(wait_until, lambda: p0 in fake.paused, 5.0, "the pause in librdkafka")

        async def finish_in_flight(partitions: Sequence[PartitionId]) -> None:
            await consumer.ack(first)  # the engine's revoke handler drains: room in the buffer again
            if resumed == "while revoked":
                consumer.resume()

        consumer.set_revoke_handler(finish_in_flight)
        fake.rebalance("revoke", [p0])
        assert await consumer.consume(10, 0.05) == []
        if resumed != "while revoked":
            consumer.resume()  # resumed before the partition is back, with nothing assigned
            assert await consumer.consume(10, 0.05) == []
        fake.add("in", 0, [b"c"])
        fake.rebalance("assign", [p0])
        again = await take(consumer, 1)
        assert [e.value for e in again] == [b"c"], "the partition is consumed again after it came back"
        assert p0 not in fake.paused
    finally:
        await consumer.close()


async def test_a_partition_assigned_while_hard_paused_is_paused_in_librdkafka(fakes: None,
                                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """The other direction: a partition that arrives while the engine is paused must not flow past the pause."""
    monkeypatch.setattr(consumer_module, "HARD_PAUSE_AFTER", 0.0)
    consumer, fake = await consumer_of()
    p0, p1 = ("in", 0), ("in", 1)
    fake.add("in", 0, [b"a"])
    fake.rebalance("assign", [p0])
    try:
        await take(consumer, 1)
        consumer.pause()
        assert await consumer.consume(10, 0.05) == []
        fake.add("in", 1, [b"x"])
        fake.rebalance("assign", [p1])
        got: list[Envelope] = []  # what librdkafka had fetched before the pause reached it may come out
        for _ in range(5):
            got.extend(await consumer.consume(10, 0.05))
        assert fake.paused >= {p0, p1}, "both partitions paused in librdkafka while the engine is paused"
        consumer.resume()
        if not got:
            got = await take(consumer, 1)
        assert [e.value for e in got] == [b"x"]
    finally:
        await consumer.close()


async def test_a_partition_paused_for_a_nack_delay_is_resumed_when_assigned_back(fakes: None) -> None:
    """A nack with a delay pauses its partition in librdkafka; revoked before the delay ends (the timer is
    dropped with the partition) and assigned back, the partition must flow again."""
    consumer, fake = await consumer_of()
    p0 = ("in", 0)
    fake.add("in", 0, [b"a"])
    fake.rebalance("assign", [p0])
    try:
        first = await take(consumer, 1)
        await consumer.nack(first, 3600.0)
        assert await consumer.consume(10, 0.05) == []
        await asyncio.to_thread(wait_until, lambda: p0 in fake.paused, 5.0, "the delay's pause in librdkafka")
        fake.rebalance("revoke", [p0])
        assert await consumer.consume(10, 0.05) == []
        fake.rebalance("assign", [p0])
        again = await take(consumer, 1)
        assert [(e.value, e.position) for e in again] == [(b"a", 0)], "read again from the last commit"
    finally:
        await consumer.close()


async def test_each_transaction_sends_offsets_with_the_current_group_metadata(fakes: None) -> None:
    """Under KIP-848 the member epoch changes without an assignment callback: the metadata sent with the offsets
    must be taken right before sending them, not kept from the assignment."""
    consumer, fake, _, producer = await transactional()
    fake.add("in", 0, [b"a", b"b"])
    fake.rebalance("assign", [("in", 0)])
    try:
        first = await take(consumer, 1)
        await consumer.begin()
        await consumer.commit(first)
        fake.generation = 2  # e.g. a heartbeat bumped the member epoch: no callback
        second = await take(consumer, 1)
        await consumer.begin()
        await consumer.commit(second)
        sent = [call for call in producer.transaction_calls if call.startswith("offsets:")]
        assert sent == ["offsets:generation-1", "offsets:generation-2"]
    finally:
        await consumer.close()


async def test_a_failed_abort_is_retried_until_the_next_transaction_can_begin(fakes: None) -> None:
    consumer, _, _, producer = await transactional()
    try:
        await consumer.begin()
        producer.abort_failures = 2  # e.g. timed out twice while the coordinator moves
        await asyncio.wait_for(consumer.abort(), 30)
        assert producer.transaction_calls.count("abort") == 3, "retried until it went through"
        await consumer.begin()  # the app goes on
    finally:
        await consumer.close()


async def test_an_exception_from_the_flush_does_not_skip_the_abort(fakes: None) -> None:
    consumer, _, _, producer = await transactional()
    try:
        await consumer.begin()
        producer.flush_error = KafkaException(KafkaError(KafkaError._FAIL, "flush failed"))
        await asyncio.wait_for(consumer.abort(), 30)
        assert producer.transaction_calls[-1] == "abort"
        await consumer.begin()
    finally:
        await consumer.close()


async def test_a_revoke_that_times_out_still_forgets_the_partition_and_its_queued_commits(
        fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine's revoke handler overruns the deadline (here: it ignores cancellation). The partition is
    given up uncommitted, and then: no commit of it is sent later (its new owner may be further on), and
    nothing of it is left behind (is_drained() would stay false for good)."""
    monkeypatch.setattr(rebalance_module, "REVOKE_GRACE", 0.2)
    consumer, fake = await consumer_of(**{"volley.revoke.timeout.seconds": 0.2})
    p0, p1 = ("in", 0), ("in", 1)
    fake.add("in", 0, [b"a", b"b", b"c"])
    fake.rebalance("assign", [p0, p1])
    let_go = asyncio.Event()
    try:
        got = sorted(await take(consumer, 3), key=lambda e: e.position)

        async def stubborn(partitions: Sequence[PartitionId]) -> None:
            await consumer.ack(got[:2])  # queues a commit of offset 2 ...
            try:
                await asyncio.sleep(3600)
            except asyncio.CancelledError:  # ... and overruns the revoke deadline
                await let_go.wait()

        consumer.set_revoke_handler(stubborn)
        revoked_at = len(fake.commits)
        fake.rebalance("revoke", [p0])
        assert await consumer.consume(10, 0.05) == []
        for _ in range(5):
            assert await consumer.consume(10, 0.05) == []
        assert [c for c in fake.commits[revoked_at:] if c[0] == p0] == [], "no commit of a partition given up"
        drained = await asyncio.to_thread(consumer.is_drained)
        assert drained, "the remaining partition is read to its end, nothing outstanding"
    finally:
        let_go.set()
        await consumer.close()
    assert not [c for c in fake.commits[revoked_at:] if c[0] == p0], "nor at close"


@pytest.mark.parametrize("stubborn", [False, True], ids=["handler-overruns", "handler-ignores-the-cancel"])
@pytest.mark.parametrize("lost", [False, True], ids=["revoked", "lost"])
async def test_a_revoke_past_its_deadline_aborts_the_open_transaction_before_the_partition_goes(
        fakes: None, monkeypatch: pytest.MonkeyPatch, lost: bool, stubborn: bool) -> None:
    """Exactly-once: the engine's work overruns the revoke deadline with a transaction open. Its outputs include
    those of the revoked partition's inputs, whose offsets can no longer be sent with it (the partition is gone
    when the engine commits). Committing it later would make those outputs visible while the partition's next
    owner handles the same inputs again (duplicates, seen on a real broker in test_rebalance's zombie test). The
    transaction is aborted before the partition is released, and the engine's later commit of it is refused
    (its inputs come again), never sent. A handler that even ignores the cancellation (the fetch thread gives the
    partition up without waiting for it) cannot get the transaction committed either."""
    monkeypatch.setattr(rebalance_module, "REVOKE_GRACE", 0.3)
    consumer, fake, client, producer = await transactional(**{"volley.revoke.timeout.seconds": 0.2})
    p0, p1 = ("in", 0), ("in", 1)
    fake.add("in", 0, [b"a", b"b"])
    fake.add("in", 1, [b"c", b"d"])
    fake.rebalance("assign", [p0, p1])
    let_go = asyncio.Event()
    released_calls: list[str] = []
    kind = "lost" if lost else "revoke"
    try:
        got = await take(consumer, 4)
        await consumer.begin()
        producer.set_room(10)
        reports = Reports()
        client.produce([OutgoingMessage("out", b"out-%d" % i, token=i) for i in range(4)], reports)

        async def overrunning(partitions: Sequence[PartitionId]) -> None:
            try:
                await asyncio.sleep(3600)  # the engine's work is not done by the deadline
            except asyncio.CancelledError:
                if stubborn:
                    await let_go.wait()
                raise

        consumer.set_revoke_handler(overrunning)
        original = fake.callbacks[kind]

        def gone(client_: Any, partitions: list[TopicPartition]) -> None:
            original(client_, partitions)
            released_calls.extend(producer.transaction_calls)  # what had happened when the partition went

        fake.callbacks[kind] = gone
        fake.rebalance(kind, [p1])
        deadline = time.monotonic() + 10
        while not released_calls:  # the revoke runs inside a fetch
            assert time.monotonic() < deadline, "the revoke did not run"
            await consumer.consume(10, 0.05)
        if not stubborn:
            assert released_calls[-1] == "abort", \
                f"the open transaction was not aborted before release: {released_calls}"
        with pytest.raises(DeliveryError):
            await consumer.commit(got)  # the engine's barrier, once its work is done
        assert "commit" not in producer.transaction_calls, \
            "a transaction with the revoked partition's outputs committed without its offsets"
        assert producer.transaction_calls[-1] == "abort"
        await consumer.begin()  # the app goes on with the next transaction
        again = await take(consumer, 2)
        assert sorted(e.position for e in again) == [0, 1], "the kept partition's inputs come again"
        await consumer.commit(again)
        assert producer.transaction_calls[-1] == "commit"
    finally:
        let_go.set()
        await consumer.close()


Transactional = tuple[TransactionalKafkaConsumer, FakeConsumer, ProducerClient, FakeProducer]


async def eos_on_two_partitions(monkeypatch: pytest.MonkeyPatch) -> Transactional:
    """An exactly-once consumer with a short revoke deadline, assigned in[0] (record a) and in[1] (record b)."""
    monkeypatch.setattr(rebalance_module, "REVOKE_GRACE", 0.3)
    consumer, fake, client, producer = await transactional(**{"volley.revoke.timeout.seconds": 0.2})
    fake.add("in", 0, [b"a"])
    fake.add("in", 1, [b"b"])
    fake.rebalance("assign", [("in", 0), ("in", 1)])
    return consumer, fake, client, producer


async def revoke_overrunning(consumer: KafkaConsumer, fake: FakeConsumer, key: Key) -> None:
    """Revoke ``key`` while the engine's work overruns the revoke deadline; until the partition is released."""

    async def overrunning(partitions: Sequence[PartitionId]) -> None:
        await asyncio.sleep(3600)

    consumer.set_revoke_handler(overrunning)
    fake.rebalance("revoke", [key])
    deadline = time.monotonic() + 10
    while key in consumer._fetcher.assigned:
        assert time.monotonic() < deadline, "the partition was not released"
        await consumer.consume(10, 0.05)


async def test_the_engines_commit_waits_for_an_abort_the_revoke_began_and_does_not_abort_twice(
        fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The abort begun at a revoke's deadline outlives the revoke (the fetch thread stops waiting for it). The
    engine's commit of the doomed transaction, and the next begin, wait for it: a second abort_transaction, or a
    begin while the first abort runs, would fail in librdkafka (no transaction / one still aborting)."""
    consumer, fake, _, producer = await eos_on_two_partitions(monkeypatch)
    p1 = ("in", 1)
    gate = producer.abort_gate = threading.Event()
    try:
        got = await take(consumer, 2)
        await consumer.begin()
        await revoke_overrunning(consumer, fake, p1)  # its abort waits at the gate, and outlives the revoke
        assert "abort" in producer.transaction_calls, "the revoke did not abort the open transaction"
        committing = asyncio.ensure_future(consumer.commit(got))
        beginning = asyncio.ensure_future(consumer.begin())  # librdkafka refuses a begin while aborting
        for _ in range(20):
            await asyncio.sleep(0)
        assert not committing.done(), "the commit did not wait for the abort in progress"
        assert not beginning.done(), "begin did not wait for the abort in progress"
        gate.set()
        with pytest.raises(DeliveryError):
            await asyncio.wait_for(committing, 10)
        await asyncio.wait_for(beginning, 10)
        assert producer.transaction_calls.count("abort") == 1, producer.transaction_calls
        assert producer.transaction_calls[-1] == "begin"
    finally:
        gate.set()
        await consumer.close()


async def until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {within} s"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("at_deadline", ["committing", "idle"])
async def test_inputs_of_a_partition_released_after_they_were_fetched_never_commit_in_a_later_transaction(
        fakes: None, monkeypatch: pytest.MonkeyPatch, at_deadline: str) -> None:
    """Exactly-once overlap: while one transaction (T1) commits, the next one's inputs (T2) are fetched and handled,
    their outputs staged until T2 begins, after T1's commit. A revoke whose deadline meets T1 still committing (its
    offsets cover the partition: it may go on), or no transaction open at all, releases the partition; T2 then
    begins after the release, with outputs of the released partition's inputs. Its commit must be refused: the
    partition's new owner handles those inputs again."""
    consumer, fake, client, producer = await eos_on_two_partitions(monkeypatch)
    p1 = ("in", 1)
    gate = threading.Event()
    if at_deadline == "committing":
        commit_transaction = producer.commit_transaction

        def slow_commit(*args: Any) -> None:
            assert gate.wait(30), "the test never let the commit through"
            commit_transaction(*args)

        producer.commit_transaction = slow_commit  # type: ignore[method-assign]
    else:
        gate.set()
    try:
        t1 = await take(consumer, 2)
        await consumer.begin()
        fake.add("in", 0, [b"c"])
        fake.add("in", 1, [b"d"])
        t2 = await take(consumer, 2)  # the next transaction's inputs: handled meanwhile, outputs staged
        committing = asyncio.ensure_future(consumer.commit(t1))
        if at_deadline == "committing":
            await until(lambda: consumer._committing, "T1 committing")
        else:
            await committing
        await revoke_overrunning(consumer, fake, p1)
        gate.set()
        await asyncio.wait_for(committing, 10)
        assert producer.transaction_calls.count("commit") == 1, "T1 committed"
        await consumer.begin()  # the barrier: T2 begins once T1 committed, and its staged outputs go out
        producer.set_room(10)
        client.produce([OutgoingMessage("out", b"out-" + e.value, token=i) for i, e in enumerate(t2)], Reports())
        with pytest.raises(DeliveryError):
            await consumer.commit(t2)
        assert producer.transaction_calls.count("commit") == 1, \
            f"T2, with the released partition's outputs, committed: {producer.transaction_calls}"
        again = await take(consumer, 1)
        assert [(e.partition, e.position) for e in again] == [(0, 1)], "the kept partition's T2 input comes again"
        await consumer.begin()
        await consumer.commit(again)
        assert producer.transaction_calls[-1] == "commit", "a transaction of inputs fetched after it commits"
    finally:
        gate.set()
        await consumer.close()


async def test_the_release_history_stays_bounded_and_an_input_fetched_before_it_never_commits(
        fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """A long-lived exactly-once worker rebalanced thousands of times: the history of released partitions that each
    commit checks its inputs against (``era``) keeps only the latest releases. An input fetched before the oldest
    one kept may have lost its partition since: its transaction is refused and it comes again, and inputs fetched
    after commit as usual."""
    consumer, _, _, producer = await eos_on_two_partitions(monkeypatch)
    fetcher = consumer._fetcher
    kept = fetcher_module.RELEASES_KEPT
    try:
        got = await take(consumer, 2)
        elsewhere = {("in", 7)}  # another partition, assigned and released over and over
        for _ in range(5 * kept):
            fetcher.assigned_now(elsewhere)
            fetcher.release(elsewhere)
        assert fetcher.releases == 5 * kept
        assert len(fetcher._released[1]) <= 2 * kept, "the release history grows with every rebalance"
        await consumer.begin()
        with pytest.raises(DeliveryError):
            await consumer.commit(got)
        assert "commit" not in producer.transaction_calls, "inputs older than the release history committed"
        again = await take(consumer, 2)  # the abort rewound both partitions
        assert sorted((e.partition, e.position) for e in again) == [(0, 0), (1, 0)]
        await consumer.begin()
        await consumer.commit(again)
        assert producer.transaction_calls[-1] == "commit", "inputs fetched after the releases commit"
    finally:
        await consumer.close()


async def test_a_revoke_deadline_during_the_engines_abort_neither_aborts_twice_nor_dooms_the_next_transaction(
        fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine is aborting a transaction (its transaction still open until the broker answers) when a revoke's
    deadline passes: the revoke must not abort it a second time (librdkafka refuses an abort with none open, and
    it would be retried for seconds while nothing can begin), nor leave the next transaction doomed."""
    consumer, fake, _, producer = await eos_on_two_partitions(monkeypatch)
    p1 = ("in", 1)
    gate = producer.abort_gate = threading.Event()
    try:
        await take(consumer, 2)
        await consumer.begin()
        aborting = asyncio.ensure_future(consumer.abort())  # the barrier's _end: its inputs did not settle
        await until(lambda: "abort" in producer.transaction_calls, "the engine's abort under way")
        await revoke_overrunning(consumer, fake, p1)
        gate.set()
        await asyncio.wait_for(aborting, 10)
        assert producer.transaction_calls.count("abort") == 1, producer.transaction_calls
        await consumer.begin()
        again = await take(consumer, 1)
        assert [(e.partition, e.position) for e in again] == [(0, 0)], "the kept partition's input comes again"
        await consumer.commit(again)
        assert producer.transaction_calls[-2:] == [f"offsets:generation-{fake.generation}", "commit"], \
            producer.transaction_calls
    finally:
        gate.set()
        await consumer.close()


async def test_a_commit_between_the_loop_forgetting_a_partition_and_the_fetch_thread_releasing_it_is_refused(
        fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop half of a revoke has forgotten in[1] (its offsets) and returned; the fetch thread has not counted
    the release yet. A commit in that window must not send in[0]'s offset alone with in[1]'s outputs."""
    consumer, fake, client, producer = await eos_on_two_partitions(monkeypatch)
    p1 = ("in", 1)
    fetcher = consumer._fetcher
    release = fetcher.release
    entered, gate = threading.Event(), threading.Event()

    def slow_release(keys: set[Key]) -> None:
        if p1 in keys and p1 in fetcher.assigned:
            entered.set()
            assert gate.wait(30), "the test never let the release through"
        release(keys)

    fetcher.release = slow_release  # type: ignore[method-assign]
    polling = None
    try:
        got = await take(consumer, 2)
        fake.rebalance("revoke", [p1])
        polling = asyncio.ensure_future(consumer.consume(10, 0.05))
        await until(entered.is_set, "the fetch thread releasing in[1]")
        assert p1 not in consumer._tracker.partitions and p1 in fetcher.assigned, "in the window"
        await consumer.begin()
        producer.set_room(10)
        client.produce([OutgoingMessage("out", b"out-" + e.value, token=i) for i, e in enumerate(got)], Reports())
        with pytest.raises(DeliveryError):
            await consumer.commit(got)
        assert "commit" not in producer.transaction_calls, producer.transaction_calls
    finally:
        gate.set()
        if polling is not None:
            await asyncio.wait({polling}, timeout=5)
        await consumer.close()


async def test_close_waits_a_bounded_time_for_an_abort_begun_at_a_revoke(
        fakes: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """The abort a revoke began hangs (an unreachable coordinator): close waits for it within its bound and goes
    on, instead of waiting for it again without one."""
    monkeypatch.setattr(transactional_module, "ABORT_BACKOFF_MAX", 0.3)
    consumer, fake, _, producer = await eos_on_two_partitions(monkeypatch)
    gate = producer.abort_gate = threading.Event()
    try:
        await take(consumer, 2)
        await consumer.begin()
        await revoke_overrunning(consumer, fake, ("in", 1))
        assert "abort" in producer.transaction_calls and not gate.is_set(), "the revoke's abort hangs"
        closing = asyncio.ensure_future(consumer.close())
        done, _ = await asyncio.wait({closing}, timeout=5.0)
        assert done, "close waited for the revoke's abort past its bound (0.5 s)"
    finally:
        gate.set()


async def test_a_nack_during_the_revoke_drain_does_not_seek_the_partition_when_it_comes_back(fakes: None) -> None:
    """A nack in the revoke's drain queues a seek; the partition is reassigned at once (incremental
    rebalance): the seek must not be carried out on the new assignment, past its committed offset."""
    consumer, fake = await consumer_of()
    p0 = ("in", 0)
    fake.add("in", 0, [b"m0", b"m1", b"m2", b"m3", b"m4"])
    fake.rebalance("assign", [p0])
    try:
        got = sorted(await take(consumer, 5), key=lambda e: e.position)

        async def drain(partitions: Sequence[PartitionId]) -> None:
            await consumer.ack(got[:2])
            await consumer.nack([got[3]], 0.0)  # m2 is still running and is abandoned

        consumer.set_revoke_handler(drain)
        fake.rebalance("revoke", [p0])
        fake.rebalance("assign", [p0])
        assert await consumer.consume(10, 0) == []  # both happen in this fetch
        assert fake.committed_offsets[p0] == 2, "the revoke committed up to the abandoned message"
        again = sorted(await take(consumer, 3), key=lambda e: e.position)
        assert [e.position for e in again] == [2, 3, 4], "the new assignment starts at the commit"
    finally:
        await consumer.close()


async def test_every_call_into_the_librdkafka_consumer_is_made_on_the_fetch_thread(fakes: None) -> None:
    """subscribe, lag() and is_drained() included: librdkafka's consumer is not called from the event loop
    (a call may block on a rebalance callback that waits for the loop) nor from the engine's worker threads."""
    consumer, fake = await consumer_of(**{"volley.startup.timeout.seconds": 5})
    fake.add("in", 0, [b"a", b"b"])
    fake.rebalance("assign", [("in", 0)])
    try:
        got = await take(consumer, 2)
        consumer.lag()
        assert not await asyncio.to_thread(consumer.is_drained), "read to the end, but not finished"
        await consumer.nack(got[1:], 0.0)
        await consumer.ack(got[:1])
        again = await take(consumer, 1)
        await consumer.ack(again)
        assert await asyncio.to_thread(consumer.is_drained)
        assert consumer.lag() == {("in", 0): 0}
    finally:
        await consumer.close()
    assert fake.threads == {"volley-kafka-fetch-in"}, fake.threads


async def test_is_drained_refuses_to_block_the_event_loop(fakes: None) -> None:
    consumer, fake = await consumer_of()
    fake.rebalance("assign", [("in", 0)])
    try:
        await consumer.consume(10, 0.05)
        with pytest.raises(RuntimeError, match="off the event loop"):
            consumer.is_drained()
    finally:
        await consumer.close()


async def test_the_start_up_check_runs_on_a_client_of_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    """list_topics() on the group member before subscribe() made librdkafka notice a topic created later only
    at its periodic metadata refresh (five minutes by default); the check uses a throwaway client, closed."""
    made: list[FakeConsumer] = []

    class Recorded(FakeConsumer):
        def __init__(self, config: dict[str, Any]) -> None:
            super().__init__(config)
            made.append(self)

    monkeypatch.setattr(confluent_kafka, "Consumer", Recorded)
    consumer = KafkaConnector().create_consumer(spec(**{"volley.startup.timeout.seconds": 5}))
    await consumer.start()
    try:
        member = fake_of(consumer)
        assert member.listed == 0, "the group member itself is not asked for metadata"
        probes = [c for c in made if c is not member]
        assert [p.listed for p in probes] == [1]
        assert probes[0].closed, "the throwaway client is closed after the check"
    finally:
        await consumer.close()


def test_a_flush_that_raises_at_close_still_stops_the_client(fake_producer: Any) -> None:
    """release(): a KafkaException from the last flush (a fatal producer error, say) must not escape and skip the
    rest of the close: the poller stops, the client is purged and closed, and every record has had its report."""
    client, fake = fake_producer()
    client.acquire()
    reports = Reports()
    client.produce([OutgoingMessage("out", b"v%d" % i, token=i) for i in range(5)], reports)
    fake.set_room(5)
    wait_until(lambda: reports.total() == 5, what="5 reports")
    fake.flush_error = KafkaException(KafkaError(KafkaError._FATAL, "fenced"))
    assert client.release(1.0) is True
    assert client.closed
    assert client._thread is None or not client._thread.is_alive(), "the poller thread stopped"
    assert reports.ok == Counter(range(5))
    assert client.pending() == 0


def test_an_idempotent_producers_fatal_error_fails_every_later_record(fake_producer: Any) -> None:
    """librdkafka's idempotent producer reports its fatal errors (a broken sequence: the client must be replaced)
    through the error callback as the code _FATAL with ``fatal()`` false. Records handed over after it fail at
    once, saying so, instead of going to a client that can send nothing any more."""
    from volley.errors import DeliveryError

    client, fake = fake_producer()
    client.acquire()
    fatal = KafkaError(KafkaError._FATAL, "Fatal error: Broker: Broker received an out of order sequence number")
    assert not fatal.fatal()
    fake.config["error_cb"](fatal)  # librdkafka calls it from the producer's poll
    reports = Reports()
    client.produce([OutgoingMessage("out", b"after", token=1)], reports)
    wait_until(lambda: reports.total() >= 1, what="the record's report")
    client.release(5.0)
    assert fake.sent == [], "nothing handed to the dead client"
    assert isinstance(reports.failed.get(1), DeliveryError), reports.failed
    assert "must be restarted" in str(reports.failed[1])


class LagLog:
    """An observer taking only the lag event (volley.ports.LagObserver)."""

    def __init__(self) -> None:
        self.reports: list[dict[PartitionId, int]] = []

    def on_lag(self, app_name: str, lag: Any) -> None:
        self.reports.append(dict(lag))


async def test_no_lag_is_reported_while_a_rebalance_is_in_progress(fakes: None) -> None:
    """lag() answers {} while a rebalance callback waits for the loop (its assignment is changing), and the
    consumer reported that {} to its observer: volley-prometheus withdrew every lag series and the next report
    brought them back, so dashboards flickered at each rebalance. Nothing is reported then; the report is due
    again as soon as the rebalance is over."""
    consumer, fake = await consumer_of()
    p0 = ("in", 0)
    fake.add("in", 0, [b"m0", b"m1", b"m2"])
    fake.rebalance("assign", [p0])
    log = LagLog()
    consumer.instrument(MultiObserver([log]), "app")
    try:
        await take(consumer, 1)
        log.reports.clear()  # what consuming reported
        consumer._fetcher.rebalancing = True
        consumer._next_lag = 0.0  # a report is due
        consumer._commit_async(time.monotonic())
        assert log.reports == [], "a lag report during a rebalance"
        consumer._fetcher.rebalancing = False
        consumer._commit_async(time.monotonic())
        assert len(log.reports) == 1, "due again once the rebalance is over"
    finally:
        await consumer.close()
