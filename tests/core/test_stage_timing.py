"""Stage timings (process_time_seconds, data_model_process_seconds) are sampled: about one handler call in eight is
clocked, every call is counted, and the clocked seconds are scaled to the calls counted (handling.SAMPLE_SPREAD)."""

from __future__ import annotations

import itertools
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


def _clocked_handle(monkeypatch: pytest.MonkeyPatch, ticks: Any) -> Any:
    """A handle bound with a clock that moves one second per read, and a sampler that spaces clocked calls 8 apart."""
    monkeypatch.setattr(handling, "random", lambda: 0.5)  # int(0.5 * 15) = 7 calls skipped after each clocked one
    with monkeypatch.context() as patched:  # the clock is bound once, when the step is built
        patched.setattr(time, "perf_counter", lambda: float(next(ticks)))
        app = SimpleNamespace(call=lambda message: True, wants_context=False)
        return handling._handler(app, lambda token: None, lambda env, out: env.value,  # type: ignore[arg-type]
                                 lambda token, result, out: None, lambda *args: None, True)


def test_one_call_in_eight_is_clocked_and_every_call_is_counted(monkeypatch: pytest.MonkeyPatch) -> None:
    handle = _clocked_handle(monkeypatch, itertools.count(1))
    out = Outcome(0)
    for n in range(800):
        assert handle(Envelope(b"%d" % n), out) is None
    assert out.timed == 800  # the count of the metrics: every call that returned
    assert out.sampled == 100  # clocked: the first, then one after every seven skipped
    # Each clocked call read the clock four times, one second apart: one second per step.
    assert (out.construct, out.component, out.deconstruct) == (100.0, 100.0, 100.0)


def test_the_first_call_of_every_outcome_is_clocked(monkeypatch: pytest.MonkeyPatch) -> None:
    """An outcome that counts calls has clocked at least one, so its seconds can be scaled (a quiet worker with one
    message per outcome has every message clocked)."""
    handle = _clocked_handle(monkeypatch, itertools.count(1))
    for n in range(20):
        out = Outcome(0)
        handle(Envelope(b"%d" % n), out)
        assert (out.timed, out.sampled) == (1, 1)


def test_a_caller_clock_read_starts_the_first_step() -> None:
    """The inline slice passes the clock it read for the message (t0): a clocked call uses it."""
    ticks = itertools.count(10)
    app = SimpleNamespace(call=lambda message: True, wants_context=False)
    with pytest.MonkeyPatch.context() as patched:
        patched.setattr(time, "perf_counter", lambda: float(next(ticks)))
        handle = handling._handler(app, lambda token: None, lambda env, out: env.value,  # type: ignore[arg-type]
                                   lambda token, result, out: None, lambda *args: None, True)
    out = Outcome(0)
    handle(Envelope(b"1"), out, True, handling.UNDECODED, 4.0)
    assert out.construct == 6.0  # t1 (10) - the caller's t0 (4)


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


def test_reported_seconds_are_scaled_to_every_call() -> None:
    """A handler that takes at least 2 ms per call: the component seconds reported cover every call (unscaled, the
    clocked eighth would report about an eighth of that)."""
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
    assert recorder.seconds["component"] >= n * 0.002 * 0.9
    assert recorder.seconds["cycle"] >= recorder.seconds["component"]
