"""Where the Kafka producer's delivery reports are served: on the event loop while it produces.

librdkafka calls each record's delivery callback with the GIL taken for that one record. Served by the poller
thread while the loop runs Python, every report takes the GIL from the loop (two thread switches a record); on
the loop they cost none. A fake ``confluent_kafka.Producer`` whose records are reported only once the test lets
them makes it deterministic: no poller thread runs in these tests unless one says so.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

from volley.message import OutgoingMessage
from volley.ports import DeliveryFailure
from volley_kafka import producer as producer_module
from volley_kafka.producer import ProducerClient


class HeldProducer:
    """``confluent_kafka.Producer`` whose records are reported only after ``deliver()``; notes who polled."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self._lock = threading.Lock()
        self.held: list[Callable[[Any, Any], None]] = []  # produced, not yet deliverable
        self.ready: list[Callable[[Any, Any], None]] = []  # deliverable: the next poll reports them
        self.served_on: list[int] = []  # the thread of each report
        self.closed = False
        self.polls_after_close = 0

    def produce(self, topic: str, value: bytes, key: Any, partition: int, on_delivery: Any, timestamp: Any,
                flags: Any, headers: Any) -> None:
        with self._lock:
            self.held.append(on_delivery)

    def deliver(self) -> None:
        with self._lock:
            self.ready.extend(self.held)
            self.held.clear()

    def poll(self, timeout: float = -1) -> int:
        if self.closed:
            self.polls_after_close += 1
            raise RuntimeError("Producer has been closed")
        with self._lock:
            ready, self.ready = self.ready, []
        for report in ready:
            self.served_on.append(threading.get_ident())
            report(None, None)
        if not ready and timeout > 0:
            time.sleep(min(timeout, 0.005))  # librdkafka's wait for an event, shortened
        return len(ready)

    def flush(self, timeout: float = -1) -> int:
        self.deliver()
        self.poll(0)
        return 0

    def purge(self, *_args: Any) -> None:
        return None

    def close(self) -> None:
        self.closed = True

    def list_topics(self, *_args: Any, **_kwargs: Any) -> None:
        return None

    def __len__(self) -> int:
        with self._lock:
            return len(self.held) + len(self.ready)


class Delivered:
    def __init__(self) -> None:
        self.tokens: list[int] = []

    def __call__(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        assert not failed
        self.tokens.extend(int(m.token) for m in delivered)


async def until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.002)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[], tuple[ProducerClient, HeldProducer]]]:
    made: list[ProducerClient] = []

    def make() -> tuple[ProducerClient, HeldProducer]:
        monkeypatch.setattr(producer_module.confluent_kafka, "Producer", HeldProducer)
        client = ProducerClient({"bootstrap.servers": "fake:9092"}, "held")
        made.append(client)
        return client, client.producer

    yield make
    for client in made:
        if not client.closed:
            client.release(1.0)


async def test_the_loop_serves_the_reports_of_what_it_produced(held: Any) -> None:
    """No poller thread: the reports still come, served on the loop, also those that arrive after the loop went
    idle (it polls again while records are in flight)."""
    client, fake = held()
    delivered = Delivered()
    client.produce([OutgoingMessage("out", b"a", token=1), OutgoingMessage("out", b"b", token=2)], delivered)
    await asyncio.sleep(0)  # the loop's first serve: nothing is deliverable yet
    fake.deliver()  # the broker answers later, while the loop has nothing else to do
    await until(lambda: delivered.tokens == [1, 2], "both reports")
    assert fake.served_on == [threading.get_ident()] * 2, "served on the loop's thread"
    await until(lambda: client._loop_serve is None, "the loop stops polling once nothing is in flight")


async def test_the_poller_serves_reports_when_no_loop_produces(held: Any) -> None:
    """Producing from a thread with no loop (a tool): the poller thread serves the reports, as before."""
    client, fake = held()
    client.acquire()
    delivered = Delivered()
    await asyncio.to_thread(client.produce, [OutgoingMessage("out", b"a", token=7)], delivered)
    fake.deliver()
    await until(lambda: delivered.tokens == [7], "the report")
    assert client._thread is not None
    assert fake.served_on == [client._thread.ident]


async def test_no_poll_on_the_loop_after_the_client_closed(held: Any) -> None:
    """The loop polls every millisecond while records are in flight; closing the client (on a thread, as
    KafkaProducer.close does) must not leave a poll of the loop's to run on a closed client."""
    client, fake = held()
    client.acquire()
    delivered = Delivered()
    client.produce([OutgoingMessage("out", b"a", token=1)], delivered)
    await until(lambda: client._loop_served > 0, "the loop's first serve")
    assert await asyncio.to_thread(client.release, 1.0) is True
    assert delivered.tokens == [1], "the close flushed the record"
    await until(lambda: client._loop_serve is None, "the loop's polling ended")
    assert fake.polls_after_close == 0
