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

import logging
import os
import time
from typing import Any

from _passthrough import Rates, best_rates, memory_profile, run_pass_through
from prometheus_client import CollectorRegistry

from volley import Engine
from volley.plugins import Registry, build_registry
from volley_prometheus import PrometheusObserver, VolleyMetrics

N = int(os.environ.get("BENCH_METRICS_N", "200000"))
RUNS = int(os.environ.get("BENCH_METRICS_RUNS", "3"))
MODES = ("off", "on", "recording")


def _run(mode: str, n: int, registry: Registry, no_observers: Registry) -> Rates:
    def engine(kwargs: dict[str, Any]) -> Engine:
        if mode == "off":
            return Engine(metrics_port=None, registry=no_observers, **kwargs)
        if mode == "recording":
            return Engine(metrics_port=None, registry=registry, **kwargs)
        return Engine(metrics_port=0, registry=registry, metrics_settings={"metrics_host": "127.0.0.1"}, **kwargs)

    return run_pass_through(mode, n, memory_profile(registry), engine, dead_letters=True)


def _observer_cost_per_message(batch: int = 500, batches: int = 2000) -> float:
    """Microseconds per message spent in the observer for the calls the engine makes per batch."""
    observer = PrometheusObserver("bench", metrics=VolleyMetrics(CollectorRegistry()))
    started = time.perf_counter()
    for _ in range(batches):
        observer.on_consumed("bench", "success", batch)
        observer.on_process_time("bench", "component", 2e-6 * batch, batch)
        observer.on_process_time("bench", "cycle", 3e-6 * batch, batch)
        observer.on_data_model_time("construct", 0.001, batch)
        observer.on_data_model_time("deconstruct", 0.001, batch)
        observer.on_produced("bench", "bench.in", "bench.out", batch)
        observer.on_delivery("bench", "success", batch)
    return (time.perf_counter() - started) / (batch * batches) * 1e6


def main() -> None:
    logging.getLogger("volley").setLevel(logging.ERROR)
    registry = build_registry()
    if ("observer", "prometheus") not in registry:
        raise SystemExit("volley-prometheus is not installed: nothing to measure")
    no_observers = build_registry()
    no_observers.entries["observer"] = {}
    best, best_cpu = best_rates(MODES, RUNS, N, lambda mode, n: _run(mode, n, registry, no_observers))
    print(f"metrics.messages: {N}")
    print(f"metrics.profile: {memory_profile(registry)}")
    print(f"metrics.overhead: {best['off'] / best['on'] - 1:.4f}")
    print(f"metrics.off_msgs_per_s: {best['off']:.0f}")
    print(f"metrics.on_msgs_per_s: {best['on']:.0f}")
    print(f"metrics.recording_unserved_msgs_per_s: {best['recording']:.0f}")
    print(f"metrics.overhead_cpu: {best_cpu['off'] / best_cpu['on'] - 1:.4f}")
    print(f"metrics.observer_us_per_message: {_observer_cost_per_message():.4f}")


if __name__ == "__main__":
    main()
