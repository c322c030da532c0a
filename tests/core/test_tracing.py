"""The tracing ports (volley.ports: Tracer, RunTracer, MessageTrace) as the engine drives them, with a fake tracer.

What docs/tracing.md promises of any tracer plugged in through ``volley_register_tracers``:
- one trace per input (per group for batch handlers), continuing the context the input's headers carry;
- every output carries its input's trace context in its headers, the handler runs with the trace active;
- each retry is recorded on the trace, a failure ends it failed, a dead letter carries its context;
- with no tracer named, nothing is bound (tracing is off by default), and a misspelled one fails at start-up.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import pytest

from volley import Engine, MemoryBroker
from volley.errors import UnknownComponentError
from volley.message import Envelope, Headers, OutgoingMessage
from volley.plugins import Register, build_registry, hookimpl
from volley.ports import MessageTrace, QueueSpec, RunTracer, Tracer
from volley.run.handling import Handling

HEADER = "x-fake-trace"
CURRENT: list[FakeTrace] = []  # the active traces, innermost last (the handler reads it)


@dataclass
class FakeTrace:
    id: int
    parents: list[str | None]
    batch: bool
    events: list[tuple[Any, ...]]
    ended: int = 0

    def activate(self) -> object:
        CURRENT.append(self)
        return self.id

    def deactivate(self, activation: object) -> None:
        assert CURRENT.pop().id == activation

    def inject(self, headers: Headers | None) -> Headers:
        return {**(headers or {}), HEADER: str(self.id).encode()}

    def retry(self, attempt: int, error: BaseException) -> None:
        self.events.append(("retry", attempt, str(error)))

    def fail(self, stage: str, error: BaseException) -> None:
        self.events.append(("fail", stage, type(error).__name__))

    def dead_letter(self, destination: str, headers: Headers) -> None:
        headers[HEADER] = str(self.id).encode()
        self.events.append(("dead_letter", destination))

    def end(self) -> None:
        self.ended += 1


class FakeRunTracer:
    def __init__(self, owner: FakeTracer) -> None:
        self.owner = owner

    def start(self, members: Sequence[Envelope], batch: bool) -> MessageTrace | None:
        if self.owner.settings.get("skip_untraced") and not any((m.headers or {}).get(HEADER) for m in members):
            return None  # like a tracer without an SDK: nothing to record or pass on for this input
        parents = [(m.headers or {}).get(HEADER, b"").decode() or None for m in members]
        trace = FakeTrace(next(self.owner.ids), parents, batch, [])
        self.owner.traces.append(trace)
        return trace

    def sent(self, records: Sequence[OutgoingMessage]) -> None:
        self.owner.sent.append([r.topic for r in records])


class FakeTracer:
    def __init__(self, app_name: str, settings: dict[str, Any]) -> None:
        self.app_name = app_name
        self.settings = settings
        self.ids = itertools.count(1)
        self.traces: list[FakeTrace] = []
        self.sent: list[list[str]] = []
        self.bound: list[tuple[str, list[str]]] = []

    def bind(self, source: QueueSpec, outputs: Sequence[QueueSpec]) -> RunTracer:
        self.bound.append((source.value, [q.value for q in outputs]))
        return FakeRunTracer(self)


TRACERS: list[FakeTracer] = []


class FakeTracerPlugin:
    @hookimpl
    def volley_register_tracers(self, register: Register) -> None:
        def factory(app_name: str, settings: dict[str, Any]) -> Tracer:
            tracer = FakeTracer(app_name, settings)
            TRACERS.append(tracer)
            return tracer

        register("fake", factory)


REGISTRY = build_registry({"fake-tracer": FakeTracerPlugin()})


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLLEY_TRACING", raising=False)
    TRACERS.clear()
    CURRENT.clear()


def make_engine(broker: MemoryBroker, *, dlq: bool = True, batch: int | None = None, **kwargs: Any) -> Engine:
    def memory(value: str, **settings: Any) -> dict[str, Any]:
        return {"value": value, "profile": "memory", "serializer": "none", "model_handler": "none",
                "config": {"broker": broker}, **settings}

    inbound = memory("in", batch_size=batch) if batch else memory("in")
    queues = {"in": inbound, "out": memory("out"), "dlq": memory("dlq", profile="memory-dlq")}
    settings: dict[str, Any] = {"metrics_port": None, "poll_interval_seconds": 0.01, "retry_backoff_seconds": 0.001,
                                "tracing": "fake", "on_failure": "continue", "registry": REGISTRY}
    settings.update(kwargs)
    return Engine(app_name="traced", input_queue="in", output_queues=["out"], dead_letter_queue="dlq" if dlq else None,
                  queue_config=queues, **settings)


def tracer() -> FakeTracer:
    assert len(TRACERS) == 1
    return TRACERS[0]


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_each_input_has_a_trace_that_continues_its_headers_and_reaches_its_outputs(use_async: bool) -> None:
    broker = MemoryBroker()
    app = make_engine(broker)
    broker.publish("in", b"a", headers={HEADER: b"upstream-1"})
    broker.publish("in", b"b")
    seen: list[tuple[bytes, int]] = []

    if use_async:
        async def handler(message: bytes) -> list[tuple[str, bytes]]:
            await asyncio.sleep(0)
            seen.append((message, CURRENT[-1].id))
            return [("out", message.upper())]
    else:
        def handler(message: bytes) -> list[tuple[str, bytes]]:  # type: ignore[misc]
            seen.append((message, CURRENT[-1].id))
            return [("out", message.upper())]

    report = app.stream_app(handler).run_until_drained(timeout=10)
    assert report.acked == 2
    fake = tracer()
    assert fake.bound == [("in", ["out", "dlq"])]
    by_parent = {t.parents[0]: t for t in fake.traces}
    assert set(by_parent) == {"upstream-1", None}
    assert all(t.ended == 1 and not t.batch and t.events == [] for t in fake.traces)
    # The handler ran with its own message's trace active, and each output carries that trace.
    trace_of = dict(seen)
    assert trace_of[b"a"] == by_parent["upstream-1"].id
    outputs = {r.value: r.headers for r in broker.produced_records("out")}
    assert outputs[b"A"] == {HEADER: str(trace_of[b"a"]).encode()}
    assert outputs[b"B"] == {HEADER: str(trace_of[b"b"]).encode()}
    assert fake.sent and sorted(itertools.chain.from_iterable(fake.sent)) == ["out", "out"]
    assert CURRENT == []


def test_output_headers_given_by_the_handler_are_kept_beside_the_trace() -> None:
    broker = MemoryBroker()
    app = make_engine(broker)
    broker.publish("in", b"a")

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes, dict[str, Any]]]:
        return [("out", message, {"headers": {"mine": "1"}})]

    handler.run_until_drained(timeout=10)
    [record] = broker.produced_records("out")
    assert record.headers == {"mine": b"1", HEADER: str(tracer().traces[0].id).encode()}


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_retries_are_recorded_and_a_dead_letter_carries_the_failed_trace(use_async: bool) -> None:
    broker = MemoryBroker()
    app = make_engine(broker, max_retries=2)
    broker.publish("in", b"boom", headers={HEADER: b"upstream"})

    if use_async:
        async def handler(message: bytes) -> bool:
            raise ValueError("no")
    else:
        def handler(message: bytes) -> bool:  # type: ignore[misc]
            raise ValueError("no")

    report = app.stream_app(handler).run_until_drained(timeout=10)
    assert report.dead_lettered == 1
    [trace] = tracer().traces
    assert trace.parents == ["upstream"]
    assert trace.events == [("retry", 1, "no"), ("retry", 2, "no"), ("fail", "handler", "ValueError"),
                            ("dead_letter", "dlq")]
    assert trace.ended == 1
    [letter] = broker.produced_records("dlq")
    assert letter.headers is not None and letter.headers[HEADER] == str(trace.id).encode()
    assert letter.headers["volley-error-stage"] == b"handler"


def test_a_call_that_fails_inline_keeps_one_trace_through_its_retries_on_the_thread() -> None:
    """Inline (auto mode, after calibration) a failing call moves to the handler thread for its retries: the trace
    opened inline is the one that records them and ends."""
    broker = MemoryBroker()
    app = make_engine(broker, max_retries=1, consume_batch_size=10)
    for n in range(40):
        broker.publish("in", str(n).encode())
    calls: dict[bytes, int] = {}

    @app.stream_app
    def handler(message: bytes) -> bool:
        calls[message] = calls.get(message, 0) + 1
        if message == b"35" and calls[message] == 1:
            raise ValueError("once")
        return True

    report = handler.run_until_drained(timeout=10)
    assert report.acked == 40
    traces = tracer().traces
    assert len(traces) == 40 and all(t.ended == 1 for t in traces)
    assert [t.events for t in traces if t.events] == [[("retry", 1, "once")]]


def test_bad_input_gets_a_failed_trace_and_a_letter_carrying_it() -> None:
    broker = MemoryBroker()
    app = make_engine(broker, max_deliveries=1)
    broker.publish("in", b"x", headers={HEADER: b"up"})
    [env] = broker.take("in", 1, owner=-1)
    broker.nack("in", [env.position], owner=-1)  # delivered twice: past max_deliveries

    @app.stream_app
    def handler(message: bytes) -> bool:
        raise AssertionError("not called")

    report = handler.run_until_drained(timeout=10)
    assert report.dead_lettered == 1
    [trace] = tracer().traces
    assert trace.parents == ["up"] and trace.ended == 1
    assert trace.events == [("fail", "redelivery", "MessageError"), ("dead_letter", "dlq")]
    [letter] = broker.produced_records("dlq")
    assert letter.headers is not None and letter.headers[HEADER] == str(trace.id).encode()


def test_without_a_dead_letter_queue_a_failure_ends_its_trace_failed() -> None:
    broker = MemoryBroker()
    app = make_engine(broker, dlq=False, max_retries=0, redelivery_delay_seconds=0)
    broker.publish("in", b"boom")

    @app.stream_app
    def handler(message: bytes) -> bool:
        raise ValueError("no")

    handler.run_until_drained(timeout=10, max_messages=1)
    trace = tracer().traces[0]
    assert trace.events == [("fail", "handler", "ValueError")] and trace.ended == 1


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_batch_handler_has_one_trace_per_group_continuing_every_member(use_async: bool) -> None:
    broker = MemoryBroker()
    app = make_engine(broker, batch=3)
    for n in range(3):
        broker.publish("in", str(n).encode(), headers={HEADER: f"up-{n}".encode()})

    if use_async:
        async def handler(messages: list[bytes]) -> list[tuple[str, bytes]]:
            return [("out", b",".join(messages))]
    else:
        def handler(messages: list[bytes]) -> list[tuple[str, bytes]]:  # type: ignore[misc]
            return [("out", b",".join(messages))]

    report = app.stream_app(handler).run_until_drained(timeout=10)
    assert report.acked == 3
    [trace] = tracer().traces
    assert trace.batch and trace.parents == ["up-0", "up-1", "up-2"] and trace.ended == 1
    [record] = broker.produced_records("out")
    assert record.headers == {HEADER: str(trace.id).encode()}


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_an_input_the_tracer_has_nothing_for_is_handled_untraced(use_async: bool) -> None:
    """``RunTracer.start`` returning None: that input's outputs, retries and dead letter go on without a trace;
    the others are traced as ever."""
    broker = MemoryBroker()
    app = make_engine(broker, max_retries=1, tracing_settings={"skip_untraced": True})
    broker.publish("in", b"plain")
    broker.publish("in", b"traced", headers={HEADER: b"up"})
    broker.publish("in", b"boom")
    broker.publish("in", b"boom-traced", headers={HEADER: b"up-2"})
    seen: dict[bytes, list[int]] = {}

    def work(message: bytes) -> list[tuple[str, bytes]]:
        seen.setdefault(message, []).append(len(CURRENT))
        if message.startswith(b"boom"):
            raise ValueError("no")
        return [("out", message)]

    if use_async:
        async def handler(message: bytes) -> list[tuple[str, bytes]]:
            return work(message)
    else:
        def handler(message: bytes) -> list[tuple[str, bytes]]:  # type: ignore[misc]
            return work(message)

    report = app.stream_app(handler).run_until_drained(timeout=10)
    assert report.acked == 2 and report.dead_lettered == 2
    assert seen == {b"plain": [0], b"traced": [1], b"boom": [0, 0], b"boom-traced": [1, 1]}
    traced, failed = tracer().traces
    assert traced.parents == ["up"] and traced.events == [] and traced.ended == 1
    assert failed.parents == ["up-2"] and failed.ended == 1
    assert failed.events == [("retry", 1, "no"), ("fail", "handler", "ValueError"), ("dead_letter", "dlq")]
    outputs = {r.value: r.headers for r in broker.produced_records("out")}
    assert outputs == {b"plain": None, b"traced": {HEADER: str(traced.id).encode()}}
    letters = {r.value: r.headers or {} for r in broker.produced_records("dlq")}
    assert HEADER not in letters[b"boom"] and letters[b"boom-traced"][HEADER] == str(failed.id).encode()


def test_tracing_is_off_by_default_and_binds_nothing() -> None:
    broker = MemoryBroker()
    app = make_engine(broker, tracing=None)
    assert app.tracer is None
    broker.publish("in", b"a")

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message)]

    handler.run_until_drained(timeout=10)
    assert TRACERS == []
    [record] = broker.produced_records("out")
    assert record.headers is None
    # The run's steps are the plain ones: nothing wraps them.
    from volley.run.run import Run
    run = Run(handler, stop_when_drained=True, drain_idle_seconds=0.1, max_messages=None)
    assert run.tracing is None and run.settlement.tracing is None and run.handling.handle.__name__ == "handle"
    assert run.handling.process_async.__name__ == "process_async"
    assert isinstance(run.handling, Handling)


def test_the_environment_turns_tracing_on_and_passes_settings(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("VOLLEY_TRACING", "fake")
    app = make_engine(MemoryBroker(), tracing=None, tracing_settings={"send_spans": True})
    assert isinstance(app.tracer, FakeTracer) and app.tracer.settings == {"send_spans": True}
    assert app.tracer.app_name == "traced"
    monkeypatch.setenv("VOLLEY_TRACING", "none")
    assert make_engine(MemoryBroker(), tracing=None).tracer is None


def test_an_unknown_tracer_fails_at_construction_naming_the_distribution() -> None:
    registry = build_registry()
    for entries in registry.entries.values():  # as if volley-otel were not installed
        for name in [n for n, entry in entries.items() if entry.distribution == "volley-otel"]:
            del entries[name]
    with pytest.raises(UnknownComponentError, match=r"Unknown tracer 'otel'.*pip install volley-otel"):
        make_engine(MemoryBroker(), tracing="otel", registry=registry)
