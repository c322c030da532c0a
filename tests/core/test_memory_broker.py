"""The in-memory broker itself: yielding on empty polls, one scheduler thread for delays, a bounded log,
all-or-nothing produce calls with validated options."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

import pytest

from volley import ConfigurationError, Engine, MemoryBroker, memory
from volley.errors import InvalidRecordError
from volley.memory import MemoryConsumer
from volley.message import OutgoingMessage
from volley.ports import InstantlyDrainable


async def test_an_empty_poll_without_timeout_still_yields_to_the_event_loop() -> None:
    """consume(timeout=0) on an empty queue must await something: a fetch loop polling with
    poll_interval_seconds=0 would otherwise never let another task run."""
    broker = MemoryBroker()
    consumer = MemoryConsumer(broker, "empty")
    await consumer.start()
    ran = asyncio.Event()
    asyncio.get_running_loop().call_soon(ran.set)
    assert await consumer.consume(10, 0) == []
    assert ran.is_set(), "consume(timeout=0) returned without letting the event loop run"


def test_an_engine_polling_with_no_interval_processes_and_stops() -> None:
    """poll_interval_seconds=0: the app still processes its input and the drain check stops it."""
    broker = MemoryBroker()
    queues = {
        "in": {"value": "in", "profile": "memory", "config": {"broker": broker}},
        "out": {"value": "out", "profile": "memory", "config": {"broker": broker}},
    }
    engine = Engine(app_name="zero-poll", input_queue="in", output_queues=["out"], queue_config=queues,
                    metrics_port=None, poll_interval_seconds=0)
    for n in range(5):
        broker.publish("in", engine.input.encode({"n": n}))

    @engine.stream_app
    def forward(message: dict[str, int]) -> list[tuple[str, dict[str, int]]]:
        return [("out", message)]

    outcome: list[object] = []

    def run() -> None:
        outcome.append(forward.run_until_drained(timeout=5, drain_idle_seconds=0.0))

    thread = threading.Thread(target=run, daemon=True)  # a spinning loop would hang the test, not end it
    thread.start()
    thread.join(15)
    assert not thread.is_alive(), "the engine never yielded: run_until_drained(timeout=5) did not return"
    assert len(broker.produced("out")) == 5


async def test_the_memory_consumer_declares_an_instant_exact_drain_check() -> None:
    broker = MemoryBroker()
    consumer = MemoryConsumer(broker, "q")
    await consumer.start()
    assert isinstance(consumer, InstantlyDrainable)
    assert consumer.is_drained_now() is True
    broker.publish("q", b"x")
    assert consumer.is_drained_now() is False
    batch = await consumer.consume(1, 0)
    assert consumer.is_drained_now() is False  # held by this consumer until acked
    await consumer.ack(batch)
    assert consumer.is_drained_now() is True


def _wait_until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, what
        time.sleep(0.005)


def _scheduler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("volley-memory-scheduler")]


def test_a_thousand_delayed_records_need_one_thread_and_arrive_after_their_delay() -> None:
    broker = MemoryBroker()
    before = threading.active_count()
    peak = before
    sent: list[float] = []
    delay = 0.2
    for n in range(1000):
        sent.append(time.time())
        broker.publish_many([OutgoingMessage("later", str(n).encode(), delay=delay)])
        peak = max(peak, threading.active_count())
    assert peak <= before + 1, f"{peak - before} threads started for 1000 delayed records"
    assert not broker.is_idle("later")  # pending while delayed
    _wait_until(lambda: broker.depth("later") == 1000, 10, "the delayed records never all arrived")
    records = broker.produced_records("later")
    assert [r.value for r in records] == [str(n).encode() for n in range(1000)]
    late = [r.timestamp - sent[n] for n, r in enumerate(records) if r.timestamp is not None]
    assert len(late) == 1000 and min(late) >= delay - 0.005, min(late)  # time.time() vs monotonic: 5 ms slack


def test_a_thousand_delayed_nacks_need_one_thread_and_come_back_after_their_delay() -> None:
    broker = MemoryBroker()
    for n in range(1000):
        broker.publish("q", str(n).encode())
    taken = broker.take("q", 1000, owner=1)
    before = threading.active_count()
    peak = before
    nacked = time.monotonic()
    for envelope in taken:
        broker.nack("q", [envelope.position], delay=0.2, owner=1)
        peak = max(peak, threading.active_count())
    assert peak <= before + 1, f"{peak - before} threads started for 1000 delayed nacks"
    assert broker.depth("q") == 0 or time.monotonic() - nacked >= 0.2
    assert not broker.is_idle("q")
    _wait_until(lambda: broker.depth("q") == 1000, 10, "the nacked records never all came back")
    assert time.monotonic() - nacked >= 0.2
    again = broker.take("q", 1000, owner=2)
    assert sorted(int(e.value) for e in again) == list(range(1000))
    assert {e.attempt for e in again} == {2}


def test_the_scheduler_thread_ends_when_idle_and_on_close() -> None:
    broker = MemoryBroker()
    broker.publish_many([OutgoingMessage("later", b"x", delay=0.01)])
    assert len(_scheduler_threads()) >= 1
    _wait_until(lambda: broker.depth("later") == 1, 5, "the delayed record never arrived")
    _wait_until(lambda: broker._scheduler.thread() is None, 5, "the idle scheduler thread never ended")

    broker.publish_many([OutgoingMessage("later", b"y", delay=60)])
    thread = broker._scheduler.thread()
    assert thread is not None and thread.daemon
    broker.close()
    assert not thread.is_alive()
    assert broker.depth("later") == 2  # not lost: made ready at close
    assert broker.is_idle("later") is False and broker.take("later", 10)  # the queue is still usable


def test_the_log_of_published_messages_is_bounded() -> None:
    broker = MemoryBroker(log_limit=3)
    for n in range(5):
        broker.publish("q", str(n).encode())
    assert broker.produced("q") == [b"2", b"3", b"4"]
    assert [r.value for r in broker.produced_records("q")] == [b"2", b"3", b"4"]
    assert broker.depth("q") == 5  # the bound is on the log, never on the messages themselves
    assert MemoryBroker().log_limit == 100_000
    assert MemoryBroker(log_limit=None).log_limit is None
    with pytest.raises(ConfigurationError, match="log_limit"):
        MemoryBroker(log_limit=-1)


def test_the_process_wide_broker_keeps_a_short_log() -> None:
    previous = memory.default_broker()
    try:
        broker = memory.reset_default_broker()
        assert broker.log_limit == memory.DEFAULT_BROKER_LOG_LIMIT <= 10_000
        for n in range(memory.DEFAULT_BROKER_LOG_LIMIT + 10):
            broker.publish("q", str(n).encode())
        assert len(broker.produced("q")) == memory.DEFAULT_BROKER_LOG_LIMIT
        assert broker.produced("q")[-1] == str(memory.DEFAULT_BROKER_LOG_LIMIT + 9).encode()
    finally:
        memory.reset_default_broker(previous)


BAD_RECORDS = {
    "partition out of range": ({"partition": 3}, ValueError, r"record 1 of 3 .*1 partition\(s\) \(0 to 0\), not 3"),
    "partition not an int": ({"partition": "0"}, TypeError, "partition must be an int"),
    "partition a bool": ({"partition": True}, TypeError, "partition must be an int"),
    "negative delay": ({"delay": -1.0}, ValueError, "non-negative finite"),
    "infinite delay": ({"delay": float("inf")}, ValueError, "non-negative finite"),
    "nan delay": ({"delay": float("nan")}, ValueError, "non-negative finite"),
    "delay not a number": ({"delay": "soon"}, TypeError, "delay must be a number"),
    "key not bytes": ({"key": "k"}, TypeError, "key must be bytes"),
}


@pytest.mark.parametrize("case", list(BAD_RECORDS))
def test_a_bad_record_fails_its_whole_call_and_nothing_of_it_is_stored(case: str) -> None:
    """The broker stores a call all or nothing; the producer then reports each record for what it is: the bad
    one failed with InvalidRecordError (the engine dead-letters its input), the others stored."""
    options, error, message = BAD_RECORDS[case]
    broker = MemoryBroker()
    call = [OutgoingMessage("q", b"first"), OutgoingMessage("q", b"bad", **options),
            OutgoingMessage("q", b"last", delay=0.01)]
    with pytest.raises(error, match=message):
        broker.publish_many(call)
    assert broker.produced("q") == [] and broker.depth("q") == 0
    assert broker.is_idle("q"), "a record of the failed call is still counted as pending"
    assert broker._scheduler.thread() is None  # nothing of the call was scheduled either
    producer = memory.MemoryProducer(broker)
    reports: list[tuple[list[OutgoingMessage], list[tuple[OutgoingMessage, Exception]]]] = []
    producer.produce(call, lambda ok, failed: reports.append((list(ok), list(failed))))
    [(delivered, failed)] = reports
    assert delivered == [call[0], call[2]] and [m for m, _ in failed] == [call[1]]
    assert isinstance(failed[0][1], InvalidRecordError)
