"""The pipeline's guarantees on the in-memory broker: acks, DLQ, retries, order, backpressure, shutdown."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import engine_fakes as fakes
import pytest

from volley import Engine, HandlerFailedError, MemoryBroker, MessageContext
from volley.memory import MemoryConsumer, MemoryProducer
from volley.message import Envelope, OutgoingMessage
from volley.plugins import build_registry
from volley.ports import DeliveryCallback, InstantlyDrainable
from volley.run import sync_executor
from volley.testing import harness


@dataclass
class Item:
    n: int
    key: str = "a"


@dataclass
class Doubled:
    n: int


def make_engine(broker: MemoryBroker, *, dlq: bool = True, batch_size: int | None = None,
                ordering: str | None = None, **kwargs: Any) -> Engine:
    queues: dict[str, Any] = {
        "in": {"value": "in", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
        "out": {"value": "out", "profile": "memory", "data_model": Doubled, "config": {"broker": broker}},
        "other": {"value": "other", "profile": "memory", "data_model": Doubled, "config": {"broker": broker}},
        "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    if batch_size:
        queues["in"]["batch_size"] = batch_size
    if ordering:
        queues["in"]["ordering"] = ordering
    settings: dict[str, Any] = {"metrics_port": None, "poll_interval_seconds": 0.02, "retry_backoff_seconds": 0.0}
    settings.update(kwargs)
    return Engine(app_name="t", input_queue="in", output_queues=["out", "other"],
                  dead_letter_queue="dlq" if dlq else None, queue_config=queues, **settings)


def seed(broker: MemoryBroker, engine: Engine, items: list[Item]) -> None:
    for item in items:
        broker.publish("in", engine.input.encode(item), key=item.key.encode())


def test_the_one_output_fast_path_builds_the_record_the_constructor_builds() -> None:
    """routing's one-output path sets an OutgoingMessage's fields in place (no __init__ call per output): every slot
    must hold what ``OutgoingMessage(topic, value, token=input)`` holds, and none may be left unset."""
    handed: list[OutgoingMessage] = []

    class Recording(MemoryProducer):
        def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
            handed.extend(messages)
            super().produce(messages, on_delivery)

    broker = MemoryBroker()
    engine = fakes.make_engine(broker, fakes.Connector(broker, producer=Recording))
    fakes.publish(broker, 3)

    @engine.stream_app
    def forward(item: fakes.Item) -> list[tuple[str, fakes.Item]]:
        return [("out", fakes.Item(item.n + 1))]

    assert forward.run_until_drained(timeout=10).acked == 3
    assert len(handed) == 3

    def slots(record: OutgoingMessage) -> dict[str, Any]:
        return {name: getattr(record, name, "<unset>") for name in OutgoingMessage.__slots__}

    for record in handed:
        assert type(record) is OutgoingMessage
        assert slots(record) == slots(OutgoingMessage(record.topic, record.value, token=record.token))
        assert record.topic == "out" and isinstance(record.token, Envelope)


def test_outputs_are_produced_and_inputs_acked() -> None:
    broker = MemoryBroker()
    engine = make_engine(broker)
    seed(broker, engine, [Item(n) for n in range(50)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n * 2))]

    report = double.run_until_drained(timeout=10)
    assert report.acked == 50 and report.consumed == 50
    assert broker.produced("out") == [b'{"n":%d}' % (2 * n) for n in range(50)]
    assert broker.is_idle("in") and broker.acked("in") == 50


def test_harness_round_trips_through_the_queue_codecs() -> None:
    engine = make_engine(MemoryBroker())

    @engine.stream_app
    def fan_out(item: Item, msg_ctx: MessageContext) -> list[tuple[str, Doubled, dict[str, Any]]]:
        assert msg_ctx.queue_name == "in"
        return [("out", Doubled(item.n), {"key": item.key, "headers": {"origin": "test"}}),
                ("other", Doubled(-item.n))]

    h = harness(fan_out)
    h.send_many([Item(1, "x"), Item(2, "y")])
    result = h.run()
    assert result.outputs("out") == [Doubled(1), Doubled(2)]
    assert result.outputs("other") == [Doubled(-1), Doubled(-2)]
    assert [e.key for e in result.raw("out")] == [b"x", b"y"]
    assert result.raw("out")[0].headers == {"origin": b"test"}
    assert result.report.acked == 2


def test_undecodable_and_invalid_messages_go_to_the_dlq_raw_with_reasons() -> None:
    engine = make_engine(MemoryBroker())

    @engine.stream_app
    def ok(item: Item) -> bool:
        return True

    h = harness(ok)
    h.send(b"\xff not json", raw=True, key="k1", headers={"trace": "abc"})
    h.send(b'{"wrong": 1}', raw=True)
    h.send(Item(3))
    result = h.run()
    dead = result.dead_letters
    assert [d.value for d in dead] == [b"\xff not json", b'{"wrong": 1}']
    assert dead[0].key == b"k1" and dead[0].headers is not None and dead[0].headers["trace"] == b"abc"
    assert dead[0].headers["volley-error-stage"] == b"deserialize"
    assert dead[0].headers["volley-error-type"] == b"SerializationError"
    assert dead[1].headers is not None and dead[1].headers["volley-error-stage"] == b"validate"
    assert b"wrong" in dead[1].headers["volley-error-reason"]
    assert result.report.dead_lettered == 2 and result.report.acked == 1


def test_handler_exceptions_are_retried_then_dead_lettered() -> None:
    calls: dict[int, int] = {}
    engine = make_engine(MemoryBroker(), max_retries=2)

    @engine.stream_app
    def flaky(item: Item) -> list[tuple[str, Doubled]]:
        calls[item.n] = calls.get(item.n, 0) + 1
        if item.n == 1 or (item.n == 2 and calls[2] < 3):
            raise RuntimeError(f"boom {item.n}")
        return [("out", Doubled(item.n))]

    h = harness(flaky)
    h.send_many([Item(0), Item(1), Item(2)])
    result = h.run()
    assert calls == {0: 1, 1: 3, 2: 3}
    assert result.outputs("out") == [Doubled(0), Doubled(2)]
    [dead] = result.dead_letters
    assert dead.headers is not None
    assert dead.headers["volley-error-stage"] == b"handler"
    assert dead.headers["volley-error-type"] == b"RuntimeError"
    assert dead.headers["volley-error-reason"] == b"RuntimeError: boom 1"
    assert result.report.retries == 4


def test_without_dlq_a_failure_stops_the_app_and_leaves_the_message_unacked() -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, dlq=False, max_retries=0)
    seed(broker, engine, [Item(1)])

    @engine.stream_app
    def broken(item: Item) -> bool:
        raise ValueError("cannot")

    with pytest.raises(HandlerFailedError, match=r"in\[0\]@\d+ failed at handler .*ValueError: cannot"):
        broken.run_until_drained(timeout=10)
    assert broker.acked("in") == 0
    deadline = time.monotonic() + 5  # given back after redelivery_delay_seconds, not lost
    while broker.depth("in") != 1 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert broker.depth("in") == 1


def test_without_dlq_continue_policy_reports_and_keeps_going() -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, dlq=False, max_retries=0, on_failure="continue", max_deliveries=1,
                         redelivery_delay_seconds=0.0)
    seed(broker, engine, [Item(1), Item(2)])

    @engine.stream_app
    def half(item: Item) -> list[tuple[str, Doubled]]:
        if item.n == 1:
            raise ValueError("no ones")
        return [("out", Doubled(item.n))]

    report = half.run_until_drained(timeout=10, max_messages=3)
    assert report.failed >= 1 and report.acked == 1
    assert broker.produced("out") == [b'{"n":2}']
    assert broker.acked("in") == 1


def test_returning_false_gives_the_message_back_until_max_deliveries_then_dlq() -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, max_deliveries=3, redelivery_delay_seconds=0.0)
    seed(broker, engine, [Item(7)])
    seen: list[int] = []

    @engine.stream_app
    def refuse(item: Item, msg_ctx: MessageContext) -> bool:
        seen.append(msg_ctx.attempt)
        return False

    report = refuse.run_until_drained(timeout=10)
    assert seen == [1, 2, 3]
    [dead] = broker.produced_records("dlq")
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"redelivery"
    assert report.nacked == 3 and report.dead_lettered == 1


def without_instant_drain_check(monkeypatch: pytest.MonkeyPatch) -> None:
    """Take away the memory consumer's is_drained_now (ports.InstantlyDrainable), as Kafka and RSMQ lack it.

    isinstance() against a runtime-checkable protocol caches its answer per class (abc), so the cache is
    cleared now and again when the attribute comes back."""
    monkeypatch.delattr(MemoryConsumer, "is_drained_now")
    InstantlyDrainable._abc_caches_clear()  # type: ignore[attr-defined]


@pytest.fixture(autouse=True)
def _fresh_protocol_caches() -> Any:
    yield
    InstantlyDrainable._abc_caches_clear()  # type: ignore[attr-defined]


@pytest.fixture(params=[True, False], ids=["instant-drain-check", "empty-poll"])
def drain_check(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> bool:
    """Both ways of deciding that the input is drained: the memory consumer's instant, exact is_drained()
    asked on the loop, and (as for Kafka or RSMQ) an empty poll after the last batch, then is_drained()."""
    instant: bool = request.param
    if not instant:
        without_instant_drain_check(monkeypatch)
    return instant


@pytest.mark.parametrize("use_async", [False, True])
def test_drained_means_drained_even_without_an_idle_wait(use_async: bool, drain_check: bool) -> None:
    """Between two batches, with everything settled, an app only looks idle: run_until_drained must not stop
    there (drain_idle_seconds=0 takes away the grace period that used to hide this)."""
    for _ in range(5):
        broker = MemoryBroker()
        engine = make_engine(broker, max_buffered=20, consume_batch_size=10)
        seed(broker, engine, [Item(n, key=str(n % 7)) for n in range(2_000)])

        if use_async:
            @engine.stream_app
            async def double(item: Item) -> list[tuple[str, Doubled]]:
                return [("out", Doubled(item.n * 2))]
        else:
            @engine.stream_app
            def double(item: Item) -> list[tuple[str, Doubled]]:
                return [("out", Doubled(item.n * 2))]

        report = double.run_until_drained(timeout=30, drain_idle_seconds=0.0)
        assert report.acked == 2_000, report
        assert broker.depth("in") == 0


@pytest.mark.parametrize("case", ["batch-handler", "idle-wait", "async-nacks"])
def test_drained_after_batches_idle_waits_and_redeliveries(case: str, drain_check: bool) -> None:
    """run_until_drained stops only once every input is done, whichever drain path decides, also with a batch
    handler, with an idle wait, and while an async handler keeps refusing first deliveries."""
    broker = MemoryBroker()
    engine = make_engine(broker, max_buffered=20, consume_batch_size=10,
                         batch_size=10 if case == "batch-handler" else None, redelivery_delay_seconds=0.01)
    seed(broker, engine, [Item(n, key=str(n % 7)) for n in range(300)])
    refused: list[int] = []

    if case == "batch-handler":
        @engine.stream_app
        def double_all(items: list[Item]) -> list[tuple[str, Doubled]]:
            return [("out", Doubled(item.n * 2)) for item in items]
        app = double_all
    else:
        @engine.stream_app
        async def double(item: Item, msg_ctx: MessageContext) -> bool | list[tuple[str, Doubled]]:
            await asyncio.sleep(0)
            if case == "async-nacks" and item.n % 10 == 0 and msg_ctx.attempt == 1:
                refused.append(item.n)
                return False
            return [("out", Doubled(item.n * 2))]
        app = double

    report = app.run_until_drained(timeout=30, drain_idle_seconds=0.2 if case == "idle-wait" else 0.0)
    assert report.acked == 300, report
    assert broker.depth("in") == 0 and broker.unacked("in") == 0
    assert sorted(json.loads(v)["n"] for v in broker.produced("out")) == [n * 2 for n in range(300)]
    if case == "async-nacks":
        assert sorted(refused) == list(range(0, 300, 10)) and report.nacked == 30


def test_an_instant_drain_check_needs_no_empty_poll() -> None:
    """With the memory consumer, run_until_drained stops once the last ack is through: it does not wait for
    a poll to come back empty (here that poll would wait a minute)."""
    broker = MemoryBroker()
    engine = make_engine(broker, poll_interval_seconds=60.0)
    seed(broker, engine, [Item(n) for n in range(100)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n * 2))]

    report = double.run_until_drained(timeout=30, drain_idle_seconds=0.0)
    assert report.acked == 100 and broker.depth("out") == 100


def test_without_the_instant_check_the_drain_waits_for_an_empty_poll() -> None:
    """The counterpart of the test above: without is_drained_now (InstantlyDrainable), the engine decides on the
    path Kafka and RSMQ take, which needs a poll to come back empty; with a one-minute poll
    that cannot happen in 1 s."""
    broker = MemoryBroker()
    engine = make_engine(broker, poll_interval_seconds=60.0)
    seed(broker, engine, [Item(n) for n in range(10)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n * 2))]

    with pytest.MonkeyPatch.context() as patch:
        without_instant_drain_check(patch)
        with pytest.raises(TimeoutError, match="did not drain its input within 1"):
            double.run_until_drained(timeout=1.0, drain_idle_seconds=0.0)
    assert broker.depth("out") == 10  # the work itself was done; only the decision waited


def test_a_delayed_message_is_never_out_of_sight_of_the_drain_check() -> None:
    """A delayed publish is counted as pending until the moment it is stored as ready, in one locked
    section: at no point between can is_drained() see an empty queue and stop an app early."""
    broker = MemoryBroker()
    lock = broker._lock
    seen: list[tuple[int, int]] = []

    class Watching:
        def __enter__(self) -> None:
            lock.acquire()

        def __exit__(self, *exc: object) -> None:
            try:
                queue = broker._queues.get("later")
                if queue is not None:
                    seen.append((queue.delayed, queue.ready()))
            finally:
                lock.release()

    broker._lock = Watching()  # type: ignore[assignment]
    broker.publish_many([OutgoingMessage("later", b"x", delay=0.05)])
    deadline = time.monotonic() + 5
    while broker.depth("later") == 0:
        assert time.monotonic() < deadline, "the delayed message never arrived"
        time.sleep(0.005)
    assert seen, "the broker never took its lock"
    assert all(delayed + ready >= 1 for delayed, ready in seen), seen
    assert seen[-1] == (0, 1)


def test_drained_waits_for_a_delayed_redelivery(drain_check: bool) -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, redelivery_delay_seconds=0.3)
    seed(broker, engine, [Item(1)])
    seen: list[int] = []

    @engine.stream_app
    def refuse_once(item: Item, msg_ctx: MessageContext) -> bool:
        seen.append(msg_ctx.attempt)
        return msg_ctx.attempt > 1

    report = refuse_once.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert seen == [1, 2]
    assert report.acked == 1 and report.nacked == 1


def test_output_of_the_wrong_type_is_a_clear_type_error_in_the_dlq() -> None:
    engine = make_engine(MemoryBroker())

    @engine.stream_app
    def wrong(item: Item) -> list[tuple[str, Any]]:
        return [("out", {"n": item.n})]

    h = harness(wrong)
    h.send(Item(1))
    result = h.run()
    [dead] = result.dead_letters
    assert dead.headers is not None
    assert dead.headers["volley-error-type"] == b"TypeError"
    reason = dead.headers["volley-error-reason"].decode()
    assert "expects Doubled" in reason and "returned dict" in reason
    assert result.outputs("out") == []


def test_unknown_output_queue_is_reported_with_the_known_ones() -> None:
    engine = make_engine(MemoryBroker())

    @engine.stream_app
    def misrouted(item: Item) -> list[tuple[str, Doubled]]:
        return [("nowhere", Doubled(1))]

    h = harness(misrouted)
    h.send(Item(1))
    [dead] = h.run().dead_letters
    assert dead.headers is not None and b"'nowhere' is not one of this app's output_queues" in \
        dead.headers["volley-error-reason"]


@pytest.mark.parametrize("name", [["out"], {"queue": "out"}], ids=["list", "dict"])
def test_an_unhashable_queue_name_in_a_single_output_goes_to_the_dlq_and_the_run_goes_on(name: Any) -> None:
    """Found in review: the one-output fast path looked the name up outside its try, so an unhashable name (a
    list, a dict) raised TypeError out of interpreting and ended the run, where any other bad output goes to the
    dead-letter queue at stage ``output``."""
    engine = make_engine(MemoryBroker())

    @engine.stream_app
    def odd(item: Item) -> list[tuple[Any, Doubled]]:
        return [(name, Doubled(item.n))] if item.n == 1 else [("out", Doubled(item.n))]

    h = harness(odd)
    for n in range(3):
        h.send(Item(n))
    result = h.run()
    [dead] = result.dead_letters
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"output"
    assert dead.headers["volley-error-type"] == b"TypeError"
    assert len(result.outputs("out")) == 2


def test_a_bad_second_output_sends_nothing() -> None:
    engine = make_engine(MemoryBroker())

    @engine.stream_app
    def half_bad(item: Item) -> list[tuple[str, Any]]:
        return [("out", Doubled(1)), ("other", "not a Doubled")]

    h = harness(half_bad)
    h.send(Item(1))
    result = h.run()
    assert result.outputs("out") == [] and len(result.dead_letters) == 1


def test_batch_handler_gets_lists_and_a_bad_record_fails_alone() -> None:
    batches: list[list[int]] = []
    engine = make_engine(MemoryBroker(), batch_size=4)

    @engine.stream_app
    def batch(items: list[Item]) -> list[tuple[str, Doubled]]:
        batches.append([i.n for i in items])
        return [("out", Doubled(sum(i.n for i in items)))]

    h = harness(batch)
    h.send_many([Item(n) for n in range(5)])
    h.send(b"garbage", raw=True)
    h.send_many([Item(n) for n in range(5, 8)])
    result = h.run()
    assert sorted(n for b in batches for n in b) == list(range(8))
    assert all(len(b) <= 4 for b in batches)
    assert len(result.dead_letters) == 1 and result.dead_letters[0].value == b"garbage"
    assert result.report.acked == 8


def test_async_handlers_run_concurrently_and_keep_per_key_order() -> None:
    broker = MemoryBroker(partitions=4)
    engine = make_engine(broker, ordering="key", max_in_flight=20)
    keys = [f"k{i}" for i in range(20)]
    seed(broker, engine, [Item(n, keys[n % 20]) for n in range(200)])
    seen: dict[str, list[int]] = {}
    running = 0
    peak = 0

    @engine.stream_app
    async def slow(item: Item) -> list[tuple[str, Doubled]]:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.005)
        seen.setdefault(item.key, []).append(item.n)
        running -= 1
        return [("out", Doubled(item.n))]

    report = slow.run_until_drained(timeout=20)
    assert report.acked == 200
    assert peak > 5  # concurrency actually happened
    assert peak <= 20  # and was bounded by max_in_flight
    for key, ns in seen.items():
        assert ns == sorted(ns), key


def ticks_while_blocked(app: Any, release: threading.Event, acked: int, wanted: int = 20) -> int:
    """Run the app while a coroutine ticks every 5 ms; release the blocked handler after ``wanted`` ticks (or 5 s).

    A handler blocking on ``release`` off the loop leaves the ticks running: ``wanted`` of them come quickly.
    On the loop, it stalls them until its wait times out, and fewer than ``wanted`` fit in the 5 s."""
    ticks = 0

    async def main() -> None:
        nonlocal ticks
        task = asyncio.ensure_future(app.run_async(stop_when_drained=True, drain_idle_seconds=0.05))
        deadline = time.monotonic() + 5
        while ticks < wanted and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
            ticks += 1
        release.set()
        report = await task
        assert report.acked == acked

    asyncio.run(main())
    return ticks


@pytest.mark.parametrize("mode", ["thread", "auto"])
def test_sync_handler_does_not_block_the_event_loop(mode: str) -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, sync_handler_mode=mode)
    # In auto mode the first slow call (here: item 0, 50 ms) runs inline and moves the app to the thread.
    seed(broker, engine, [Item(0), Item(1)])
    release = threading.Event()

    @engine.stream_app
    def blocking(item: Item) -> bool:
        if item.n == 0:
            time.sleep(0.05)
        else:
            release.wait(5)
        return True

    assert ticks_while_blocked(blocking, release, acked=2) >= 20


@pytest.mark.parametrize("observed", [False, True])
def test_a_handler_that_turns_slow_after_calibration_moves_off_the_loop(observed: bool) -> None:
    """Fast through the calibration batches, so it runs inline; then one very slow call must move it to the
    thread, so that the next (blocking) calls leave the event loop free."""
    broker = MemoryBroker()
    registry = build_registry()
    registry.entries["observer"] = {}
    engine = make_engine(broker, consume_batch_size=5, max_buffered=5, registry=registry,
                         observers=[TimingRecorder()] if observed else None)
    seed(broker, engine, [Item(n) for n in range(30)])
    release = threading.Event()

    @engine.stream_app
    def turns_slow(item: Item) -> bool:
        if item.n == 20:
            time.sleep(0.3)  # very slow: moves the handler to the thread at once
        elif item.n > 20:
            release.wait(5)  # would block the loop if it still ran inline
        return True

    ticks = ticks_while_blocked(turns_slow, release, acked=30)
    assert ticks >= 20, f"the event loop was blocked: {ticks} ticks"


class _Descheduling:
    """A clock for the sync executor that jumps forward, and the loop thread's wait for a CPU that grows with it
    when the jump is the OS's doing (the process descheduled on a loaded machine), not the handler's."""

    def __init__(self) -> None:
        self.offset = 0.0
        self.waited = 0.0

    def perf_counter(self) -> float:
        return time.perf_counter() + self.offset

    def __getattr__(self, name: str) -> Any:
        return getattr(time, name)

    def jump(self, seconds: float, *, by_the_os: bool) -> None:
        self.offset += seconds
        if by_the_os:
            self.waited += seconds

    def run_queue_wait(self) -> Any:
        clock = self

        class Waited:
            def __call__(self) -> float:
                return clock.waited

            def close(self) -> None:
                pass

        return Waited()


@pytest.mark.parametrize("by_the_os", [True, False])
def test_a_fast_handler_descheduled_by_the_os_stays_on_the_loop(monkeypatch: pytest.MonkeyPatch,
                                                                by_the_os: bool) -> None:
    """Two 30 ms gaps within a second move an inline handler to its thread for good when the handler caused
    them (it blocked), not when the OS kept the loop thread waiting for a CPU (a loaded machine): then every
    batch would pay a thread hop for nothing."""
    clock = _Descheduling()
    monkeypatch.setattr(sync_executor, "time", clock)
    monkeypatch.setattr(sync_executor, "RunQueueWait", clock.run_queue_wait, raising=False)
    broker = MemoryBroker()
    engine = make_engine(broker, consume_batch_size=5, max_buffered=5)
    seed(broker, engine, [Item(n) for n in range(40)])
    threads: dict[int, int] = {}

    @engine.stream_app
    def fast(item: Item) -> bool:
        threads[item.n] = threading.get_ident()
        if item.n in (20, 22):  # past the calibration batches: inline
            clock.jump(0.03, by_the_os=by_the_os)
        return True

    loop_thread: list[int] = []

    async def main() -> None:
        loop_thread.append(threading.get_ident())
        await fast.run_async(max_messages=40)

    asyncio.run(main())
    later = {threads[n] for n in range(25, 40)}
    if by_the_os:
        assert later == {loop_thread[0]}, "a fast handler left the event loop because the OS descheduled it"
    else:
        assert loop_thread[0] not in later, "a handler slow twice within a second still runs on the event loop"


def test_backpressure_bounds_unsettled_inputs() -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, max_buffered=30, consume_batch_size=10)
    seed(broker, engine, [Item(n) for n in range(300)])
    peak_held = 0

    @engine.stream_app
    def watch(item: Item) -> bool:
        nonlocal peak_held
        peak_held = max(peak_held, broker.unacked("in"))
        return True

    report = watch.run_until_drained(timeout=20)
    assert report.acked == 300
    assert 0 < peak_held <= 30


def test_stop_from_another_thread_shuts_down_gracefully() -> None:
    broker = MemoryBroker()
    engine = make_engine(broker)
    seed(broker, engine, [Item(n) for n in range(5)])
    handled = threading.Event()

    @engine.stream_app
    def handler(item: Item) -> bool:
        handled.set()
        return True

    result: list[Any] = []
    worker = threading.Thread(target=lambda: result.append(asyncio.run(handler.run_async())))
    worker.start()
    assert handled.wait(5)
    handler.stop()
    worker.join(10)
    assert not worker.is_alive()
    assert result[0].acked == 5 and broker.acked("in") == 5


def test_a_slow_sync_handler_s_results_flow_while_its_batch_goes_on() -> None:
    """On the handler thread, finished messages are handed to the loop as they finish (every few ms), not at
    the end of the batch: outputs go out and inputs are acked while a slow batch is still being handled."""
    broker = MemoryBroker()
    engine = make_engine(broker, consume_batch_size=200, max_buffered=200)
    seed(broker, engine, [Item(n) for n in range(200)])
    seen_at_150: list[tuple[int, int]] = []

    @engine.stream_app
    def slow(item: Item) -> list[tuple[str, Doubled]]:
        time.sleep(0.003)  # slow: this handler runs on its thread from the start
        if item.n == 150:
            seen_at_150.append((broker.depth("out"), broker.acked("in")))
        return [("out", Doubled(item.n * 2))]

    report = slow.run_until_drained(timeout=30, drain_idle_seconds=0.0)
    assert report.acked == 200 and broker.depth("out") == 200
    [(outputs, acked)] = seen_at_150
    assert outputs >= 50 and acked >= 50, seen_at_150  # about 145 of the first 150 by then


def test_shutdown_gives_back_unfinished_work() -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, shutdown_timeout_seconds=0.2)
    seed(broker, engine, [Item(n) for n in range(3)])
    started = threading.Event()
    release = threading.Event()

    @engine.stream_app
    def stuck(item: Item) -> bool:
        started.set()
        release.wait(5)
        return True

    took: list[float] = []

    async def main() -> Any:
        task = asyncio.ensure_future(stuck.run_async())
        while not started.is_set():
            await asyncio.sleep(0.01)
        asked = time.monotonic()
        stuck.stop()
        report = await task
        took.append(time.monotonic() - asked)
        release.set()
        return report

    report = asyncio.run(main())
    assert report.abandoned == 3
    # The deadline (0.2 s) bounds the wait for the stuck handler; the rest of the shutdown is quick. The
    # handler still blocks its thread for 5 s: shutdown must not wait for it.
    assert took[0] < 1.0, took
    assert broker.depth("in") == 3  # nothing lost: all three are back on the queue


def test_msg_ctx_may_be_keyword_only_and_async() -> None:
    engine = make_engine(MemoryBroker())

    @engine.stream_app
    async def handler(item: Item, *, msg_ctx: MessageContext) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(msg_ctx.attempt + item.n))]

    h = harness(handler)
    h.send(Item(10), key="k")
    assert h.run().outputs("out") == [Doubled(11)]


class TimingRecorder:
    """An observer counting the per-message timings the engine reports."""

    def __init__(self) -> None:
        self.timings: Counter[str] = Counter()

    def on_process_time(self, app_name: str, process_name: str, seconds: float, count: int) -> None:
        assert seconds >= 0 and count > 0
        self.timings[process_name] += count


@pytest.mark.parametrize("observed", [False, True])
@pytest.mark.parametrize("max_retries", [0, 2])
def test_every_outcome_after_calibration_when_the_handler_runs_inline(
        max_retries: int, observed: bool, caplog: pytest.LogCaptureFixture) -> None:
    """The inline loop (after the calibration batches) makes the same decisions as the threaded one: bad input
    and a raising handler to the DLQ, False given back, one output, two outputs, an output of the wrong type."""
    broker = MemoryBroker()
    registry = build_registry()
    registry.entries["observer"] = {}  # only the recorder below, when observed
    recorder = TimingRecorder()
    engine = make_engine(broker, consume_batch_size=5, max_buffered=5, max_retries=max_retries,
                         max_deliveries=2, redelivery_delay_seconds=0.0, registry=registry,
                         observers=[recorder] if observed else None)
    calls: dict[int, int] = {}
    for n in range(200):
        if n >= 100 and n % 10 == 1:
            broker.publish("in", b"\xff not json")
        elif n >= 100 and n % 10 == 2:
            broker.publish("in", b'{"wrong": 1}')
        else:
            seed(broker, engine, [Item(n)])

    @engine.stream_app
    def handler(item: Item) -> Any:
        calls[item.n] = calls.get(item.n, 0) + 1
        if item.n < 100 or item.n % 10 == 0:
            return [("out", Doubled(item.n))]
        if item.n % 10 == 3:
            raise RuntimeError(f"boom {item.n}")
        if item.n % 10 == 4:
            return False
        if item.n % 10 == 5:
            return [("out", Doubled(item.n)), ("other", Doubled(-item.n))]
        if item.n % 10 == 6:
            return [("out", Item(item.n))]  # the wrong type for "out"
        return True

    with caplog.at_level("DEBUG", logger="volley"):
        report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.0)
    assert "running them inline" in caplog.text, "the calibration batches did not hand over to the inline loop"
    outputs = sorted(json.loads(v)["n"] for v in broker.produced("out"))
    assert outputs == [*range(100), *(n for n in range(100, 200) if n % 10 in (0, 5))]
    assert sorted(json.loads(v)["n"] for v in broker.produced("other")) == sorted(
        -n for n in range(100, 200) if n % 10 == 5)
    stages = Counter(d.headers["volley-error-stage"] for d in broker.produced_records("dlq") if d.headers)
    assert stages == {b"deserialize": 10, b"validate": 10, b"handler": 10, b"redelivery": 10, b"output": 10}
    assert all(calls[n] == 1 + max_retries for n in range(100, 200) if n % 10 == 3)
    assert all(calls[n] == 2 for n in range(100, 200) if n % 10 == 4), "False: given back until max_deliveries"
    assert report.dead_lettered == 50
    assert broker.depth("in") == 0 and broker.unacked("in") == 0
    if observed:  # one timing per handler call that returned: 200 - 20 bad inputs - 10 raising + 10 second calls
        assert recorder.timings == {"component": 180, "cycle": 180}


def test_msg_ctx_reaches_a_sync_handler_running_inline(caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    engine = make_engine(broker, consume_batch_size=5, max_buffered=5)
    seed(broker, engine, [Item(n) for n in range(50)])
    seen: list[tuple[int, str, int]] = []

    @engine.stream_app
    def handler(item: Item, msg_ctx: MessageContext) -> bool:
        seen.append((item.n, msg_ctx.queue_name, msg_ctx.attempt))
        return True

    with caplog.at_level("DEBUG", logger="volley"):
        report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.0)
    assert "running them inline" in caplog.text
    assert seen == [(n, "in", 1) for n in range(50)]
    assert report.acked == 50


class _NameThatCannotBeHashed:
    def __hash__(self) -> int:
        raise RuntimeError("no hash for this name")


def test_an_output_name_that_cannot_be_looked_up_is_a_failure_at_output() -> None:
    """A queue name whose __hash__ raises (anything, not only TypeError) goes to the DLQ at stage output; the run
    goes on. Before, the one-output path let the error out of the run: the input stayed unacked, nothing
    dead-lettered."""
    broker = MemoryBroker()
    engine = make_engine(broker)
    seed(broker, engine, [Item(1), Item(2)])

    @engine.stream_app
    def handler(item: Item) -> Any:
        if item.n == 1:
            return [(_NameThatCannotBeHashed(), Doubled(item.n))]
        return [("out", Doubled(item.n))]

    report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.0)
    stages = [d.headers["volley-error-stage"] for d in broker.produced_records("dlq") if d.headers]
    assert stages == [b"output"]
    assert [json.loads(v)["n"] for v in broker.produced("out")] == [2]
    assert report.dead_lettered == 1 and report.acked == 1
    assert broker.depth("in") == 0 and broker.unacked("in") == 0
