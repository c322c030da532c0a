"""Retries on the in-memory broker: the handler's exponential backoff, and outputs the broker fails to deliver.

What docs/dead-letters.md promises:
- a handler call that raises is retried in place up to ``max_retries`` times, ``retry_backoff_seconds`` * 2 ** (n - 1)
  before the n-th retry, each delay capped by ``retry_backoff_max_seconds``;
- an output the producer reports as failed is produced again, up to ``max_retries`` times with the same backoff;
  if it still fails it is not dead-lettered: its input is given back unacknowledged, counted as ``failed`` and
  reported, and ``on_failure`` decides whether the app stops (``DeliveryError``) or goes on.
"""

from __future__ import annotations

import itertools
import threading
import time
from dataclasses import dataclass
from typing import Any

import pytest
from engine_fakes import FlakyProducer, wait_for

from volley import DeliveryError, Engine, MemoryBroker
from volley.memory import MemoryProducer
from volley.message import Envelope

BASE = 0.05  # retry_backoff_seconds
SLACK = 0.005  # timer and clock granularity: a delay never ends earlier than this before its due time


@dataclass
class Item:
    n: int
    key: str = "a"


@dataclass
class Doubled:
    n: int


def make_engine(broker: MemoryBroker, *, dlq: bool = True, producer: MemoryProducer | None = None,
                **kwargs: Any) -> Engine:
    def memory(value: str, **settings: Any) -> dict[str, Any]:
        queue: dict[str, Any] = {"value": value, "profile": "memory", "config": {"broker": broker}, **settings}
        if producer is not None:
            queue["producer"] = lambda spec: producer  # one producer for every output (and the DLQ)
        return queue

    queues = {"in": memory("in", data_model=Item), "out": memory("out", data_model=Doubled),
              "dlq": memory("dlq", profile="memory-dlq")}
    settings: dict[str, Any] = {"metrics_port": None, "poll_interval_seconds": 0.02, "retry_backoff_seconds": BASE}
    settings.update(kwargs)
    return Engine(app_name="retries", input_queue="in", output_queues=["out"],
                  dead_letter_queue="dlq" if dlq else None, queue_config=queues, **settings)


def seed(broker: MemoryBroker, engine: Engine, items: list[Item]) -> None:
    for item in items:
        broker.publish("in", engine.input.encode(item), key=item.key.encode())


def gaps(times: list[float]) -> list[float]:
    return [later - earlier for earlier, later in itertools.pairwise(times)]


def assert_backoff(times: list[float], retries: int, cap: float = float("inf")) -> None:
    """``times`` are one try and ``retries`` retries, each delayed by BASE * 2 ** (n - 1) (capped): never less, and not
    much more (generous tolerance for a loaded machine)."""
    assert len(times) == 1 + retries, times
    observed = gaps(times)
    nominal = [min(cap, BASE * 2 ** n) for n in range(retries)]
    for n, (gap, due) in enumerate(zip(observed, nominal, strict=True)):
        assert gap >= due - SLACK, f"retry {n + 1} came after {gap:.3f} s, before its backoff of {due} s: {observed}"
        assert gap <= due + 0.5, f"retry {n + 1} came after {gap:.3f} s, far past its backoff of {due} s: {observed}"


def given_back(broker: MemoryBroker) -> list[Envelope]:
    """The inputs that come back to the queue (after their redelivery delay, or at once after a shutdown)."""
    wait_for(lambda: broker.depth("in") > 0)
    return broker.take("in", 100, owner=-1)


# ---------------------------------------------------------------------- handler retries


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_handler_retries_back_off_exponentially(use_async: bool) -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, max_retries=4)
    seed(broker, engine, [Item(1)])
    calls: list[float] = []

    def behave(item: Item) -> Any:
        calls.append(time.monotonic())
        if len(calls) <= 4:
            raise RuntimeError(f"failure {len(calls)}")
        return [("out", Doubled(item.n * 2))]

    if use_async:
        @engine.stream_app
        async def handler(item: Item) -> Any:
            return behave(item)
    else:
        @engine.stream_app
        def handler(item: Item) -> Any:
            return behave(item)

    report = handler.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert_backoff(calls, 4)  # 0.05, 0.1, 0.2, 0.4 s
    observed = gaps(calls)
    for earlier, later in itertools.pairwise(observed):  # geometric: each delay about twice the last
        assert later >= 1.5 * earlier - 0.1, observed
    assert observed[-1] >= 4 * observed[0] - 0.1, observed
    assert report.retries == 4 and report.acked == 1 and report.dead_lettered == 0
    assert broker.produced("out") == [b'{"n":2}'] and broker.acked("in") == 1


def test_handler_backoff_is_capped_by_retry_backoff_max_seconds() -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, max_retries=4, retry_backoff_max_seconds=0.08)
    seed(broker, engine, [Item(1)])
    calls: list[float] = []

    @engine.stream_app
    def always_fails(item: Item) -> bool:
        calls.append(time.monotonic())
        raise RuntimeError("never works")

    report = always_fails.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert_backoff(calls, 4, cap=0.08)  # 0.05, 0.08, 0.08, 0.08 s
    assert max(gaps(calls)) < 0.08 + 0.3  # uncapped, the last one would be 0.4 s
    assert report.retries == 4 and report.dead_lettered == 1
    [dead] = broker.produced_records("dlq")
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"handler"


# ---------------------------------------------------------------------- delivery failures


@pytest.mark.parametrize("how", ["report", "raise"])
def test_a_transient_delivery_failure_is_retried_with_backoff_and_the_input_acked(how: str) -> None:
    broker = MemoryBroker()
    producer = FlakyProducer(broker, lambda m: 3 if m.value == b'{"n":4}' else 0, how)
    engine = make_engine(broker, producer=producer, max_retries=3)
    seed(broker, engine, [Item(1), Item(2), Item(3)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n * 2))]

    report = double.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert_backoff(producer.times("out", b'{"n":4}'), 3)  # failed 3 times, delivered on the last retry
    # Every re-produce is counted. A refused call fails all of its records, so there the outputs that shared
    # the first call with the failing one are produced again (once) too.
    assert report.retries == sum(len(times) - 1 for times in producer.attempts.values())
    if how == "report":
        assert report.retries == 3
    else:
        assert all(len(producer.times("out", v)) <= 2 for v in (b'{"n":2}', b'{"n":6}'))
    assert report.acked == 3 and report.failed == 0 and report.errors == []
    assert sorted(broker.produced("out")) == [b'{"n":2}', b'{"n":4}', b'{"n":6}']  # stored once each
    assert broker.acked("in") == 3 and broker.is_idle("in")
    assert broker.produced("dlq") == []


def test_a_dead_letter_that_fails_to_deliver_once_is_retried() -> None:
    broker = MemoryBroker()
    producer = FlakyProducer(broker, lambda m: 1 if m.topic == "dlq" else 0)
    engine = make_engine(broker, producer=producer, max_retries=1)
    seed(broker, engine, [Item(1), Item(2)])

    @engine.stream_app
    def picky(item: Item) -> list[tuple[str, Doubled]]:
        if item.n == 1:
            raise ValueError("no ones")
        return [("out", Doubled(item.n))]

    report = picky.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    [dead] = broker.produced_records("dlq")
    assert dead.value == engine.input.encode(Item(1)) and dead.headers is not None
    assert dead.headers["volley-error-stage"] == b"handler"
    assert report.retries == 2  # one handler retry, one delivery retry of the dead letter
    assert report.dead_lettered == 1 and report.acked == 1 and report.failed == 0
    assert broker.acked("in") == 2 and broker.is_idle("in")


@pytest.mark.parametrize("dlq", [True, False], ids=["with-dlq", "without-dlq"])
def test_a_permanent_delivery_failure_with_continue_gives_the_input_back_and_goes_on(dlq: bool) -> None:
    broker = MemoryBroker()
    producer = FlakyProducer(broker, lambda m: 10**6 if m.value == b'{"n":4}' else 0)
    engine = make_engine(broker, dlq=dlq, producer=producer, max_retries=2, on_failure="continue",
                         redelivery_delay_seconds=0.3)
    seed(broker, engine, [Item(1), Item(2), Item(3)])  # one key: 3 is handled after 2's output was given up

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n * 2))]

    # It cannot drain (the given-back input is due again): stop once the three inputs are settled.
    report = double.run_until_drained(timeout=10, drain_idle_seconds=0.0, max_messages=3)
    assert_backoff(producer.times("out", b'{"n":4}'), 2)  # tried, then retried max_retries times
    assert report.retries == 2
    assert report.failed == 1 and report.acked == 2 and report.dead_lettered == 0 and report.nacked == 0
    [error] = report.errors
    assert "'out'" in error and "broker unavailable" in error, error
    assert sorted(broker.produced("out")) == [b'{"n":2}', b'{"n":6}']  # the later input was still processed
    assert broker.produced("dlq") == []  # not dead-lettered: the content is fine, the broker is the problem
    assert broker.acked("in") == 2 and broker.unacked("in") == 0
    [back] = given_back(broker)  # given back unacknowledged, delivered again later
    assert back.value == engine.input.encode(Item(2)) and back.attempt == 2


def test_a_permanent_delivery_failure_stops_the_app_by_default_and_leaves_the_input_unacked() -> None:
    broker = MemoryBroker()
    producer = FlakyProducer(broker, lambda m: 10**6 if m.value == b'{"n":2}' else 0)
    engine = make_engine(broker, producer=producer, max_retries=2, redelivery_delay_seconds=0.3)
    assert engine.on_failure == "stop"
    seed(broker, engine, [Item(1), Item(2), Item(3)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n * 2))]

    with pytest.raises(DeliveryError, match=r"output to 'out' of input in\[0\]@\d+ could not be delivered"):
        double.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert_backoff(producer.times("out", b'{"n":2}'), 2)
    assert broker.produced("dlq") == []
    # The inputs that finished before the stop are acknowledged at the graceful shutdown; the failed one is not.
    assert broker.acked("in") == 2 and broker.unacked("in") == 0
    [back] = given_back(broker)
    assert back.value == engine.input.encode(Item(1)) and back.attempt == 2


def test_every_output_gets_its_own_delivery_retries() -> None:
    """Issue 11, bug 3: delivery attempts were counted by id(message) and never forgotten on success."""
    broker = MemoryBroker()
    producer = FlakyProducer(broker, lambda m: 1)  # every output fails once, then is delivered
    engine = make_engine(broker, producer=producer, max_retries=1, retry_backoff_seconds=0.0,
                         consume_batch_size=1, max_in_flight=1, on_failure="continue",
                         redelivery_delay_seconds=60.0, retry_backoff_max_seconds=60.0)
    seed(broker, engine, [Item(n) for n in range(100)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n))]

    # One input at a time, so that each output is freed before the next one is made.
    report = double.run_until_drained(timeout=30, drain_idle_seconds=0.0, max_messages=100)
    given_up = [value for (_, value), times in producer.attempts.items() if len(times) < 2]
    assert given_up == [], f"{len(given_up)} output(s) given up without their retry: {report.errors[:2]}"
    assert report.failed == 0 and report.retries == 100 and report.acked == 100


def test_an_output_waiting_to_be_produced_again_is_not_sent_after_shutdown() -> None:
    """Issue 11, suspected: a re-produce timer firing after the producers closed. Shutdown cancels the waiting
    retries: the output is not produced again after the run, and its input is abandoned (delivered again)."""
    broker = MemoryBroker()
    producer = FlakyProducer(broker, lambda m: 1)  # the first delivery fails; its retry would be delivered
    engine = make_engine(broker, producer=producer, max_retries=3, retry_backoff_seconds=30.0,
                         shutdown_timeout_seconds=0.3)
    seed(broker, engine, [Item(1)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n * 2))]

    def stop_once_the_delivery_failed() -> None:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not (producer.threads and not producer.threads[0].is_alive()):
            time.sleep(0.005)
        double.stop()

    threading.Thread(target=stop_once_the_delivery_failed, daemon=True).start()
    started = time.monotonic()
    report = double.run_until_drained(timeout=10)
    assert time.monotonic() - started < 5, "shutdown waited for the 30 s backoff"
    attempts = sum(len(times) for times in producer.attempts.values())
    assert attempts == 1, "the output was produced again after the run"
    assert report.abandoned == 1 and report.acked == 0 and report.produced == 1, report
    assert report.retries == 0, "the retry that shutdown cancelled was counted"
    assert broker.produced("out") == [] and broker.acked("in") == 0


def test_a_delivery_failing_during_shutdown_gives_the_input_back_without_turning_the_stop_into_an_error() -> None:
    """Found in review: once the app was stopping, the first failed delivery of an output was final: the input
    counted as failed and, with the default on_failure="stop", a graceful stop ended in a DeliveryError (exit
    status 1 for a deploy) for a record that had all its retries left. It is given back instead (delivered
    again after the restart) and the stop stays clean."""
    broker = MemoryBroker()
    producer = FlakyProducer(broker, lambda m: 1)  # the first delivery fails (after the stop began)
    engine = make_engine(broker, producer=producer, max_retries=3, sync_handler_mode="thread",
                         shutdown_timeout_seconds=5.0)
    seed(broker, engine, [Item(1)])
    called, release = threading.Event(), threading.Event()

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        called.set()
        release.wait(10)
        return [("out", Doubled(item.n * 2))]

    def stop_during_the_call() -> None:
        if called.wait(10):
            double.stop()
            release.set()

    threading.Thread(target=stop_during_the_call, daemon=True).start()
    report = double.run_until_drained(timeout=10)  # raised DeliveryError before the fix
    assert report.abandoned == 1 and report.failed == 0 and report.acked == 0, report
    assert broker.acked("in") == 0 and broker.produced("dlq") == []
    assert given_back(broker)[0].value == engine.input.encode(Item(1))
