"""Core benchmark: the engine on in-memory queues against a bare Python loop doing the same per-message work.

Per message, both do: Pydantic v2 validation of the JSON bytes, the handler, the dump to JSON bytes (the
fastest way we know: Pydantic's own parser and encoder, ``_orders.work``; what the engine's orjson + pydantic
profile does). The engine additionally consumes from and
produces to memory queues and acknowledges every input after its output is
confirmed; it runs with its default settings (consume_batch_size=500). The
engine's throughput is timed from the first message it took to the last one it
acknowledged, as the Kafka benchmark does (``_start_to_drained`` also counts the
app's start and stop). The runs alternate and each figure is the best of
CORE_RUNS (default 15), because this machine's speed drifts by several percent
from one second to the next. Prints `name: value` lines:

    core.bare_msgs_per_s, core.engine_msgs_per_s, core.efficiency (engine / bare, target >= 0.80),
    core.bare_two_step_msgs_per_s (the bare loop of the runs before the fused codecs, for comparison only),
    core.efficiency_median, core.efficiency_paired (median of each round's engine / bare),
    core.engine_msgs_per_s_start_to_drained, core.efficiency_start_to_drained,
    core.efficiency_cpu (best CPU times), core.efficiency_untuned_gc
    (Engine(tune_gc=False)), core.efficiency_with_metrics (volley-prometheus recording),
    core.async_msgs_per_s (async handler awaiting 10 ms, 100 keys, max_in_flight=100; target >= 5000),
    and, where valgrind is installed (CORE_INSTRUCTIONS=0 skips it, ~3 minutes), core.bare_instructions_per_msg,
    core.engine_instructions_per_msg and core.efficiency_instructions (bare / engine instructions per message:
    what core.efficiency would be if time followed instructions; steadier than times on a shared machine, though
    not exact: slices, thread switches and collections still depend on timing, so it moves by a few percent),
    and (CORE_BACKLOG=0 skips it) the peak RSS of a ``volley run`` worker facing a backlog of 1,000,000 and of 100,000
    in a SQLite queue: core.peak_rss_mb_backlog, core.peak_rss_mb_backlog_100k, core.peak_rss_backlog_ratio
    (bounded: within 10% of 1), core.rss_growth_mb_backlog (``_backlog.py``)
"""

from __future__ import annotations

import asyncio
import gc
import logging
import os
import shutil
import statistics
import sys
import time
from collections.abc import Iterable
from typing import Any

import _instructions
import orjson
from _orders import load_model
from _orders import payloads as make_payloads

from volley import Engine, Envelope, MemoryBroker
from volley.plugins import build_registry, get_registry

N = 30_000
REPEATS = int(os.environ.get("CORE_RUNS", "15"))
COUNT_LOW, COUNT_HIGH = 2_000, 8_000  # messages per process of the instruction count (valgrind: ~50x slower)


_MODEL = load_model()
Order, Enriched, handle = _MODEL.Order, _MODEL.Enriched, _MODEL.handle


def bare_loop(payloads: list[bytes]) -> float:
    work = _MODEL.work
    out: list[bytes] = []
    append = out.append
    started = time.perf_counter()
    for raw in payloads:
        append(work(raw))
    elapsed = time.perf_counter() - started
    assert len(out) == len(payloads)
    return len(payloads) / elapsed


def bare_two_step_loop(payloads: list[bytes]) -> float:
    """The bare loop as every round before the fused codecs wrote it: orjson to a dict, Python-mode validation,
    the handler, a Python-mode dump, orjson. Printed for comparison with those runs only (not a ceiling: the
    engine does the work the faster way)."""
    loads, dumps, validate = orjson.loads, orjson.dumps, Order.model_validate
    out: list[bytes] = []
    append = out.append
    started = time.perf_counter()
    for raw in payloads:
        append(dumps(handle(validate(loads(raw))).model_dump()))
    elapsed = time.perf_counter() - started
    assert len(out) == len(payloads)
    return len(payloads) / elapsed


def profiles() -> tuple[str, dict[str, Any]]:
    registry = get_registry()
    if ("profile", "memory-orjson-pydantic") in registry:
        return "memory-orjson-pydantic", {}
    raise SystemExit("bench_core needs volley-serializers[orjson,pydantic] installed (profile memory-orjson-pydantic)")


class TimedBroker(MemoryBroker):
    """Notes when the engine took its first message and when it acknowledged its last one."""

    first_take = 0.0
    last_ack = 0.0

    def take(self, queue_name: str, max_messages: int, owner: int = 0) -> list[Envelope]:
        asked = time.perf_counter()  # stamped before the take, so that the take itself is inside the window
        taken = super().take(queue_name, max_messages, owner)
        if taken and not self.first_take:
            self.first_take = asked
        return taken

    def ack(self, queue_name: str, positions: Iterable[int], owner: int = 0) -> None:
        super().ack(queue_name, positions, owner)
        self.last_ack = time.perf_counter()


def engine_run(payloads: list[bytes], *, tune_gc: bool = True, metrics: bool = False,
               max_messages: int | None = None) -> tuple[float, float, float]:
    """(messages per second from the first message taken to the last one acknowledged, the same from start to
    drained, CPU seconds from start to drained); seeding is excluded. ``max_messages``: stop after that many.

    ``metrics``: with the observers installed in this environment (volley-prometheus records the py-volley
    metrics even with metrics_port=None); without, the engine alone, doing what the bare loop does.
    """
    profile, _ = profiles()
    registry = build_registry()
    if not metrics:
        registry.entries["observer"] = {}
    broker = TimedBroker(keep_log=False)
    for raw in payloads:
        broker.publish("orders", raw)
    config = {
        "orders": {"value": "orders", "profile": profile, "data_model": Order, "config": {"broker": broker}},
        "enriched": {"value": "enriched", "profile": profile, "data_model": Enriched, "config": {"broker": broker}},
    }
    app = Engine(app_name="bench", input_queue="orders", output_queues=["enriched"], queue_config=config,
                 metrics_port=None, poll_interval_seconds=0.01, tune_gc=tune_gc,
                 registry=registry)

    @app.stream_app
    def handler(order: Order) -> list[tuple[str, Enriched]]:
        return [("enriched", handle(order))]

    count = len(payloads) if max_messages is None else max_messages
    started, cpu_started = time.perf_counter(), time.process_time()
    report = handler.run_until_drained(timeout=600, drain_idle_seconds=0.0, max_messages=max_messages)
    elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu_started
    assert report.acked == count, report
    assert broker.depth("enriched") == count
    assert started < broker.first_take < broker.last_ack < started + elapsed
    return count / (broker.last_ack - broker.first_take), count / elapsed, cpu


def async_run(n: int = 20_000, keys: int = 100) -> float:
    broker = MemoryBroker(keep_log=False)
    for i in range(n):
        broker.publish("work", orjson.dumps({"i": i}), key=f"k{i % keys}".encode())
    config = {
        "work": {"value": "work", "profile": "memory", "ordering": "key", "config": {"broker": broker}},
        "done": {"value": "done", "profile": "memory", "config": {"broker": broker}},
    }
    app = Engine(app_name="bench-async", input_queue="work", output_queues=["done"], queue_config=config,
                 metrics_port=None, poll_interval_seconds=0.01, max_in_flight=100)

    @app.stream_app
    async def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        await asyncio.sleep(0.01)
        return [("done", message)]

    started = time.perf_counter()
    report = handler.run_until_drained(timeout=600, drain_idle_seconds=0.0)
    elapsed = time.perf_counter() - started
    assert report.acked == n, report
    return n / elapsed


def counted_work(mode: str, count: int, total: int) -> None:
    """One process's share of the instruction count: warm both paths up, then handle ``count`` messages of
    ``total`` generated (and, for the engine, seeded), so that only ``count`` varies between processes."""
    payloads = make_payloads(total)
    warm = make_payloads(2_000)
    bare_loop(warm)
    engine_run(warm)
    if mode == "bare":
        bare_loop(payloads[:count])
    else:
        engine_run(payloads, max_messages=count)


def instructions_per_message() -> dict[str, float] | None:
    """CPU instructions per message of the bare loop and of the engine, counted by valgrind (cachegrind) as the
    difference between a process handling COUNT_HIGH and one handling COUNT_LOW messages: start-up, imports and
    warm-up cancel out. Counts move far less than times with the machine's load. None without valgrind."""
    valgrind = shutil.which("valgrind")
    if valgrind is None or os.environ.get("CORE_INSTRUCTIONS", "1") == "0":
        return None

    return _instructions.per_message(valgrind, __file__, ("bare", "engine"), COUNT_LOW, COUNT_HIGH,
                                     extra=(str(COUNT_HIGH),))


def main() -> None:
    if sys.argv[1:2] == ["--count"]:
        logging.basicConfig(level=logging.ERROR)
        counted_work(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]))
        return
    logging.basicConfig(level=logging.WARNING)
    payloads = make_payloads(N)
    gc.collect()
    bare, engine, whole, bare_cpu, engine_cpu, untuned, metered = [], [], [], [], [], [], []
    two_step: list[float] = []
    for _ in range(REPEATS):  # interleaved so that machine noise hits all alike
        started = time.process_time()
        bare.append(bare_loop(payloads))
        bare_cpu.append(time.process_time() - started)
        two_step.append(bare_two_step_loop(payloads))
        rate, rate_whole, cpu = engine_run(payloads)
        engine.append(rate)
        whole.append(rate_whole)
        engine_cpu.append(cpu)
        untuned.append(engine_run(payloads, tune_gc=False)[0])
        metered.append(engine_run(payloads, metrics=True)[0])
    best_bare, best_engine = max(bare), max(engine)
    print(f"core.messages: {N}")
    print(f"core.runs: {REPEATS}")
    print(f"core.bare_msgs_per_s: {best_bare:.0f}")
    print(f"core.bare_two_step_msgs_per_s: {max(two_step):.0f}")
    print(f"core.engine_msgs_per_s: {best_engine:.0f}")
    print(f"core.efficiency: {best_engine / best_bare:.3f}")
    print(f"core.efficiency_median: {statistics.median(engine) / statistics.median(bare):.3f}")
    # Each round's engine run against the bare run just before it (the two share the machine's mood), median.
    print(f"core.efficiency_paired: {statistics.median(e / b for e, b in zip(engine, bare, strict=True)):.3f}")
    # Also counting the app's start (threads, connectors) and its stop (drain check, shutdown, and the garbage
    # collection that tune_gc put off), about 1 + 10 ms per run here.
    print(f"core.engine_msgs_per_s_start_to_drained: {max(whole):.0f}")
    print(f"core.efficiency_start_to_drained: {max(whole) / best_bare:.3f}")
    # CPU time is steadier than wall time on a shared machine (both sides: the work only, no seeding; the
    # engine from start to drained).
    print(f"core.efficiency_cpu: {min(bare_cpu) / min(engine_cpu):.3f}")
    # The same engine with Engine(tune_gc=False): CPython's default collector thresholds.
    print(f"core.efficiency_untuned_gc: {max(untuned) / best_bare:.3f}")
    # With the installed observers recording (volley-prometheus: py-volley's metrics, per-message timings).
    print(f"core.efficiency_with_metrics: {max(metered) / best_bare:.3f}")
    print(f"core.async_msgs_per_s: {async_run():.0f}", flush=True)
    counted = instructions_per_message()
    if counted is not None:
        print(f"core.bare_instructions_per_msg: {counted['bare']:.0f}")
        print(f"core.engine_instructions_per_msg: {counted['engine']:.0f}")
        # engine / bare in throughput terms, from instructions: a steadier stand-in for core.efficiency
        print(f"core.efficiency_instructions: {counted['bare'] / counted['engine']:.3f}")
    if os.environ.get("CORE_BACKLOG", "1") != "0":  # peak RSS under a backlog, about 1.5 minutes (_backlog.py)
        from _backlog import backlog_figures

        for line in backlog_figures():
            print(line, flush=True)


if __name__ == "__main__":
    main()
