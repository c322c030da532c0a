"""volley-otel on the in-memory broker, recorded by the SDK's in-memory exporter.

What docs/tracing.md promises: a two-hop pipeline is one trace; the handler's own spans are children of the
message's process span and its log records carry the ids; retries are events, a dead letter carries the failed
span's context and a replay of it continues that trace; batches link their members; without an SDK the context
still flows through.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest
from opentelemetry import baggage, trace
from opentelemetry.trace import SpanKind, StatusCode

from volley import Engine, MemoryBroker
from volley.dlq.letter import DeadLetter
from volley.errors import ConfigurationError
from volley_otel import TRACE_HEADERS

UPSTREAM = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def raw(broker: MemoryBroker, value: str, **settings: Any) -> dict[str, Any]:
    return {"value": value, "profile": "memory", "serializer": "none", "model_handler": "none",
            "config": {"broker": broker}, **settings}


def make_app(broker: MemoryBroker, recorder: Any, source: str, sink: str, *, name: str = "app",
             dlq: str | None = None, settings: dict[str, Any] | None = None, **kwargs: Any) -> Engine:
    queues = {"in": raw(broker, source, **kwargs.pop("source_settings", {})), "out": raw(broker, sink)}
    if dlq is not None:
        queues["dlq"] = raw(broker, dlq, profile="memory-dlq")
    return Engine(app_name=name, input_queue="in", output_queues=["out"], dead_letter_queue="dlq" if dlq else None,
                  queue_config=queues, metrics_port=None, poll_interval_seconds=0.01, tracing="otel",
                  tracing_settings={"tracer_provider": recorder.provider, **(settings or {})},
                  retry_backoff_seconds=0.001, **kwargs)


def traceparent(headers: Any) -> str:
    return headers["traceparent"].decode()


def span_id_hex(span: Any) -> str:
    return format(span.context.span_id, "016x")


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_two_hop_pipeline_is_one_trace(recorder: Any, use_async: bool, caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    first = make_app(broker, recorder, "orders", "enriched", name="first")
    second = make_app(broker, recorder, "enriched", "shipped", name="second")
    broker.publish("orders", b"o-1", headers={"traceparent": UPSTREAM.encode(), "other": b"kept"})
    handler_logger = logging.getLogger("tests.otel.handler")
    own = trace.get_tracer("tests", tracer_provider=recorder.provider)

    def work(message: bytes) -> list[tuple[str, bytes]]:
        with own.start_as_current_span("handler work"):
            handler_logger.warning("handling %r", message)
        return [("out", message + b"+")]

    if use_async:
        async def handler(message: bytes) -> list[tuple[str, bytes]]:
            await asyncio.sleep(0)
            return work(message)
    else:
        def handler(message: bytes) -> list[tuple[str, bytes]]:  # type: ignore[misc]
            return work(message)

    with caplog.at_level(logging.WARNING, logger="tests.otel.handler"):
        assert first.stream_app(handler).run_until_drained(timeout=10).acked == 1
        assert second.stream_app(handler).run_until_drained(timeout=10).acked == 1

    hop1, hop2 = recorder.one("process orders"), recorder.one("process enriched")
    upstream_trace = int(UPSTREAM.split("-")[1], 16)
    assert hop1.context.trace_id == hop2.context.trace_id == upstream_trace
    assert hop1.parent is not None and hop1.parent.span_id == int(UPSTREAM.split("-")[2], 16)
    assert hop2.parent is not None and hop2.parent.span_id == hop1.context.span_id
    assert hop1.kind is SpanKind.CONSUMER and hop1.status.status_code is StatusCode.UNSET
    assert dict(hop1.attributes or {}) == {
        "messaging.system": "memory", "messaging.destination.name": "orders", "messaging.operation.type": "process",
        "messaging.operation.name": "process", "messaging.message.id": "0",
    }
    # The handler's own spans are children of the message's span; its log records carry the ids.
    works = recorder.named("handler work")
    assert sorted(w.parent.span_id for w in works if w.parent) == sorted([hop1.context.span_id,
                                                                          hop2.context.span_id])
    logged = [(r.otelTraceID, r.otelSpanID) for r in caplog.records if r.name == "tests.otel.handler"]
    assert logged == [(format(upstream_trace, "032x"), format(w.context.span_id, "016x")) for w in works]
    # The last output carries the second hop's context.
    [shipped] = broker.produced_records("shipped")
    assert traceparent(shipped.headers) == f"00-{format(upstream_trace, '032x')}-{span_id_hex(hop2)}-01"
    [enriched] = broker.produced_records("enriched")
    assert "other" not in (enriched.headers or {}), "only trace headers are added; input headers are not copied"
    assert trace.get_current_span() is trace.INVALID_SPAN  # nothing left current after the run


def test_a_message_without_trace_headers_starts_a_trace(recorder: Any) -> None:
    broker = MemoryBroker()
    app = make_app(broker, recorder, "a", "b")
    broker.publish("a", b"x")

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message)]

    handler.run_until_drained(timeout=10)
    span = recorder.one("process a")
    assert span.parent is None
    [out] = broker.produced_records("b")
    assert traceparent(out.headers).split("-")[1:3] == [format(span.context.trace_id, "032x"), span_id_hex(span)]


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_retried_then_dead_lettered_shows_its_retries_and_the_letter_continues_the_trace(
        recorder: Any, use_async: bool) -> None:
    broker = MemoryBroker()
    app = make_app(broker, recorder, "jobs", "done", dlq="jobs.dlq", max_retries=2)
    broker.publish("jobs", b"bad", headers={"traceparent": UPSTREAM.encode()})

    if use_async:
        async def handler(message: bytes) -> bool:
            raise ValueError("cannot")
    else:
        def handler(message: bytes) -> bool:  # type: ignore[misc]
            raise ValueError("cannot")

    assert app.stream_app(handler).run_until_drained(timeout=10).dead_lettered == 1
    failed = recorder.one("process jobs")
    events = [(e.name, dict(e.attributes or {})) for e in failed.events]
    assert [name for name, _ in events] == ["volley.retry", "volley.retry", "exception", "volley.dead_letter"]
    assert events[0][1] == {"volley.retry.attempt": 1, "exception.type": "ValueError", "exception.message": "cannot"}
    assert events[1][1]["volley.retry.attempt"] == 2
    assert events[2][1]["exception.type"] == "ValueError" and events[2][1]["volley.error.stage"] == "handler"
    assert events[3][1] == {"messaging.destination.name": "jobs.dlq"}
    assert failed.status.status_code is StatusCode.ERROR
    assert failed.attributes is not None and failed.attributes["error.type"] == "ValueError"
    # The letter carries the failed span's context (not the upstream one it arrived with) ...
    [letter] = broker.produced_records("jobs.dlq")
    assert traceparent(letter.headers).split("-")[2] == span_id_hex(failed)
    assert letter.headers is not None and letter.headers["volley-error-stage"] == b"handler"
    # ... and a replay (the headers `volley dlq replay` sends: the trace headers kept) continues that trace.
    replayed = DeadLetter.read(letter).replay_headers()
    assert set(TRACE_HEADERS) & set(replayed) == {"traceparent"}
    broker.publish("jobs", letter.value, headers=replayed)
    fixed = make_app(broker, recorder, "jobs", "done", name="fixed")

    @fixed.stream_app
    def fixed_handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message)]

    assert fixed_handler.run_until_drained(timeout=10).acked == 1
    replay = [s for s in recorder.named("process jobs") if s is not failed and s.context != failed.context]
    assert len(replay) == 1
    assert replay[0].context.trace_id == failed.context.trace_id
    assert replay[0].parent is not None and replay[0].parent.span_id == failed.context.span_id


def test_bad_input_is_a_failed_span_whose_letter_carries_it(recorder: Any) -> None:
    broker = MemoryBroker()
    queues_app = make_app(broker, recorder, "in-json", "out-json", dlq="dlq-json",
                          source_settings={"serializer": "json", "model_handler": "dataclass", "data_model": dict})
    broker.publish("in-json", b"{not json", headers={"traceparent": UPSTREAM.encode()})

    @queues_app.stream_app
    def handler(message: Any) -> bool:
        raise AssertionError("not called")

    assert handler.run_until_drained(timeout=10).dead_lettered == 1
    span = recorder.one("process in-json")
    assert span.status.status_code is StatusCode.ERROR
    assert span.attributes is not None and span.attributes["volley.error.stage"] == "deserialize"
    assert span.parent is not None and span.parent.span_id == int(UPSTREAM.split("-")[2], 16)
    [letter] = broker.produced_records("dlq-json")
    assert traceparent(letter.headers).split("-")[2] == span_id_hex(span)


def test_a_batch_handler_has_one_span_per_batch_linking_its_members(recorder: Any) -> None:
    broker = MemoryBroker()
    app = make_app(broker, recorder, "many", "summary", source_settings={"batch_size": 3})
    parents = [f"00-{n:032x}-{n:016x}-01" for n in range(1, 4)]
    for n, parent in enumerate(parents):
        broker.publish("many", str(n).encode(), headers={"traceparent": parent.encode()})

    @app.stream_app
    def handler(messages: list[bytes]) -> list[tuple[str, bytes]]:
        return [("out", b",".join(messages))]

    assert handler.run_until_drained(timeout=10).acked == 3
    span = recorder.one("process many")
    assert span.parent is None
    assert sorted(link.context.span_id for link in span.links) == [1, 2, 3]
    assert span.attributes is not None and span.attributes["messaging.batch.message_count"] == 3
    [out] = broker.produced_records("summary")
    assert traceparent(out.headers).split("-")[2] == span_id_hex(span)


def test_send_spans_link_the_records_of_each_producer_call(recorder: Any) -> None:
    broker = MemoryBroker()
    app = make_app(broker, recorder, "s-in", "s-out", settings={"send_spans": True})
    for n in range(3):
        broker.publish("s-in", str(n).encode())

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message)]

    handler.run_until_drained(timeout=10)
    processes = {s.context.span_id for s in recorder.named("process s-in")}
    sends = recorder.named("send s-out")
    assert sends and all(s.kind is SpanKind.PRODUCER for s in sends)
    assert {link.context.span_id for s in sends for link in s.links} == processes
    assert all((s.attributes or {})["messaging.operation.type"] == "send" for s in sends)


def test_without_an_sdk_the_context_still_flows_through(recorder: Any) -> None:
    """The API's no-op provider (what an app without the SDK gets): no spans, yet the upstream context goes on."""
    broker = MemoryBroker()
    app = make_app(broker, recorder, "n-in", "n-out", settings={"tracer_provider": trace.NoOpTracerProvider()})
    broker.publish("n-in", b"x", headers={"traceparent": UPSTREAM.encode()})

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message)]

    handler.run_until_drained(timeout=10)
    assert recorder.spans() == []
    [out] = broker.produced_records("n-out")
    assert traceparent(out.headers) == UPSTREAM


def test_without_an_sdk_the_handler_runs_in_the_upstream_context_and_letters_carry_it(
        recorder: Any, caplog: pytest.LogCaptureFixture) -> None:
    """No SDK: the upstream span is current while the handler runs (its log records carry its ids), trace state
    and baggage go on with it, and a dead letter carries it too."""
    broker = MemoryBroker()
    app = make_app(broker, recorder, "c-in", "c-out", dlq="c-dlq", max_retries=0,
                   settings={"tracer_provider": trace.NoOpTracerProvider()})
    broker.publish("c-in", b"ok", headers={"traceparent": UPSTREAM.encode()})
    broker.publish("c-in", b"more", headers={"traceparent": UPSTREAM.encode(), "tracestate": b"v=1",
                                             "baggage": b"tenant=a"})
    broker.publish("c-in", b"boom", headers={"traceparent": UPSTREAM.encode()})
    broker.publish("c-in", b"only-baggage", headers={"baggage": b"tenant=b"})
    handler_logger = logging.getLogger("tests.otel.handler")
    current: dict[bytes, tuple[int, Any]] = {}

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        current[message] = (trace.get_current_span().get_span_context().span_id, baggage.get_baggage("tenant"))
        handler_logger.warning("handling %r", message)
        if message == b"boom":
            raise ValueError("no")
        return [("out", message)]

    with caplog.at_level(logging.WARNING, logger="tests.otel.handler"):
        report = handler.run_until_drained(timeout=10)
    assert report.acked == 3 and report.dead_lettered == 1
    assert recorder.spans() == []
    upstream_span = int(UPSTREAM.split("-")[2], 16)
    assert current == {b"ok": (upstream_span, None), b"more": (upstream_span, "a"), b"boom": (upstream_span, None),
                       b"only-baggage": (0, "b")}
    logged = {r.getMessage(): (r.otelTraceID, r.otelSpanID) for r in caplog.records if r.name == handler_logger.name}
    assert logged["handling b'ok'"] == (UPSTREAM.split("-")[1], UPSTREAM.split("-")[2])
    outputs = {r.value: r.headers for r in broker.produced_records("c-out")}
    assert outputs[b"ok"] == {"traceparent": UPSTREAM.encode()}
    assert outputs[b"more"] == {"traceparent": UPSTREAM.encode(), "tracestate": b"v=1", "baggage": b"tenant=a"}
    assert outputs[b"only-baggage"] == {"baggage": b"tenant=b"}
    [letter] = broker.produced_records("c-dlq")
    assert letter.headers is not None and letter.headers["traceparent"] == UPSTREAM.encode()


@pytest.mark.parametrize("batch", [None, 2], ids=["single", "batch"])
def test_without_an_sdk_a_message_without_context_passes_through_untouched(recorder: Any, batch: int | None) -> None:
    broker = MemoryBroker()
    app = make_app(broker, recorder, "u-in", "u-out", dlq="u-dlq",
                   settings={"tracer_provider": trace.NoOpTracerProvider()},
                   source_settings={"batch_size": batch} if batch else {})
    broker.publish("u-in", b"x")
    broker.publish("u-in", b"y", headers={"traceparent": UPSTREAM.encode()})

    @app.stream_app
    def handler(message: Any) -> list[tuple[str, Any]]:
        return [("out", b"".join(message) if batch else message)]

    assert handler.run_until_drained(timeout=10).acked == 2
    headers = [r.headers for r in broker.produced_records("u-out")]
    if batch:  # a batch has no single parent to pass on
        assert headers == [None]
    else:
        assert headers == [None, {"traceparent": UPSTREAM.encode()}]


def test_bad_settings_fail_when_the_engine_is_built(recorder: Any) -> None:
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match=r"unknown tracing_settings \['sampler'\]"):
        make_app(broker, recorder, "x", "y", settings={"sampler": 1})
    with pytest.raises(ConfigurationError, match="TracerProvider"):
        make_app(broker, recorder, "x", "y", settings={"tracer_provider": "global"})


@pytest.mark.parametrize("fails", [False, True], ids=["succeeds", "fails"])
async def test_a_call_that_outlives_the_shutdown_deadline_still_ends_its_span(recorder: Any, fails: bool) -> None:
    """A failed call's span stays open until settlement dead-letters or gives back its input; a call that outlived
    the shutdown deadline and then failed was dropped by settlement (closed), and its span never ended nor was
    exported (found by a bug hunt, session 38). A late success was exported already."""
    import threading
    import time

    broker = MemoryBroker()
    app = make_app(broker, recorder, "late", "late.out", dlq="late.dlq", max_retries=0, shutdown_timeout_seconds=0.2,
                   sync_handler_mode="thread")
    broker.publish("late", b"1", headers={"traceparent": UPSTREAM.encode()})
    entered, release = threading.Event(), threading.Event()

    def handler(message: bytes) -> list[tuple[str, bytes]]:
        entered.set()
        release.wait(10)
        if fails:
            raise RuntimeError("late failure")
        return [("out", message)]

    stream = app.stream_app(handler)
    task = asyncio.ensure_future(stream.run_async())
    assert await asyncio.to_thread(entered.wait, 10)
    stream.stop()
    await asyncio.wait_for(task, 10)  # gave up on the call after 0.2 s
    release.set()
    deadline = time.monotonic() + 5.0
    while not recorder.named("process late"):
        assert time.monotonic() < deadline, "the span of the late call was never ended"
        await asyncio.sleep(0.02)
    span = recorder.one("process late")
    assert (span.status.status_code == StatusCode.ERROR) is fails
