"""Stage timings (process_time_seconds, data_model_process_seconds): inline calls are clocked about one in eight,
weighted, plus the first call of every outcome; calls on the handler thread are clocked every time; every call is
counted (handling.SAMPLE_ONE_IN)."""

from __future__ import annotations

import itertools
import random
import threading
import time
from collections import defaultdict
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import pytest

from volley import Engine, MemoryBroker
from volley.message import Envelope
from volley.plugins import build_registry
from volley.run import handling
from volley.run.tokens import Outcome


class Clock:
    """perf_counter for the step under test: ``now`` moves only when told (or by ``tick`` per read)."""

    def __init__(self, tick: float = 0.0) -> None:
        self.now = 1.0
        self.tick = tick

    def __call__(self) -> float:
        self.now += self.tick
        return self.now


def _bind(monkeypatch: pytest.MonkeyPatch, clock: Clock, call: Any = None, seed: int | None = None,
          draw: float | None = None, drawing: Any = None) -> Any:
    """A handle bound with ``clock`` and a sampler: seeded, always drawing ``draw``, or ``drawing()``."""
    with monkeypatch.context() as patched:  # the clock and the generator are bound once, when the step is built
        patched.setattr(time, "perf_counter", clock)
        if drawing is not None:
            patched.setattr(random, "Random", lambda: SimpleNamespace(random=drawing))
        elif draw is not None:
            patched.setattr(random, "Random", lambda: SimpleNamespace(random=lambda: draw))
        elif seed is not None:
            seeded = random.Random(seed)
            patched.setattr(random, "Random", lambda: seeded)
        app = SimpleNamespace(call=call or (lambda message: True), wants_context=False)
        return handling._handler(app, lambda token: None, lambda env, out: env.value,  # type: ignore[arg-type]
                                 lambda token, result, out: None, lambda *args: None, True)


SEVEN = 0.62  # int(log(1 - 0.62) / log(7 / 8)) == 7: seven calls skipped after each clocked one


def test_inline_calls_are_clocked_one_in_eight_weighted_and_all_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    handle = _bind(monkeypatch, Clock(tick=1.0), draw=SEVEN)
    out = Outcome(0)
    for n in range(801):
        assert handle(Envelope(b"%d" % n), out, False) is None
    assert out.timed == 801  # the count of the metrics: every call that returned
    # Clocked: the first (forced, weight 1), then every eighth (weight 8); each step took one second when clocked.
    assert (out.construct, out.component, out.deconstruct) == (1.0 + 100 * 8, 1.0 + 100 * 8, 1.0 + 100 * 8)


def test_the_first_call_of_every_outcome_is_clocked_with_weight_one(monkeypatch: pytest.MonkeyPatch) -> None:
    """An outcome that counts calls has clocked one (a quiet worker, one message per outcome, clocks them all)."""
    handle = _bind(monkeypatch, Clock(tick=1.0), draw=SEVEN)
    for n in range(20):
        out = Outcome(0)
        handle(Envelope(b"%d" % n), out, False)
        assert (out.timed, out.component) == (1, 1.0)


def test_the_samplers_own_work_is_not_timed_as_decoding(monkeypatch: pytest.MonkeyPatch) -> None:
    """The draw of the next gap happens before the clock starts: a slow draw (here 5 s) adds nothing to a step.
    (The inline slice used to pass in its own clock read, taken before the draw, which then counted as decoding;
    handle now reads its own. A guard: this passes on that code too, where handle was called without a clock.)"""
    clock = Clock()

    def slow_draw() -> float:
        clock.now += 5.0
        return SEVEN

    def call(message: Any) -> bool:
        clock.now += 1.0
        return True

    handle = _bind(monkeypatch, clock, call=call, drawing=slow_draw)
    out = Outcome(0)
    for n in range(9):  # the first (weight 1) and the ninth (weight 8) are clocked
        handle(Envelope(b"%d" % n), out, False)
    assert (out.timed, out.construct, out.component, out.deconstruct) == (9, 0.0, 9.0, 0.0)


def test_calls_on_the_handler_thread_are_all_clocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """wait=True (the handler thread, batch groups): slow or blocking calls, each clocked, weight 1."""
    handle = _bind(monkeypatch, Clock(tick=1.0), draw=SEVEN)
    out = Outcome(0)
    for n in range(50):
        handle(Envelope(b"%d" % n), out)
    assert (out.timed, out.construct, out.component, out.deconstruct) == (50, 50.0, 50.0, 50.0)


def test_the_estimate_is_unbiased_when_the_first_call_of_an_outcome_is_slower(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The forced first call stands for itself only: a first call three times slower (cold caches after a thread
    hop) does not inflate the total, as scaling every outcome by calls / clocked calls did (about 1.9 times here)."""
    clock = Clock()
    calls = itertools.count()

    def call(message: Any) -> bool:
        clock.now += 3.0 if next(calls) % 10 == 0 else 1.0  # ten calls per outcome, the first one slow
        return True

    handle = _bind(monkeypatch, clock, call=call, seed=20261208)
    component = 0.0
    for _ in range(2_000):
        out = Outcome(0)
        for n in range(10):
            handle(Envelope(b"%d" % n), out, False)
        component += out.component
    true_total = 2_000 * (3.0 + 9.0)
    assert abs(component / true_total - 1.0) < 0.05


@dataclass
class Item:
    n: int


class Recorder:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = defaultdict(float)
        self.counts: dict[str, int] = defaultdict(int)

    def on_process_time(self, app_name: str, process_name: str, seconds: float, count: int) -> None:
        self.seconds[process_name] += seconds
        self.counts[process_name] += count


def test_reported_counts_are_exact_and_seconds_cover_every_call() -> None:
    """A handler that takes at least 2 ms per call (so it runs on the handler thread, every call clocked): the
    component seconds reported cover every call, and the counts are the calls."""
    broker = MemoryBroker()
    registry = build_registry()
    registry.entries["observer"] = {}
    recorder = Recorder()
    engine = Engine(app_name="t", input_queue="in", output_queues=[], metrics_port=None, registry=registry,
                    observers=[recorder], consume_batch_size=200, poll_interval_seconds=0.02,
                    queue_config={"in": {"value": "in", "profile": "memory", "data_model": Item,
                                         "config": {"broker": broker}}})
    n = 120
    for i in range(n):
        broker.publish("in", engine.input.encode(Item(i)))

    @engine.stream_app
    def handler(item: Item) -> bool:
        time.sleep(0.002)  # the work being timed, not a wait for anything
        return True

    report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.0)
    assert report.acked == n
    assert recorder.counts["component"] == recorder.counts["cycle"] == n
    assert recorder.seconds["component"] >= n * 0.002
    assert recorder.seconds["cycle"] >= recorder.seconds["component"]


def test_a_call_retried_on_the_thread_after_failing_inline_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fast handler runs inline; a message whose first inline call raises moves to the handler thread for its
    retries (``resume``). It is handled and acknowledged like the others, so it counts in the step timings too:
    the component and cycle counts are every handled message (one was missing before)."""
    from volley.run import sync_executor

    monkeypatch.setattr(sync_executor, "CALIBRATION_BATCHES", 0)  # inline from the first call, whatever the load
    broker = MemoryBroker()
    registry = build_registry()
    registry.entries["observer"] = {}
    recorder = Recorder()
    engine = Engine(app_name="t", input_queue="in", output_queues=[], metrics_port=None, registry=registry,
                    observers=[recorder], consume_batch_size=50, poll_interval_seconds=0.02, max_retries=2,
                    retry_backoff_seconds=0.0,
                    queue_config={"in": {"value": "in", "profile": "memory", "data_model": Item,
                                         "config": {"broker": broker}}})
    n = 400
    for i in range(n):
        broker.publish("in", engine.input.encode(Item(i)))
    failed_once: set[int] = set()
    inline_failures: list[bool] = []

    @engine.stream_app
    def handler(item: Item) -> bool:
        if item.n % 97 == 96 and item.n not in failed_once:
            failed_once.add(item.n)
            inline_failures.append(threading.current_thread() is threading.main_thread())
            raise RuntimeError("a first call that fails")
        return True

    report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.0)
    assert report.acked == n
    assert inline_failures[0]  # the first failure was inline, so it went through resume
    assert recorder.counts["component"] == recorder.counts["cycle"] == n
