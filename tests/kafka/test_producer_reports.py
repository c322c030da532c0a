"""Where the Kafka producer's delivery reports are served: on the event loop while it produces.

librdkafka takes the GIL for each record's delivery callback on its own. Served by the poller thread while the
loop runs Python, every report contends with the loop for the GIL; on the loop they cost no contention. A fake
``confluent_kafka.Producer`` whose records are reported only once the test lets them makes it deterministic: no
poller thread runs in these tests unless one says so.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException
from kafka_fakes import producer_clients

from volley.errors import DeliveryError
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
        self.polls_on: list[int] = []  # the thread of each poll call
        self.raise_once: BaseException | None = None  # the next poll raises this (after serving nothing)
        self.room: int | None = None  # records the local queue holds (None: no limit)

    def produce(self, topic: str, value: bytes, key: Any, partition: int, on_delivery: Any, timestamp: Any,
                flags: Any, headers: Any) -> None:
        with self._lock:
            if self.room is not None and len(self.held) + len(self.ready) >= self.room:
                raise BufferError("Local: Queue full")
            self.held.append(on_delivery)

    def deliver(self) -> None:
        with self._lock:
            self.ready.extend(self.held)
            self.held.clear()

    def poll(self, timeout: float = -1) -> int:
        if self.closed:
            self.polls_after_close += 1
            raise RuntimeError("Producer has been closed")
        self.polls_on.append(threading.get_ident())
        error, self.raise_once = self.raise_once, None
        if error is not None:
            raise error
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
    def __init__(self, failures_allowed: bool = False) -> None:
        self.tokens: list[int] = []
        self.failed: dict[int, BaseException] = {}
        self.failures_allowed = failures_allowed

    def __call__(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        assert self.failures_allowed or not failed
        self.tokens.extend(int(m.token) for m in delivered)
        self.failed.update((int(m.token), exc) for m, exc in failed)


async def until(check: Callable[[], bool], what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.002)


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[..., tuple[ProducerClient, Any]]]:
    yield from producer_clients(monkeypatch, HeldProducer, "held")


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


async def test_a_fatal_error_raised_by_the_loops_poll_is_not_lost(held: Any, caplog: pytest.LogCaptureFixture) -> None:
    """librdkafka raises a fatal error (an idempotent producer's broken sequence, a fenced transactional id) once,
    from whichever poll serves it, instead of calling the error callback. Raised by the loop's poll it must be
    kept and reported as the poller does: later records fail at once, saying the producer must be restarted."""
    client, fake = held()
    fake.raise_once = KafkaException(KafkaError(KafkaError._FATAL, "Fatal error: out of order sequence number",
                                                fatal=True))
    delivered = Delivered(failures_allowed=True)
    with caplog.at_level("ERROR", logger="volley_kafka"):
        client.produce([OutgoingMessage("out", b"a", token=1)], delivered)
        await until(lambda: client.fatal is not None, "the fatal error kept")
    assert any("fatal Kafka producer error" in r.getMessage() for r in caplog.records)
    client.produce([OutgoingMessage("out", b"b", token=2)], delivered)
    client.dispatch()
    assert isinstance(delivered.failed.get(2), DeliveryError) and "must be restarted" in str(delivered.failed[2])


async def test_the_loop_stops_polling_when_no_report_comes_and_the_poller_takes_over(held: Any,
                                                                                    monkeypatch: Any) -> None:
    """Records stuck in flight (a broker down: up to message.timeout.ms) must not keep the loop polling every
    millisecond: once LOOP_HOLD has passed with no report, the loop stops and the poller thread waits in
    librdkafka instead, and serves what comes."""
    monkeypatch.setattr(producer_module, "LOOP_HOLD", 0.05)
    client, fake = held()
    client.acquire()
    delivered = Delivered()
    loop_thread = threading.get_ident()
    client.produce([OutgoingMessage("out", b"a", token=3)], delivered)
    await until(lambda: client._loop_serve is None and fake.polls_on.count(loop_thread) > 1,
                "the loop's polling ended")
    polled = fake.polls_on.count(loop_thread)
    assert polled <= 0.05 / producer_module.LOOP_SERVE_INTERVAL + 5, f"{polled} polls on the loop"
    fake.deliver()
    await until(lambda: delivered.tokens == [3], "the report")
    assert client._thread is not None
    assert fake.served_on == [client._thread.ident], "served by the poller"


async def test_a_loop_that_ended_with_a_serve_pending_does_not_keep_the_next_loop_from_serving(held: Any) -> None:
    """A shared client outlives an event loop that ended while its serve was scheduled: the next loop that
    produces serves its own reports (no poller thread runs here)."""
    client, fake = held()
    first = Delivered()

    def on_an_earlier_loop() -> None:
        async def produce() -> None:
            client.produce([OutgoingMessage("out", b"a", token=1)], first)

        asyncio.run(produce())  # ends with the loop's serve still scheduled: the record is in flight

    await asyncio.to_thread(on_an_earlier_loop)
    fake.deliver()
    delivered = Delivered()
    client.produce([OutgoingMessage("out", b"b", token=2)], delivered)
    fake.deliver()
    await until(lambda: delivered.tokens == [2] and first.tokens == [1], "both reports, served on this loop")
    assert fake.served_on[-2:] == [threading.get_ident()] * 2


async def test_a_poll_that_raises_while_making_room_fails_no_record_already_handed_over(held: Any) -> None:
    """The second record finds librdkafka's queue full and the poll meant to make room raises (a fatal error).
    produce() must not raise: the engine would take every record of the call for failed, the first one too,
    which librdkafka still reports later; a record reported twice can settle its input before its other
    outputs are confirmed. Each record is reported exactly once."""
    client, fake = held()
    fake.room = 1
    fake.raise_once = KafkaException(KafkaError(KafkaError._FATAL, "Fatal error: fenced", fatal=True))
    delivered = Delivered(failures_allowed=True)
    client.produce([OutgoingMessage("out", b"a", token=1), OutgoingMessage("out", b"b", token=2)], delivered)
    assert client.fatal is not None
    assert await asyncio.to_thread(client.release, 1.0) is True
    assert delivered.tokens == [1], "the record handed over is delivered, once"
    assert list(delivered.failed) == [2], "the one left waiting for room fails, once"


@pytest.mark.parametrize("callback", ["error_cb", "oauth_cb", "stats_cb", "throttle_cb"])
async def test_a_client_with_a_callback_of_the_users_is_polled_only_by_its_poller(held: Any, callback: str) -> None:
    """librdkafka runs the callbacks a user puts in the queue's config (an OAUTHBEARER token refresh, statistics,
    throttling) inside poll(), next to the delivery reports. A token fetch over HTTP may block for seconds
    (confluent-kafka before 2.13 runs oauth_cb in poll), which must not be on the event loop: such a client is
    polled by its poller thread only, as before the loop served reports, also when its queue is full."""
    client, fake = held({"bootstrap.servers": "fake:9092", callback: lambda *_args: None})
    client.acquire()
    fake.room = 1
    delivered = Delivered()
    loop_thread = threading.get_ident()
    client.produce([OutgoingMessage("out", b"a", token=1), OutgoingMessage("out", b"b", token=2)], delivered)
    await asyncio.sleep(0)  # the loop's first serve, scheduled by produce(), would run in this iteration
    fake.deliver()  # the first record; the second waits for room, then the poller sends it
    await until(lambda: delivered.tokens == [1] and len(fake) == 1, "the first report, the second record sent")
    fake.deliver()
    await until(lambda: delivered.tokens == [1, 2], "both reports")
    assert loop_thread not in fake.polls_on, "a poll on the event loop"
    assert client._thread is not None
    assert set(fake.served_on) == {client._thread.ident}


async def test_an_error_callback_of_the_users_is_called_after_volleys(held: Any,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    """An error_cb in the queue's config was replaced by Volley's without a word: a user's alerting on client
    errors stayed silent. Both run now, Volley's first (a fatal error is kept); what the user's raises is logged."""
    seen: list[Any] = []

    def users(error: Any) -> None:
        seen.append(error)
        raise RuntimeError("the user's callback failed")

    client, fake = held({"bootstrap.servers": "fake:9092", "error_cb": users})
    fatal = KafkaError(KafkaError._FATAL, "Fatal error: fenced", fatal=True)
    with caplog.at_level("ERROR", logger="volley_kafka"):
        fake.config["error_cb"](fatal)  # librdkafka calls it from a poll
    assert client.fatal is fatal and seen == [fatal]
    assert any("error_cb given in the queue's Kafka config raised" in r.getMessage() for r in caplog.records)
