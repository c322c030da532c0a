"""A tracer that raises does not stop the pipeline (tracing is observability).

A span processor or exporter of the user's SDK with a bug, raising when a span starts or ends, made the engine's
process task die on the first message: nothing was handled (traced or not), nothing was logged at the time, and
the run waited its whole shutdown_timeout_seconds for work nothing would finish before raising the SDK's error.
Now each tracer call is guarded: the failure is logged once per kind of call, the message is handled (untraced
when its trace could not start) and acknowledged.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest
from opentelemetry.context import Context
from opentelemetry.sdk.trace import ReadableSpan, Span, SpanProcessor, TracerProvider

from volley import Engine, MemoryBroker

UPSTREAM = b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


class Broken(SpanProcessor):
    def __init__(self, on: str) -> None:
        self.on = on
        self.calls = 0

    def on_start(self, span: Span, parent_context: Context | None = None) -> None:
        if self.on == "start":
            self.calls += 1
            raise RuntimeError("span processor bug at start")

    def on_end(self, span: ReadableSpan) -> None:
        if self.on == "end":
            self.calls += 1
            raise RuntimeError("span processor bug at end")


def raw(broker: MemoryBroker, value: str, **settings: Any) -> dict[str, Any]:
    return {"value": value, "profile": "memory", "serializer": "none", "model_handler": "none",
            "config": {"broker": broker}, **settings}


def app_with(broker: MemoryBroker, processor: SpanProcessor, batch: int | None) -> Engine:
    provider = TracerProvider()
    provider.add_span_processor(processor)
    queues = {"in": raw(broker, "orders", **({"batch_size": batch} if batch else {})),
              "out": raw(broker, "shipped"), "dlq": raw(broker, "dlq", profile="memory-dlq")}
    return Engine(app_name="traced", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                  queue_config=queues, metrics_port=None, poll_interval_seconds=0.01, shutdown_timeout_seconds=20,
                  tracing="otel", tracing_settings={"tracer_provider": provider})


@pytest.mark.parametrize("where", ["start", "end"])
@pytest.mark.parametrize("kind", ["sync", "async", "batch"])
def test_a_raising_span_processor_does_not_stop_the_pipeline(where: str, kind: str,
                                                            caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    processor = Broken(where)
    app = app_with(broker, processor, 5 if kind == "batch" else None)
    for n in range(10):  # half with an upstream trace context, half without
        broker.publish("orders", b"m%d" % n, headers={"traceparent": UPSTREAM} if n % 2 else None)

    if kind == "sync":
        def handler(message: bytes) -> list[tuple[str, bytes]]:
            return [("out", message)]
    elif kind == "async":
        async def handler(message: bytes) -> list[tuple[str, bytes]]:  # type: ignore[misc]
            await asyncio.sleep(0)
            return [("out", message)]
    else:
        def handler(messages: list[bytes]) -> list[tuple[str, bytes]]:  # type: ignore[misc]
            return [("out", m) for m in messages]

    started = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="volley"):
        report = app.stream_app(handler).run_until_drained(timeout=15)
    assert report.acked == 10, report
    assert sorted(broker.produced("shipped")) == sorted(b"m%d" % n for n in range(10))
    assert broker.depth("dlq") == 0
    assert processor.calls > 0, "the broken processor was never reached: the test proves nothing"
    failures = [r for r in caplog.records if "the tracer's" in r.getMessage()]
    assert len(failures) == 1, [r.getMessage() for r in caplog.records]  # once per kind of call, not per message
    assert f"bug at {where}" in failures[0].getMessage()
    # Counted for the whole run, not only logged once: every failing call.
    assert report.tracer_failures == processor.calls, report
    assert [e for e in report.errors if e.startswith("tracer ")] != []
    # Not the 20 s shutdown deadline spent waiting for work a dead task would never finish.
    assert time.monotonic() - started < 10
