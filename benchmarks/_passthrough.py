"""What the observability benchmarks (bench_metrics, bench_otel) share: a pass-through app on the memory broker
run until drained, timed by the wall clock and by process CPU time, and the best of several rounds per mode.

Each round runs every mode once, starting one mode later than the round before, so that a slow stretch of this
shared machine does not always fall on the same mode.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

from volley import Engine
from volley.memory import MemoryBroker
from volley.message import Headers, OutgoingMessage
from volley.plugins import Registry

Rates = tuple[float, float]
"""Messages per second of wall-clock time, and of process CPU time."""


def memory_profile(registry: Registry) -> str:
    name = "memory-orjson-pydantic"
    return name if ("profile", name) in registry else "memory"


def run_pass_through(mode: str, n: int, profile: str, engine: Callable[[dict[str, Any]], Engine], *,
                     dead_letters: bool = False, finish: Callable[[], None] | None = None,
                     input_headers: Headers | None = None, drain_idle_seconds: float = 0.05) -> Rates:
    """One run of ``n`` messages through the app ``engine`` builds from the Engine arguments it is given;
    ``finish`` (a tracer's flush) runs before the clock stops. ``input_headers``: what each input carries
    (copied per message); ``drain_idle_seconds``: the wait for more input once it is drained (in the time)."""
    broker = MemoryBroker(keep_log=False)
    payload = json.dumps({"id": 1, "name": "benchmark", "value": 3.5}).encode()
    for start in range(0, n, 10_000):
        broker.publish_many([OutgoingMessage("bench.in", payload, None,
                                             None if input_headers is None else dict(input_headers))
                             for _ in range(start, min(n, start + 10_000))])
    config: dict[str, Any] = {
        "in": {"value": "bench.in", "profile": profile, "config": {"broker": broker}},
        "out": {"value": "bench.out", "profile": profile, "config": {"broker": broker}},
    }
    kwargs: dict[str, Any] = {"app_name": "bench", "input_queue": "in", "output_queues": ["out"],
                              "queue_config": config}
    if dead_letters:
        config["dlq"] = {"value": "bench.dlq", "profile": "memory-dlq", "config": {"broker": broker}}
        kwargs["dead_letter_queue"] = "dlq"
    app = engine(kwargs)

    @app.stream_app
    def handler(message: Any) -> list[tuple[str, Any]]:
        return [("out", message)]

    started, cpu_started = time.perf_counter(), time.process_time()
    report = handler.run_until_drained(timeout=600.0, drain_idle_seconds=drain_idle_seconds)
    if finish is not None:
        finish()
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if report.consumed != n:
        raise RuntimeError(f"{mode}: consumed {report.consumed} of {n}")
    return n / elapsed, n / cpu


def rounds_of(modes: Sequence[str], rounds: int, n: int, run: Callable[[str, int], Rates]) -> dict[str, list[Rates]]:
    """Each mode's rates in each of ``rounds`` rounds, after a warm-up run of each (imports, pydantic's and the
    allocator's first-use costs). BENCH_VERBOSE=1 prints every run."""
    for mode in modes:
        run(mode, max(1, n // 10))
    rates: dict[str, list[Rates]] = {mode: [] for mode in modes}
    for round_ in range(rounds):
        for i in range(len(modes)):
            mode = modes[(i + round_) % len(modes)]
            rate, cpu_rate = run(mode, n)
            if os.environ.get("BENCH_VERBOSE"):
                print(f"# {mode}: {rate:.0f} msg/s wall, {cpu_rate:.0f} msg/s cpu")
            rates[mode].append((rate, cpu_rate))
    return rates


def best_of(rates: dict[str, list[Rates]]) -> tuple[dict[str, float], dict[str, float]]:
    """The best wall-clock and the best CPU rate of each mode."""
    return ({mode: max(rate for rate, _ in runs) for mode, runs in rates.items()},
            {mode: max(cpu for _, cpu in runs) for mode, runs in rates.items()})


def best_rates(modes: Sequence[str], rounds: int, n: int,
               run: Callable[[str, int], Rates]) -> tuple[dict[str, float], dict[str, float]]:
    """The best wall-clock and CPU rates of each mode over ``rounds`` rounds (``rounds_of``)."""
    return best_of(rounds_of(modes, rounds, n, run))
