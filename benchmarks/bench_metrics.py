"""Cost of Prometheus metrics on the in-memory pipeline: metrics on must stay within 10% of metrics off.

Prints ``metrics.overhead`` (throughput off / throughput on - 1) and both
throughputs. "off" is an Engine with no observer at all; "on" has
volley-prometheus's observer recording and serving ``/metrics`` on a free
port. Each figure is the best of ``RUNS`` runs of N messages through a
trivial sync handler on memory queues; the runs alternate (in rotating order)
so that load from elsewhere on the machine hits both sides alike.

Also printed: the same ratio on process CPU time (``metrics.overhead_cpu``: less
blurred when other work shares the machine's cores), the throughput with the observer recording but not serving
(``metrics_port=None`` with volley-prometheus installed), and the observer's
own cost per message, measured by replaying the calls the engine makes for a
batch (a figure that machine load does not blur).
"""

from __future__ import annotations

import json
import logging
import os
import time
from typing import Any

from prometheus_client import CollectorRegistry

from volley import Engine
from volley.memory import MemoryBroker
from volley.message import OutgoingMessage
from volley.plugins import Registry, build_registry
from volley_prometheus import PrometheusObserver, VolleyMetrics

N = int(os.environ.get("BENCH_METRICS_N", "200000"))
RUNS = int(os.environ.get("BENCH_METRICS_RUNS", "3"))
MODES = ("off", "on", "recording")


def _profile(registry: Registry) -> str:
    name = "memory-orjson-pydantic"
    return name if ("profile", name) in registry else "memory"


def _run(mode: str, registry: Registry, no_observers: Registry, n: int = N) -> tuple[float, float]:
    """(messages per second of wall-clock time, messages per second of process CPU time) for one run."""
    broker = MemoryBroker(keep_log=False)
    payload = json.dumps({"id": 1, "name": "benchmark", "value": 3.5}).encode()
    for start in range(0, n, 10_000):
        broker.publish_many([OutgoingMessage("bench.in", payload) for _ in range(start, min(n, start + 10_000))])
    profile = _profile(registry)
    config: dict[str, Any] = {
        "in": {"value": "bench.in", "profile": profile, "config": {"broker": broker}},
        "out": {"value": "bench.out", "profile": profile, "config": {"broker": broker}},
        "dlq": {"value": "bench.dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    kwargs: dict[str, Any] = {"app_name": "bench", "input_queue": "in", "output_queues": ["out"],
                              "dead_letter_queue": "dlq", "queue_config": config}
    if mode == "off":
        app = Engine(metrics_port=None, registry=no_observers, **kwargs)
    elif mode == "recording":
        app = Engine(metrics_port=None, registry=registry, **kwargs)
    else:
        app = Engine(metrics_port=0, registry=registry, metrics_settings={"metrics_host": "127.0.0.1"}, **kwargs)

    @app.stream_app
    def handler(message: Any) -> list[tuple[str, Any]]:
        return [("out", message)]

    started, cpu_started = time.perf_counter(), time.process_time()
    report = handler.run_until_drained(timeout=600.0, drain_idle_seconds=0.05)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    if report.consumed != n:
        raise RuntimeError(f"{mode}: consumed {report.consumed} of {n}")
    return n / elapsed, n / cpu


def _observer_cost_per_message(batch: int = 500, batches: int = 2000) -> float:
    """Microseconds per message spent in the observer for the calls the engine makes per batch."""
    observer = PrometheusObserver("bench", metrics=VolleyMetrics(CollectorRegistry()))
    component = [2e-6] * batch
    cycle = [3e-6] * batch
    started = time.perf_counter()
    for _ in range(batches):
        observer.on_consumed("bench", "success", batch)
        observer.on_process_time("bench", "component", component)
        observer.on_process_time("bench", "cycle", cycle)
        observer.on_data_model_time("construct", 0.001, batch)
        observer.on_data_model_time("deconstruct", 0.001, batch)
        observer.on_produced("bench", "bench.in", "bench.out", batch)
    return (time.perf_counter() - started) / (batch * batches) * 1e6


def main() -> None:
    logging.getLogger("volley").setLevel(logging.ERROR)
    registry = build_registry()
    if ("observer", "prometheus") not in registry:
        raise SystemExit("volley-prometheus is not installed: nothing to measure")
    no_observers = build_registry()
    no_observers.entries["observer"] = {}
    for mode in MODES:  # warm-up: imports, pydantic's and the allocator's first-use costs
        _run(mode, registry, no_observers, n=max(1, N // 10))
    best = dict.fromkeys(MODES, 0.0)
    best_cpu = dict.fromkeys(MODES, 0.0)
    for round_ in range(RUNS):
        for i in range(len(MODES)):
            mode = MODES[(i + round_) % len(MODES)]
            rate, cpu_rate = _run(mode, registry, no_observers)
            if os.environ.get("BENCH_VERBOSE"):
                print(f"# {mode}: {rate:.0f} msg/s wall, {cpu_rate:.0f} msg/s cpu")
            best[mode] = max(best[mode], rate)
            best_cpu[mode] = max(best_cpu[mode], cpu_rate)
    print(f"metrics.messages: {N}")
    print(f"metrics.profile: {_profile(registry)}")
    print(f"metrics.overhead: {best['off'] / best['on'] - 1:.4f}")
    print(f"metrics.off_msgs_per_s: {best['off']:.0f}")
    print(f"metrics.on_msgs_per_s: {best['on']:.0f}")
    print(f"metrics.recording_unserved_msgs_per_s: {best['recording']:.0f}")
    print(f"metrics.overhead_cpu: {best_cpu['off'] / best_cpu['on'] - 1:.4f}")
    print(f"metrics.observer_us_per_message: {_observer_cost_per_message():.4f}")


if __name__ == "__main__":
    main()
