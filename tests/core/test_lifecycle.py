"""Regression tests for the engine lifecycle, retry and settlement bugs of issue 11.

Each test names the bug it covers. They use the public API only (Engine, StreamApp, RunReport, MemoryBroker,
the memory connector's classes as fakes, volley.testing), so that they hold across rewrites of the engine.
Every test is bounded in time: a hang fails it instead of hanging the suite.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import queue
import signal
import subprocess
import sys
import textwrap
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from volley import DeliveryError, Engine, HandlerFailedError, MemoryBroker, MessageContext, RunReport, VolleyError
from volley.memory import MemoryConnector, MemoryProducer
from volley.message import OutgoingMessage
from volley.plugins import Registry, build_registry
from volley.ports import DeliveryCallback, QueueSpec
from volley.testing import harness

# ------------------------------------------------------------------ helpers


@dataclass
class Item:
    n: int
    key: str = "a"


@dataclass
class Doubled:
    n: int


_REGISTRY: Registry | None = None


def quiet_registry() -> Registry:
    """The installed plugins without their observers: only the observers a test passes are called."""
    global _REGISTRY
    if _REGISTRY is None:
        _REGISTRY = build_registry()
        _REGISTRY.entries["observer"] = {}
    return _REGISTRY


def make_queues(broker: MemoryBroker, **overrides: dict[str, Any]) -> dict[str, Any]:
    queues: dict[str, Any] = {
        "in": {"value": "in", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
        "out": {"value": "out", "profile": "memory", "data_model": Doubled, "config": {"broker": broker}},
        "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    for name, settings in overrides.items():
        queues[name] = {**queues.get(name, {}), **settings}
    return queues


def make_engine(broker: MemoryBroker, *, dlq: bool = True, queues: dict[str, Any] | None = None,
                output_queues: Sequence[str] = ("out",), **kwargs: Any) -> Engine:
    settings: dict[str, Any] = {"metrics_port": None, "poll_interval_seconds": 0.02, "retry_backoff_seconds": 0.0,
                                "shutdown_timeout_seconds": 1.0, "registry": quiet_registry()}
    settings.update(kwargs)
    return Engine(app_name="t", input_queue="in", output_queues=list(output_queues),
                  dead_letter_queue="dlq" if dlq else None, queue_config=queues or make_queues(broker), **settings)


def seed(broker: MemoryBroker, engine: Engine, items: Sequence[Item]) -> None:
    for item in items:
        broker.publish("in", engine.input.encode(item), key=item.key.encode())


def values(broker: MemoryBroker, queue_name: str) -> list[int]:
    return [json.loads(v)["n"] for v in broker.produced(queue_name)]


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``condition`` (from a thread that is not the engine's loop) until true, or fail after ``timeout``."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    """The same, on the event loop the engine runs on."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


class RunInThread:
    """``asyncio.run(app.run_async())`` on a thread of its own: the test thread stays free to stop it and to
    notice a run that does not return."""

    def __init__(self, app: Any, **kwargs: Any) -> None:
        self.report: RunReport | None = None
        self.error: BaseException | None = None
        self.returned_at: float | None = None

        def target() -> None:
            try:
                self.report = asyncio.run(app.run_async(**kwargs))
            except BaseException as exc:
                self.error = exc
            finally:
                self.returned_at = time.monotonic()

        self.thread = threading.Thread(target=target, name="test-run", daemon=True)
        self.thread.start()

    def join(self, timeout: float) -> bool:
        """Whether the run returned within ``timeout``."""
        self.thread.join(timeout)
        return not self.thread.is_alive()


class RetryLog(logging.Handler):
    """Notices the engine's "retry n of m" warnings, so that a test can act during a retry's backoff."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.retries = 0

    def emit(self, record: logging.LogRecord) -> None:
        with contextlib.suppress(Exception):
            if "retry" in record.getMessage():
                self.retries += 1


@contextlib.contextmanager
def retry_log() -> Any:
    handler = RetryLog()
    logger = logging.getLogger("volley")
    logger.addHandler(handler)
    try:
        yield handler
    finally:
        logger.removeHandler(handler)


class FailFirstProducer(MemoryProducer):
    """Refuses the first delivery of each distinct output (topic and value), confirms every later one.

    With ``keep`` it holds on to every message it was given, so that no later output can be allocated at the
    address of an earlier one."""

    def __init__(self, broker: MemoryBroker, keep: bool = False) -> None:
        super().__init__(broker)
        self.seen: set[tuple[str, bytes]] = set()
        self.keep = keep
        self.kept: list[OutgoingMessage] = []
        self.refused = 0

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        if self.keep:
            self.kept.extend(messages)
        fresh = [m for m in messages if (m.topic, m.value) not in self.seen]
        self.seen.update((m.topic, m.value) for m in fresh)
        again = [m for m in messages if all(m is not f for f in fresh)]
        if again:
            super().produce(again, on_delivery)
        if fresh:
            self.refused += len(fresh)
            on_delivery((), [(m, RuntimeError("first delivery refused")) for m in fresh])


class AlwaysFailingProducer(MemoryProducer):
    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        on_delivery((), [(m, RuntimeError("the broker is down")) for m in messages])


class ProducerConnector(MemoryConnector):
    """A memory connector whose producers are built by ``make``: give it as a queue's ``producer``."""

    def __init__(self, make: Callable[[], MemoryProducer]) -> None:
        self.make = make
        self.made: list[MemoryProducer] = []

    def create_producer(self, queue: QueueSpec) -> MemoryProducer:
        producer = self.make()
        self.made.append(producer)
        return producer


class Recorder:
    """An observer recording dead letters and produced counts."""

    def __init__(self) -> None:
        self.dead_letters: list[tuple[str, int]] = []
        self.produced: Counter[str] = Counter()

    def on_dead_letter(self, app_name: str, reason: str, count: int) -> None:
        self.dead_letters.append((reason, count))

    def on_produced(self, app_name: str, source: str, destination: str, count: int) -> None:
        self.produced[destination] += count


def _run_script(tmp_path: Any, source: str, timeout: float, *args: str) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "app.py"
    script.write_text(source)
    try:
        return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True, timeout=timeout,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"}, check=False)
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it
        pytest.fail(f"the app did not finish within {timeout} s (it hung); stderr tail: "
                    f"{(exc.stderr or b'')[-2000:]!r}")


# ------------------------------------------------------------------ bug 1


POLL_ZERO_APP = textwrap.dedent('''
    import json
    from dataclasses import dataclass
    from volley import Engine, MemoryBroker

    @dataclass
    class Item:
        n: int

    broker = MemoryBroker()
    queues = {
        "in": {"value": "in", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
        "out": {"value": "out", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
    }
    engine = Engine(app_name="zero", input_queue="in", output_queues=["out"], queue_config=queues,
                    metrics_port=None, poll_interval_seconds=0, shutdown_timeout_seconds=1.0)
    for n in range(20):
        broker.publish("in", json.dumps({"n": n}).encode())

    @engine.stream_app
    def handle(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    report = handle.run_until_drained(timeout=5)
    print(json.dumps({"acked": report.acked, "outputs": len(broker.produced("out"))}), flush=True)
''')


def test_bug1_poll_interval_zero_still_processes_and_drains(tmp_path: Any) -> None:
    """Bug 1: with poll_interval_seconds=0 (which Engine accepts) the memory consumer returns without awaiting,
    so the fetch loop never yields: nothing is processed, and not even run_until_drained's timeout fires.
    Run in a subprocess with a deadline, since a loop that never yields cannot be stopped from inside."""
    done = _run_script(tmp_path, POLL_ZERO_APP, 10.0)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == {"acked": 20, "outputs": 20}


# ------------------------------------------------------------------ bug 2


@pytest.mark.parametrize("always", [False, True], ids=["once", "always"])
def test_bug2_cancelled_error_raised_by_an_async_handler_is_a_handler_failure(always: bool) -> None:
    """Bug 2: an async handler that raises CancelledError (it awaited a task someone else cancelled) killed its
    lane: the lane stayed registered with messages queued behind, which then waited forever. It must be a
    handler failure like any other: retried, then dead-lettered."""
    broker = MemoryBroker()
    engine = make_engine(broker, max_retries=1, shutdown_timeout_seconds=0.5)
    seed(broker, engine, [Item(n) for n in range(5)])  # one key, one partition: one lane, in order
    calls: Counter[int] = Counter()

    @engine.stream_app
    async def handler(item: Item) -> list[tuple[str, Doubled]]:
        calls[item.n] += 1
        if item.n == 1 and (always or calls[1] == 1):
            other = asyncio.ensure_future(asyncio.sleep(10))
            other.cancel()
            await other  # raises CancelledError, though nobody cancelled this handler
        return [("out", Doubled(item.n))]

    try:
        report = handler.run_until_drained(timeout=3)
    except TimeoutError:
        pytest.fail(f"the app never drained: the messages behind the CancelledError are stuck (calls: {calls})")
    assert calls[1] == 2  # the first call and one retry
    if always:
        assert values(broker, "out") == [0, 2, 3, 4]
        [dead] = broker.produced_records("dlq")
        assert dead.headers is not None and dead.headers["volley-error-stage"] == b"handler"
        assert report.dead_lettered == 1 and report.acked == 4
    else:
        assert values(broker, "out") == [0, 1, 2, 3, 4]
        assert report.acked == 5 and report.dead_lettered == 0
    assert broker.acked("in") == 5


# ------------------------------------------------------------------ bug 3


def test_bug3_delivery_retries_are_counted_per_output_not_per_address() -> None:
    """Bug 3: delivery retries were counted by id(OutgoingMessage) and never forgotten on success, so a new
    output allocated at a reused address inherited an old count: a producer that refuses each output once ended
    in "attempt 2 of 1", a DeliveryError, and a stopped app. Every output must get its own retries."""
    broker = MemoryBroker()
    connector = ProducerConnector(lambda: FailFirstProducer(broker))
    queues = make_queues(broker, out={"producer": connector})
    # Small batches: outputs are allocated batch after batch, after earlier ones were delivered and freed.
    engine = make_engine(broker, queues=queues, max_retries=1, consume_batch_size=10, max_buffered=10)
    seed(broker, engine, [Item(n) for n in range(400)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n))]

    try:
        report = double.run_until_drained(timeout=20)
    except DeliveryError as exc:
        pytest.fail(f"an output refused only once was given up on: {exc}")
    assert sorted(values(broker, "out")) == list(range(400))
    assert report.acked == 400 and report.failed == 0
    assert sum(p.refused for p in connector.made if isinstance(p, FailFirstProducer)) == 400


# ------------------------------------------------------------------ bug 4


def test_bug4_a_failed_output_is_produced_again_to_its_own_broker() -> None:
    """Bug 4: a failed output was produced again through the producer found by topic name, so with two output
    queues of the same topic name on different brokers the retry went to the wrong broker (and the input was
    acked anyway). The retry must go where the output was meant to go."""
    broker_a, broker_b = MemoryBroker(), MemoryBroker()
    connector = ProducerConnector(lambda: FailFirstProducer(broker_b, keep=True))
    queues = make_queues(broker_a, a={"value": "out", "profile": "memory", "data_model": Doubled,
                                      "config": {"broker": broker_a}},
                         b={"value": "out", "profile": "memory", "data_model": Doubled,
                            "config": {"broker": broker_b}, "producer": connector})
    engine = make_engine(broker_a, queues=queues, output_queues=["a", "b"], max_retries=2)
    seed(broker_a, engine, [Item(n) for n in range(5)])

    @engine.stream_app
    def to_b(item: Item) -> list[tuple[str, Doubled]]:
        return [("b", Doubled(item.n))]

    report = to_b.run_until_drained(timeout=10)
    assert values(broker_a, "out") == [], "the retries went to queue 'a' (broker A), same topic name"
    assert sorted(values(broker_b, "out")) == list(range(5))
    assert report.acked == 5


# ------------------------------------------------------------------ bug 5


def test_bug5_shutdown_starts_no_waiting_lane_and_leaves_no_task_behind() -> None:
    """Bug 5: shutdown cancelled the running async lanes, and each cancelled lane's cleanup started a waiting
    lane that nobody cancelled: the handler was called after stop(), tasks outlived run_async(), and outputs
    were produced after the parts were closed."""
    broker = MemoryBroker()
    engine = make_engine(broker, queues=make_queues(broker, **{"in": {"ordering": "key"}}), max_in_flight=2,
                         shutdown_timeout_seconds=0.2)
    seed(broker, engine, [Item(n, f"k{n}") for n in range(40)])  # 40 keys: 40 lanes, 2 at a time
    starts: list[float] = []

    @engine.stream_app
    async def slow(item: Item) -> bool:
        starts.append(time.monotonic())
        await asyncio.sleep(0.5)
        return True

    async def main() -> tuple[float, list[str]]:
        task = asyncio.ensure_future(slow.run_async())
        await _until(lambda: len(starts) >= 2, 5, "the first two lanes to start")
        slow.stop()
        await asyncio.wait_for(task, 10)
        returned = time.monotonic()
        leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        names = [repr(t.get_coro()) for t in leftovers]
        if leftovers:  # let them show what they do, bounded, then clean up
            await asyncio.wait(leftovers, timeout=1.0)
        for _ in range(100):
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            if not rest:
                break
            for t in rest:
                t.cancel()
            await asyncio.wait(rest, timeout=1.0)
        return returned, names

    returned, leftovers = asyncio.run(main())
    late = [s for s in starts if s > returned]
    assert leftovers == [], f"tasks outlived run_async(): {leftovers}"
    assert late == [], f"{len(late)} handler call(s) started after run_async() returned"


# ------------------------------------------------------------------ bug 6


def test_bug6_the_handler_thread_checks_for_stop_between_messages_of_a_batch() -> None:
    """Bug 6: the handler thread did not check for stop between the messages of a batch: once a call that hung
    past the shutdown deadline returned, it called the handler for the rest of the batch, after run() had
    returned."""
    broker = MemoryBroker()
    engine = make_engine(broker, sync_handler_mode="thread", shutdown_timeout_seconds=0.3)
    seed(broker, engine, [Item(n) for n in range(10)])  # one batch
    calls: list[int] = []
    blocked = threading.Event()
    release = threading.Event()

    @engine.stream_app
    def hangs(item: Item) -> bool:
        calls.append(item.n)
        if item.n == 0:
            blocked.set()
            release.wait(10)
        return True

    baseline = threading.active_count()
    run = RunInThread(hangs)
    try:
        assert blocked.wait(5), "the handler was never called"
        hangs.stop()
        assert run.join(5), "run_async() did not return after the shutdown deadline"
        assert run.error is None, run.error
    finally:
        release.set()
    # The handler thread finishes its hung call, then must end without touching the rest of the batch.
    _wait_for(lambda: threading.active_count() <= baseline, 5, "the handler thread to end")
    assert calls == [0], f"the handler was called for {calls[1:]} after run_async() returned"


# ------------------------------------------------------------------ bug 7


def test_bug7_stop_holds_the_deadline_when_an_inline_handler_blocks() -> None:
    """Bug 7: in sync_handler_mode="auto" a handler that calibrated fast and later blocks runs on the event loop.

    Inside someone else's event loop (run_async, run_until_drained) nothing can preempt a call that blocks the
    loop: app() and volley run end the process at the deadline instead (the subprocess test below). What must
    hold here: once the blocked call returns, the run is already stopping (stop() reached it), so it shuts down
    within the deadline, and no handler call starts for a message it had not begun."""
    broker = MemoryBroker()
    engine = make_engine(broker, consume_batch_size=5, max_buffered=5, shutdown_timeout_seconds=0.5)
    seed(broker, engine, [Item(n) for n in range(30)])
    blocked = threading.Event()
    release = threading.Event()
    calls_after_release: list[int] = []

    @engine.stream_app
    def turns_blocking(item: Item) -> bool:
        if release.is_set():
            calls_after_release.append(item.n)
        if item.n == 20:  # well after the calibration batches: runs inline
            blocked.set()
            release.wait(10)
        return True

    run = RunInThread(turns_blocking)
    try:
        assert blocked.wait(10), "the handler never reached message 20"
        turns_blocking.stop()
        time.sleep(0.3)  # the call keeps blocking the loop for a while (the scenario, not a synchronisation)
        released = time.monotonic()
        release.set()
        run.join(5.0)
        took = time.monotonic() - released
    finally:
        release.set()
        run.join(10)
    assert took < 0.5 + 1.0, f"run returned {took:.1f} s after the blocked call did (deadline 0.5 s)"
    assert run.error is None and run.report is not None
    # the messages already buffered may be finished within the deadline; nothing is fetched after stop()
    assert all(n < 25 for n in calls_after_release), calls_after_release


BLOCKED_APP = textwrap.dedent('''
    import json, logging, sys, threading
    from dataclasses import dataclass
    from volley import Engine, MemoryBroker
    from volley.memory import MemoryConnector, MemoryConsumer

    @dataclass
    class Item:
        n: int

    class PrintingConsumer(MemoryConsumer):
        async def ack(self, envelopes):
            for env in envelopes:
                print("acked", json.loads(env.value)["n"], flush=True)
            await super().ack(envelopes)

    class PrintingConnector(MemoryConnector):
        def __init__(self, broker):
            self.broker = broker

        def create_consumer(self, queue):
            return PrintingConsumer(self.broker, queue.value)

    logging.basicConfig(level=logging.INFO)
    broker = MemoryBroker()
    queues = {"in": {"value": "in", "profile": "memory", "data_model": Item, "config": {"broker": broker},
                     "consumer": PrintingConnector(broker)}}
    engine = Engine(app_name="blocked", input_queue="in", queue_config=queues, metrics_port=None,
                    poll_interval_seconds=0.05, consume_batch_size=5, max_buffered=5, shutdown_timeout_seconds=0.5)
    for n in range(30):
        broker.publish("in", json.dumps({"n": n}).encode())
    never = threading.Event()

    @engine.stream_app
    def blocking_handler_xyz(item: Item) -> bool:
        if item.n == 20:  # after calibration: runs inline, on the event loop
            print("stuck", flush=True)
            never.wait(60)
        return True

    blocking_handler_xyz()
    print("returned", flush=True)
''')


def test_bug7_sigterm_on_app_with_a_blocked_inline_call_exits_nonzero_within_the_deadline(tmp_path: Any) -> None:
    """Bug 7, app(): SIGTERM while a handler call blocks the loop past the deadline must end the process within
    about the deadline, non-zero, with a log line naming the handler, and nothing unfinished acked."""
    script = tmp_path / "app.py"
    script.write_text(BLOCKED_APP)
    lines: queue.Queue[str] = queue.Queue()
    stdout: list[str] = []
    with subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"}) as process:
        assert process.stdout is not None and process.stderr is not None
        out = process.stdout

        def read() -> None:
            for line in out:
                lines.put(line)
            lines.put("")

        reader = threading.Thread(target=read, daemon=True)
        reader.start()
        took = None
        try:
            while True:
                line = lines.get(timeout=10)
                stdout.append(line)
                if line in ("stuck\n", ""):
                    break
            assert stdout[-1] == "stuck\n", stdout
            sent = time.monotonic()
            process.send_signal(signal.SIGTERM)
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=5)
                took = time.monotonic() - sent
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(5)
        err = process.stderr.read()
    while not lines.empty():
        stdout.append(lines.get())
    assert took is not None, "the app was still running 5 s after SIGTERM with shutdown_timeout_seconds=0.5"
    assert took < 3.0, f"the app exited {took:.1f} s after SIGTERM with a 0.5 s deadline"
    assert process.returncode != 0, "a handler call still blocked at exit must not end in a clean exit"
    assert "blocking_handler_xyz" in err, err[-2000:]
    acked = [int(line.split()[1]) for line in stdout if line.startswith("acked")]
    assert all(n < 20 for n in acked), f"unfinished messages were acked: {[n for n in acked if n >= 20]}"


# ------------------------------------------------------------------ bug 8


@pytest.mark.parametrize("how", ["wait_for", "timeout", "cancel"])
def test_bug8_run_async_lets_cancellation_through(how: str) -> None:
    """Bug 8: run() swallowed cancellation and returned a report: asyncio.wait_for(app.run_async(), t) and
    asyncio.timeout never raised TimeoutError, and a cancelled run did not end cancelled."""
    broker = MemoryBroker()
    engine = make_engine(broker, shutdown_timeout_seconds=0.5)

    @engine.stream_app
    def idle(item: Item) -> bool:
        return True

    async def main() -> None:
        if how == "wait_for":
            with pytest.raises(TimeoutError):
                await asyncio.wait_for(idle.run_async(), 0.3)
        elif how == "timeout":
            with pytest.raises(TimeoutError):
                async with asyncio.timeout(0.3):
                    await idle.run_async()
        else:
            task = asyncio.ensure_future(idle.run_async())
            await _until(lambda: idle.report is not None, 5, "the run to start")
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 5)

    asyncio.run(asyncio.wait_for(main(), 10))


def test_bug8_harness_run_async_raises_timeout_error() -> None:
    """Bug 8: volley.testing's Harness.run_async(timeout=...) returned a result instead of raising TimeoutError
    when the app did not drain in time."""
    engine = make_engine(MemoryBroker())

    @engine.stream_app
    async def never_done(item: Item) -> bool:
        await asyncio.Event().wait()
        return True

    h = harness(never_done, shutdown_timeout_seconds=0.2)
    h.send(Item(1))

    async def main() -> None:
        with pytest.raises(TimeoutError):
            await h.run_async(timeout=0.3)

    asyncio.run(asyncio.wait_for(main(), 10))


# ------------------------------------------------------------------ bug 9


@pytest.mark.parametrize("mode", ["thread", "auto"])
def test_bug9_a_sync_handler_raising_cancelled_error_is_dead_lettered(mode: str) -> None:
    """Bug 9: a sync handler raising CancelledError ended the processor "cancelled", which was taken for a
    clean stop: the run waited out the deadline and returned with no error. It is a handler failure: retried,
    then dead-lettered. (With batches of one, in "auto" mode message 4 comes after calibration: inline.)"""
    broker = MemoryBroker()
    engine = make_engine(broker, sync_handler_mode=mode, consume_batch_size=1, max_retries=1,
                         shutdown_timeout_seconds=0.5)
    seed(broker, engine, [Item(n) for n in range(6)])
    calls: Counter[int] = Counter()

    @engine.stream_app
    def cancels(item: Item) -> list[tuple[str, Doubled]]:
        calls[item.n] += 1
        if item.n == 4:
            raise asyncio.CancelledError
        return [("out", Doubled(item.n))]

    report = cancels.run_until_drained(timeout=10)
    assert report.dead_lettered == 1, f"not dead-lettered: {report}"
    [dead] = broker.produced_records("dlq")
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"handler"
    assert calls[4] == 2  # retried once
    assert sorted(values(broker, "out")) == [0, 1, 2, 3, 5]
    assert report.acked == 5


@pytest.mark.parametrize("mode", ["thread", "auto"])
def test_bug9_without_a_dlq_a_handler_raising_cancelled_error_stops_the_run_with_an_error(mode: str) -> None:
    """Bug 9: without a DLQ and with on_failure="stop", a sync handler raising CancelledError must make the run
    raise (so that app() exits non-zero), not return as if stopped cleanly."""
    broker = MemoryBroker()
    engine = make_engine(broker, dlq=False, sync_handler_mode=mode, consume_batch_size=1, max_retries=0,
                         shutdown_timeout_seconds=0.5)
    seed(broker, engine, [Item(n) for n in range(6)])

    @engine.stream_app
    def cancels(item: Item) -> bool:
        if item.n == 4:
            raise asyncio.CancelledError
        return True

    with pytest.raises(HandlerFailedError):
        cancels.run_until_drained(timeout=10)
    assert broker.acked("in") <= 5 and not broker.is_idle("in")  # message 4 was given back (delayed), not acked


# ------------------------------------------------------------------ bug 10


@pytest.mark.parametrize("options", [{"partition": "x"}, {"partition": -5}, {"partition": 7},
                                     {"delay": "soon"}, {"delay": -1}],
                         ids=["partition-x", "partition-negative", "partition-missing", "delay-soon",
                              "delay-negative"])
def test_bug10_invalid_output_options_send_the_input_to_the_dlq(options: dict[str, Any]) -> None:
    """Bug 10: an invalid partition or delay in an output's options was not checked when routing: the producer
    rejected it and the DeliveryError stopped the app even with a DLQ. The input must go to the DLQ at stage
    "output", and the app go on."""
    broker = MemoryBroker()
    engine = make_engine(broker)
    seed(broker, engine, [Item(n) for n in range(3)])

    @engine.stream_app
    def routed(item: Item) -> list[tuple[str, Doubled, dict[str, Any]]]:
        return [("out", Doubled(item.n), options if item.n == 1 else {"key": "k"})]

    try:
        report = routed.run_until_drained(timeout=10)
    except VolleyError as exc:
        pytest.fail(f"the app stopped: {type(exc).__name__}: {exc}")
    dead_letters = broker.produced_records("dlq")
    assert len(dead_letters) == 1, f"the input with output options {options} was not dead-lettered"
    [dead] = dead_letters
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"output"
    assert json.loads(dead.value)["n"] == 1
    assert values(broker, "out") == [0, 2]
    assert report.dead_lettered == 1 and report.acked == 2


# ------------------------------------------------------------------ bug 11


def test_bug11_a_dead_letter_counts_and_is_announced_only_once_the_dlq_confirmed_it(
        caplog: pytest.LogCaptureFixture) -> None:
    """Bug 11: when the DLQ write itself failed, the report showed dead_lettered=1, acked=-1, failed=1, and the
    on_dead_letter event and the "to the dead-letter queue" log came before the DLQ confirmed anything. Each
    input must be counted once, at its final state, and a dead letter announced only once confirmed."""
    broker = MemoryBroker()
    queues = make_queues(broker, dlq={"producer": ProducerConnector(lambda: AlwaysFailingProducer(broker))})
    recorder = Recorder()
    engine = make_engine(broker, queues=queues, max_retries=1, observers=[recorder])
    seed(broker, engine, [Item(1)])
    live: list[RunReport] = []

    @engine.stream_app
    def poison(item: Item) -> bool:
        if not live and poison.report is not None:
            live.append(poison.report)  # the run's report, also when the run ends in an error
        raise RuntimeError("poison")

    caplog.set_level(logging.INFO, logger="volley")
    returned: RunReport | None = None
    with contextlib.suppress(VolleyError):  # the DLQ is down: the app may well stop, that is not the point
        returned = poison.run_until_drained(timeout=10)
    report = returned or live[0]
    assert report.consumed == 1
    assert report.dead_lettered == 0 and report.acked == 0, f"counted as dead-lettered and acked: {report}"
    assert report.failed + report.nacked + report.abandoned == 1, report
    assert recorder.dead_letters == [], "on_dead_letter fired though the DLQ never confirmed"
    announced = [r.getMessage() for r in caplog.records if "to the dead-letter queue" in r.getMessage()]
    assert announced == [], announced


# ------------------------------------------------------------------ bug 13


@pytest.mark.parametrize("path", ["thread", "inline", "async"])
def test_bug13_a_failing_call_is_not_retried_after_stop(path: str) -> None:
    """Bug 13: a failing call was retried once more after stop (the backoff wait ended early, the retry still
    ran), though docs/dead-letters.md says a shutting-down app retries no more. Stop during the first backoff:
    the handler must have been called exactly once."""
    broker = MemoryBroker()
    settings: dict[str, Any] = {"max_retries": 5, "retry_backoff_seconds": 1.0, "shutdown_timeout_seconds": 5.0}
    if path == "thread":
        settings["sync_handler_mode"] = "thread"
    elif path == "inline":
        settings["consume_batch_size"] = 1  # messages 0 and 1 calibrate, 2 runs inline
    engine = make_engine(broker, **settings)
    seed(broker, engine, [Item(n) for n in range(3)] if path == "inline" else [Item(2)])
    calls: Counter[int] = Counter()

    def behave(item: Item) -> bool:
        calls[item.n] += 1
        if item.n == 2:
            raise RuntimeError("always fails")
        return True

    if path == "async":
        @engine.stream_app
        async def failing(item: Item) -> bool:
            return behave(item)
    else:
        @engine.stream_app
        def failing(item: Item) -> bool:
            return behave(item)

    async def main() -> None:
        with retry_log() as log:
            task = asyncio.ensure_future(failing.run_async())
            await _until(lambda: calls[2] >= 1 and log.retries >= 1, 5, "the first failure and its retry warning")
            failing.stop()  # during the first backoff (1 s)
            await asyncio.wait_for(task, 10)

    asyncio.run(main())
    assert calls[2] == 1, f"the failing call was made {calls[2]} times: retried after stop"


def _failing_app(engine: Engine, path: str, behave: Callable[[Item], bool]) -> Any:
    if path == "async":
        @engine.stream_app
        async def failing(item: Item) -> bool:
            return behave(item)
        return failing

    @engine.stream_app
    def failing_sync(item: Item) -> bool:
        return behave(item)
    return failing_sync


def _settings(path: str) -> dict[str, Any]:
    settings: dict[str, Any] = {"max_retries": 5, "retry_backoff_seconds": 1.0, "shutdown_timeout_seconds": 5.0}
    if path == "thread":
        settings["sync_handler_mode"] = "thread"
    elif path == "inline":
        settings["consume_batch_size"] = 1  # messages 0 and 1 calibrate, 2 runs inline
    return settings


@pytest.mark.parametrize("path", ["thread", "inline", "async"])
def test_a_message_whose_retries_the_stop_cut_short_is_given_back_not_dead_lettered(path: str) -> None:
    """Found in review: a message whose backoff wait the stop cut short went to the DLQ with four of its five
    retries unspent (a deploy during a short outage dead-lettered work that would have succeeded), and the retry
    that was never made was counted. It is given back unacknowledged instead, and no retry is counted."""
    broker = MemoryBroker()
    engine = make_engine(broker, **_settings(path))
    seed(broker, engine, [Item(n) for n in range(3)] if path == "inline" else [Item(2)])
    calls: Counter[int] = Counter()

    def behave(item: Item) -> bool:
        calls[item.n] += 1
        if item.n == 2:
            raise RuntimeError("the database is down for a moment")
        return True

    failing = _failing_app(engine, path, behave)

    async def main() -> RunReport:
        with retry_log() as log:
            task = asyncio.ensure_future(failing.run_async())
            await _until(lambda: calls[2] >= 1 and log.retries >= 1, 5, "the first failure and its retry warning")
            failing.stop()  # during the first backoff (1 s)
            report: RunReport = await asyncio.wait_for(task, 10)
            return report

    report = asyncio.run(main())
    assert broker.produced("dlq") == [], "dead-lettered with retries left"
    assert report.dead_lettered == 0 and report.abandoned == 1, report
    assert report.retries == 0, f"{report.retries} retr(y/ies) counted, none was made"
    assert broker.unacked("in") == 0 and broker.depth("in") == 1, "the input is not back in its queue"


@pytest.mark.parametrize("path", ["thread", "async"])
def test_a_first_failure_during_shutdown_with_retries_left_is_given_back(path: str) -> None:
    """The same for a call that fails for the first time once the stop began: given back, not dead-lettered."""
    broker = MemoryBroker()
    engine = make_engine(broker, **_settings(path))
    seed(broker, engine, [Item(2)])
    started, release = threading.Event(), threading.Event()

    def behave(item: Item) -> bool:
        started.set()
        if not release.wait(10):
            raise AssertionError("never released")
        raise RuntimeError("the database went away with the deploy")

    if path == "async":
        @engine.stream_app
        async def failing(item: Item) -> bool:  # waits off the loop, so that the test can stop the app
            return await asyncio.get_running_loop().run_in_executor(None, behave, item)
    else:
        failing = _failing_app(engine, path, behave)

    async def main() -> RunReport:
        task = asyncio.ensure_future(failing.run_async())
        await _until(started.is_set, 5, "the handler's call")
        failing.stop()
        release.set()
        report: RunReport = await asyncio.wait_for(task, 10)
        return report

    report = asyncio.run(main())
    assert broker.produced("dlq") == [] and report.dead_lettered == 0 and report.abandoned == 1, report
    assert broker.depth("in") == 1


# ------------------------------------------------------------------ bug 14


def test_bug14_produced_counts_each_output_once_however_often_it_was_produced() -> None:
    """Bug 14: report.produced and on_produced counted every produce attempt, so an output produced again after
    a failed delivery was counted twice."""
    broker = MemoryBroker()
    queues = make_queues(broker, out={"producer": ProducerConnector(lambda: FailFirstProducer(broker, keep=True))})
    recorder = Recorder()
    engine = make_engine(broker, queues=queues, max_retries=3, observers=[recorder])
    seed(broker, engine, [Item(n) for n in range(5)])

    @engine.stream_app
    def double(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n))]

    report = double.run_until_drained(timeout=10)
    assert sorted(values(broker, "out")) == list(range(5))
    assert report.produced == 5, f"report.produced={report.produced} for 5 outputs"
    assert recorder.produced["out"] == 5, f"on_produced counted {recorder.produced['out']} for 5 outputs"


@pytest.mark.parametrize("shared", [True, False], ids=["one-producer-for-all", "a-producer-each"])
def test_produced_is_counted_per_topic_whether_or_not_queues_share_a_producer(shared: bool) -> None:
    """The produced metric counts a producer's batch at once when the producer serves one topic, and per record's
    topic when several queues (outputs and the DLQ) share it: either way each topic gets exactly its records."""
    broker = MemoryBroker()
    if shared:
        one = MemoryProducer(broker)
        factory = ProducerConnector(lambda: one)
    else:
        factory = ProducerConnector(lambda: MemoryProducer(broker))
    queues = make_queues(broker, out={"producer": factory}, other={"value": "other", "profile": "memory",
                                                                  "data_model": Doubled, "config": {"broker": broker},
                                                                  "producer": factory},
                         dlq={"producer": factory})
    recorder = Recorder()
    engine = make_engine(broker, queues=queues, output_queues=("out", "other"), observers=[recorder])
    seed(broker, engine, [Item(n) for n in range(9)])
    broker.publish("in", b"not json")

    @engine.stream_app
    def split(item: Item) -> list[tuple[str, Doubled]]:
        outputs = [("out" if item.n % 3 else "other", Doubled(item.n))]
        return [*outputs, ("out", Doubled(-item.n))] if item.n == 4 else outputs

    report = split.run_until_drained(timeout=10)
    assert report.acked == 9 and report.dead_lettered == 1, report
    assert len({id(p) for p in factory.made}) == (1 if shared else 3)
    assert dict(recorder.produced) == {"out": 7, "other": 3, "dlq": 1}, recorder.produced
    assert report.produced == 11


# ------------------------------------------------------------------ suspected bugs


def test_suspected_handler_mutating_msg_ctx_headers_does_not_change_the_redelivered_message() -> None:
    """Suspected (issue 11): MessageContext.headers handed out the broker's stored dict, so a handler that
    mutates msg_ctx.headers changed what is delivered again."""
    broker = MemoryBroker()
    engine = make_engine(broker, redelivery_delay_seconds=0.0)
    broker.publish("in", engine.input.encode(Item(1)), headers={"trace": b"1"})
    seen: list[dict[str, bytes]] = []

    @engine.stream_app
    def meddles(item: Item, msg_ctx: MessageContext) -> bool:
        seen.append(dict(msg_ctx.headers))
        if msg_ctx.attempt == 1:
            with contextlib.suppress(TypeError):  # a read-only mapping is a fine answer too
                msg_ctx.headers["trace"] = b"tampered"  # type: ignore[index]
            return False  # give it back: delivered again
        return True

    meddles.run_until_drained(timeout=10)
    assert seen == [{"trace": b"1"}, {"trace": b"1"}]
    [record] = broker.produced_records("in")
    assert record.headers == {"trace": b"1"}


class UnprintableError(Exception):
    def __str__(self) -> str:
        raise RuntimeError("this exception cannot be printed")


@pytest.mark.parametrize("mode", ["thread", "auto"])
def test_suspected_an_exception_that_cannot_be_printed_still_goes_to_the_dlq(mode: str) -> None:
    """Suspected (issue 11): an exception whose __str__ raises must not escape the formatting of the reason:
    the message still goes to the DLQ."""
    broker = MemoryBroker()
    engine = make_engine(broker, sync_handler_mode=mode, max_retries=0)
    seed(broker, engine, [Item(n) for n in range(3)])

    @engine.stream_app
    def raises_unprintable(item: Item) -> bool:
        if item.n == 1:
            raise UnprintableError
        return True

    try:
        report = raises_unprintable.run_until_drained(timeout=10)
    except RuntimeError as exc:
        pytest.fail(f"formatting the failure's reason escaped: {exc!r}")
    [dead] = broker.produced_records("dlq")
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"handler"
    assert dead.headers["volley-error-type"] == b"UnprintableError"
    assert report.dead_lettered == 1 and report.acked == 2


@pytest.mark.parametrize("batch", [False, True], ids=["per-message", "batch-profile"])
def test_a_handler_raising_a_base_exception_on_the_thread_is_not_reported_as_still_running(
        batch: bool, caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: a BaseException (SystemExit, KeyboardInterrupt, a library's own) escaping the handler on
    the handler thread left the thread's "in a call since" mark set, and the shutdown reported the handler as
    still running past the deadline, which it was not."""

    class Escaping(BaseException):
        pass

    broker = MemoryBroker()
    queues = make_queues(broker)
    if batch:
        queues["in"]["batch_size"] = 2
    engine = make_engine(broker, queues=queues, sync_handler_mode="thread")
    seed(broker, engine, [Item(1)])

    @engine.stream_app
    def escaping(item: Any) -> bool:
        raise Escaping("from the handler")

    with pytest.raises(Escaping):
        escaping.run_until_drained(timeout=10)
    still = [r.getMessage() for r in caplog.records if "still running" in r.getMessage()]
    assert still == []
    assert broker.acked("in") == 0 and broker.depth("in") == 1


def test_the_stopped_log_line_says_how_long_the_run_took(caplog: pytest.LogCaptureFixture) -> None:
    """Found in review: "stopped (RunReport(...))" was logged before the run's duration was set, so it always
    said elapsed_seconds=0.0."""
    broker = MemoryBroker()
    engine = make_engine(broker)
    seed(broker, engine, [Item(n) for n in range(3)])

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Doubled]]:
        return [("out", Doubled(item.n * 2))]

    with caplog.at_level(logging.INFO, logger="volley"):
        report = handler.run_until_drained(timeout=10, drain_idle_seconds=0.1)
    stopped = [line for line in caplog.text.splitlines() if "stopped (RunReport(" in line]  # as logged then
    assert len(stopped) == 1 and report.elapsed_seconds > 0
    assert f"elapsed_seconds={report.elapsed_seconds!r}" in stopped[0], stopped[0]
