"""Cost of tracing with volley-otel on the in-memory pipeline (issue targets: otel.overhead <= 0.15 with the SDK
recording every message into a no-op exporter; otel.overhead_not_installed <= 0.02).

Modes, each N messages through a trivial sync handler (one output per input) on memory queues, all in this one
process, OTEL_RUNS rounds each running every mode once (in rotating order, so that load that comes and goes
blurs every mode alike); each mode's figure is its best round (fastest wall-clock time, least process CPU time:
what it costs when the machine is not also busy elsewhere). A run is timed from its start until its input is
drained (no idle wait), its seeding excluded:

- ``off``: volley-otel installed, tracing not named (the default);
- ``not_installed``: a registry without volley-otel's plugin, tracing not named;
- ``sdk_simple`` / ``sdk_batch``: ``tracing="otel"`` with an SDK TracerProvider whose SimpleSpanProcessor /
  BatchSpanProcessor feeds an exporter that drops everything (the sampler records every span);
- ``sdk_ratio``: the SDK with ``ParentBased(TraceIdRatioBased(0.01))``: 1 % of the traces recorded;
- ``api_only``: ``tracing="otel"`` with no SDK configured (the API's global proxy provider: no spans, the
  context still flows);
- ``off_ctx`` / ``api_only_ctx``: as ``off`` / ``api_only``, every input carrying a ``traceparent`` (a later hop
  of a traced pipeline: without an SDK its context is made current for the handler and passed on).

Prints ``otel.overhead`` (sdk_simple against off, wall-clock time), ``otel.overhead_batch``,
``otel.overhead_sampled_1pct``, ``otel.overhead_api_only``, ``otel.overhead_api_only_ctx`` (against off_ctx),
``otel.overhead_not_installed`` (off against not_installed: the same code, so what is left is noise), each also on
process CPU time (``_cpu``: less blurred when other work shares the cores) and as the median of the rounds' CPU
ratios (``_cpu_median``: how far apart it and ``_cpu`` are tells how much load blurred them), each throughput, the
pipeline's CPU time per message without tracing, and two figures that machine load blurs less still (thread CPU
time): ``otel.sdk_span_us`` (one SDK span started with the process span's attributes and ended, alone),
``otel.sdk_bare_span_us`` (the same without attributes or span processor: the least any SDK span costs),
``otel.send_spans_us_per_record`` (with ``send_spans``: a producer call's send span linking its 100 records, per
record) and
``otel.tracer_us_per_message_<mode>[_ctx]`` (volley-otel's whole per-message work in that mode, for an input
without / with a ``traceparent``, replayed outside the engine), with ``otel.overhead_from_parts_<mode>[_ctx]``
(that cost over the pipeline's CPU time per message).
"""

from __future__ import annotations

import logging
import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

from _passthrough import Rates, best_of, memory_profile, rounds_of, run_pass_through
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    SimpleSpanProcessor,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
from opentelemetry.trace import SpanKind

from volley import Engine
from volley.message import Envelope, OutgoingMessage
from volley.plugins import Registry, build_registry
from volley.ports import QueueSpec
from volley_otel import OtelTracer

N = int(os.environ.get("BENCH_OTEL_N", "20000"))
RUNS = int(os.environ.get("OTEL_RUNS", "7"))
MODES = ("off", "not_installed", "sdk_simple", "sdk_batch", "sdk_ratio", "api_only", "off_ctx", "api_only_ctx")
UPSTREAM = {"traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"}


class DroppingExporter(SpanExporter):
    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        return SpanExportResult.SUCCESS

    def shutdown(self) -> None:
        pass


def _provider(mode: str) -> TracerProvider:
    sampler = ParentBased(TraceIdRatioBased(0.01)) if mode == "sdk_ratio" else None
    provider = TracerProvider(sampler=sampler)
    exporter = DroppingExporter()
    processor = BatchSpanProcessor(exporter) if mode == "sdk_batch" else SimpleSpanProcessor(exporter)
    provider.add_span_processor(processor)
    return provider


def _run(mode: str, n: int, registry: Registry, without_otel: Registry) -> Rates:
    provider = _provider(mode) if mode.startswith("sdk_") else None

    def engine(kwargs: dict[str, Any]) -> Engine:
        kwargs["metrics_port"] = None
        if mode in ("off", "off_ctx"):
            return Engine(registry=registry, **kwargs)
        if mode == "not_installed":
            return Engine(registry=without_otel, **kwargs)
        if mode in ("api_only", "api_only_ctx"):
            return Engine(registry=registry, tracing="otel", tracing_settings={"log_correlation": False}, **kwargs)
        return Engine(registry=registry, tracing="otel",
                      tracing_settings={"tracer_provider": provider, "log_correlation": False}, **kwargs)

    # A batch processor's export of what is left counts too.
    return run_pass_through(mode, n, memory_profile(registry), engine,
                            finish=provider.shutdown if provider is not None else None,
                            input_headers=UPSTREAM if mode.endswith("_ctx") else None, drain_idle_seconds=0.0)


def _sdk_span_us(count: int = 20_000, *, bare: bool = False) -> float:
    """Thread CPU time of one SDK span started and ended, with the process span's attributes and the
    SimpleSpanProcessor of the bench (``bare``: no attributes, no span processor); best of 5 stretches."""
    provider = TracerProvider() if bare else _provider("sdk_simple")
    tracer = provider.get_tracer("bench")
    attributes = None if bare else {"messaging.system": "memory", "messaging.destination.name": "bench.in",
                                    "messaging.operation.type": "process", "messaging.message.id": "1"}
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()  # CPU time of this thread: waiting for a core under load does not count
        for _ in range(count // 5):
            tracer.start_span("process bench.in", None, SpanKind.CONSUMER, attributes).end()
        best = min(best, time.thread_time() - started)
    provider.shutdown()
    return best / (count // 5) * 1e6


def _tracer_us_per_message(mode: str, count: int = 20_000, *, upstream: bool = False) -> float:
    """volley-otel's per-message calls, as the engine makes them for one input with one output (``upstream``: the
    input carries a ``traceparent``); best of 5 stretches."""
    provider = None if mode == "api_only" else _provider(mode)
    spec = QueueSpec(name="in", value="bench.in", connector="memory")
    run = OtelTracer("bench", tracer_provider=provider, log_correlation=False).bind(
        spec, [QueueSpec(name="out", value="bench.out", connector="memory", role="output")])
    env = Envelope(b"{}", headers=dict(UPSTREAM) if upstream else None, position=1, source="bench.in")
    members = [env]
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        for _ in range(count // 5):
            trace = run.start(members, False)
            if trace is None:  # nothing to trace: the engine handles the message untraced
                continue
            activation = trace.activate()
            trace.deactivate(activation)
            trace.inject(None)
            trace.end()
        best = min(best, time.thread_time() - started)
    if provider is not None:
        provider.shutdown()
    return best / (count // 5) * 1e6


def _send_spans_us_per_record(records: int = 100, calls: int = 200) -> float:
    """With ``send_spans`` on: the send span of one producer call of ``records`` records (each linked), per
    record; best of 5 stretches."""
    provider = _provider("sdk_simple")
    spec = QueueSpec(name="in", value="bench.in", connector="memory")
    run = OtelTracer("bench", tracer_provider=provider, log_correlation=False, send_spans=True).bind(
        spec, [QueueSpec(name="out", value="bench.out", connector="memory", role="output")])
    sent = []
    for position in range(records):
        trace = run.start([Envelope(b"{}", position=position, source="bench.in")], False)
        sent.append(OutgoingMessage("bench.out", b"{}", None, trace.inject(None)))
        trace.end()
    best = float("inf")
    for _ in range(5):
        started = time.thread_time()
        for _ in range(calls // 5):
            run.sent(sent)
        best = min(best, time.thread_time() - started)
    provider.shutdown()
    return best / (calls // 5) / records * 1e6


def main() -> None:
    logging.getLogger("volley").setLevel(logging.ERROR)
    logging.getLogger("opentelemetry").setLevel(logging.ERROR)  # "Queue full, dropping Span" when load peaks
    registry = build_registry()
    if ("tracer", "otel") not in registry:
        raise SystemExit("volley-otel is not installed: nothing to measure")
    without_otel = build_registry()
    for entries in without_otel.entries.values():
        for name in [n for n, entry in entries.items() if entry.distribution == "volley-otel"]:
            del entries[name]
    rates = rounds_of(MODES, RUNS, N, lambda mode, n: _run(mode, n, registry, without_otel))
    best, best_cpu = best_of(rates)

    def paired_cpu(mode: str, base: str) -> float:
        """The median over rounds of that round's CPU-time ratio: a second estimate, as load-blurred as the
        rounds are, whose distance from the best-of figure says how far to trust either."""
        return statistics.median(b[1] / m[1] - 1 for m, b in zip(rates[mode], rates[base], strict=True))

    off, off_cpu = best["off"], best_cpu["off"]
    print(f"otel.messages: {N}")
    print(f"otel.rounds: {RUNS}")
    print(f"otel.profile: {memory_profile(registry)}")
    for label, mode, base in (("", "sdk_simple", "off"), ("_batch", "sdk_batch", "off"),
                              ("_sampled_1pct", "sdk_ratio", "off"), ("_api_only", "api_only", "off"),
                              ("_api_only_ctx", "api_only_ctx", "off_ctx")):
        print(f"otel.overhead{label}: {best[base] / best[mode] - 1:.4f}")
        print(f"otel.overhead{label}_cpu: {best_cpu[base] / best_cpu[mode] - 1:.4f}")
        print(f"otel.overhead{label}_cpu_median: {paired_cpu(mode, base):.4f}")
    print(f"otel.overhead_not_installed: {best['not_installed'] / off - 1:.4f}")
    print(f"otel.overhead_not_installed_cpu: {best_cpu['not_installed'] / off_cpu - 1:.4f}")
    print(f"otel.overhead_not_installed_cpu_median: {paired_cpu('off', 'not_installed'):.4f}")
    for mode in MODES:
        print(f"otel.{mode}_msgs_per_s: {best[mode]:.0f}")
    print(f"otel.pipeline_cpu_us_per_message: {1e6 / off_cpu:.2f}")
    print(f"otel.sdk_span_us: {_sdk_span_us():.2f}")
    print(f"otel.sdk_bare_span_us: {_sdk_span_us(bare=True):.2f}")
    print(f"otel.send_spans_us_per_record: {_send_spans_us_per_record():.2f}")
    for mode in ("sdk_simple", "sdk_batch", "sdk_ratio", "api_only"):
        for suffix, upstream in (("", False), ("_ctx", True)):
            tracer_us = _tracer_us_per_message(mode, upstream=upstream)
            print(f"otel.tracer_us_per_message_{mode}{suffix}: {tracer_us:.2f}")
            # The overhead that the tracer's own CPU cost implies, against the pipeline's: what the in-engine
            # figures above would read without machine load (a loaded machine also moves slow runs to the handler
            # thread).
            print(f"otel.overhead_from_parts_{mode}{suffix}: {tracer_us * off_cpu / 1e6:.4f}")


if __name__ == "__main__":
    main()
