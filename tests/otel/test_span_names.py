"""Span names and attributes from the message's own queue (found by an API review; each failed before its fix).

A Kafka input may subscribe several topics (``value: "orders,refunds"``): its spans were all named
``process orders,refunds`` with that string as ``messaging.destination.name``, which names no destination.
``messaging.operation.name`` was missing (the semantic conventions require it next to ``.type``).
"""

from __future__ import annotations

from typing import Any

from volley.message import Envelope, OutgoingMessage
from volley.ports import QueueSpec
from volley_otel.tracer import OtelTracer

SOURCE = QueueSpec("in", "orders,refunds", "kafka", {"group.id": "billing"})
OUTPUT = QueueSpec("out", "shipped", "kafka", role="output")


def bound(recorder: Any, send_spans: bool = False) -> Any:
    return OtelTracer("app", tracer_provider=recorder.provider, send_spans=send_spans).bind(SOURCE, [OUTPUT])


def envelope(topic: str, offset: int) -> Envelope:
    return Envelope(b"v", None, None, topic, 0, offset, 0.0)


def test_a_multi_topic_input_names_each_span_after_the_message_s_own_topic(recorder: Any) -> None:
    run = bound(recorder)
    for n, topic in enumerate(["orders", "refunds", "orders"]):
        run.start([envelope(topic, n)], False).end()
    names = sorted(s.name for s in recorder.spans())
    assert names == ["process orders", "process orders", "process refunds"]
    for span in recorder.spans():
        assert span.attributes["messaging.destination.name"] == span.name.removeprefix("process ")
        assert span.attributes["messaging.consumer.group.name"] == "billing"


def test_a_batch_of_one_topic_is_named_after_it_and_a_mixed_batch_after_the_subscription(recorder: Any) -> None:
    run = bound(recorder)
    run.start([envelope("refunds", 1), envelope("refunds", 2)], True).end()
    run.start([envelope("orders", 3), envelope("refunds", 4)], True).end()
    one, mixed = recorder.spans()
    assert one.name == "process refunds" and one.attributes["messaging.destination.name"] == "refunds"
    assert mixed.name == "process orders,refunds"
    assert "messaging.destination.name" not in mixed.attributes


def test_spans_carry_the_operation_name(recorder: Any) -> None:
    run = bound(recorder, send_spans=True)
    trace = run.start([envelope("orders", 1)], False)
    record = OutgoingMessage("shipped", b"x", None, trace.inject(None), None, None, None)
    trace.end()
    run.sent([record])
    process = recorder.one("process orders")
    send = recorder.one("send shipped")
    assert process.attributes["messaging.operation.name"] == "process"
    assert process.attributes["messaging.operation.type"] == "process"
    assert send.attributes["messaging.operation.name"] == "send"
    assert send.attributes["messaging.operation.type"] == "send"
