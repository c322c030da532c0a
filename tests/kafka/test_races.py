"""Races and rebalance paths of the Kafka adapter made deterministic with fake confluent-kafka clients.

The fakes stand in for ``confluent_kafka.Producer`` / ``Consumer`` (patched where the adapter looks them
up), so that an interleaving of threads, or a rebalance in the middle of a fetch, happens every run
instead of once in a while on a real broker. What the real broker does is tested in test_adapter.py.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import confluent_kafka
import pytest

from volley.message import OutgoingMessage
from volley.ports import DeliveryFailure
from volley_kafka import producer as producer_module
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
        self.abort_failures = 0  # abort_transaction raises this many times first

    def set_room(self, room: int) -> None:
        with self._lock:
            self.room = room
            self._lock.notify_all()

    def produce(self, topic: str, value: bytes, key: Any, partition: int, on_delivery: Any, timestamp: Any,
                flags: Any, headers: Any) -> None:
        if value == self.gate_value:
            try:  # the buggy drain: the other thread reads the same head and produces it too
                self.gate.wait(RENDEZVOUS)
            except threading.BrokenBarrierError:
                pass
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
        self.transaction_calls.append("begin")

    def send_offsets_to_transaction(self, offsets: Any, metadata: Any, *_args: Any) -> None:
        self.transaction_calls.append(f"offsets:{metadata}")

    def commit_transaction(self, *_args: Any) -> None:
        self.transaction_calls.append("commit")

    def abort_transaction(self, *_args: Any) -> None:
        self.transaction_calls.append("abort")
        if self.abort_failures > 0:
            self.abort_failures -= 1
            raise confluent_kafka.KafkaException(confluent_kafka.KafkaError(confluent_kafka.KafkaError._TIMED_OUT))


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


@pytest.fixture
def fake_producer(monkeypatch: pytest.MonkeyPatch) -> Callable[..., tuple[ProducerClient, FakeProducer]]:
    made: list[ProducerClient] = []

    def make(config: dict[str, Any] | None = None) -> tuple[ProducerClient, FakeProducer]:
        monkeypatch.setattr(producer_module.confluent_kafka, "Producer", FakeProducer)
        client = ProducerClient(config or {"bootstrap.servers": "fake:9092"}, "fake")
        made.append(client)
        return client, client.producer

    yield make
    for client in made:
        if not client.closed:
            client.release(1.0)


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
