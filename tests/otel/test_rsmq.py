"""volley-otel on RSMQ (a real redis-server): RSMQ stores a body only, so the trace context travels in the JSON
envelope of queues configured with ``headers: envelope``; queues left at ``headers: drop`` keep plain bodies that
any PyRSMQ reader understands (the context stops there, as docs/tracing.md says)."""

from __future__ import annotations

import json
import uuid
from typing import Any

import pytest

from rsmq import RedisSMQ
from volley import Engine

pytestmark = pytest.mark.redis


def rsmq_queue(redis_server: Any, value: str, **config: Any) -> dict[str, Any]:
    return {"value": value, "connector": "rsmq", "serializer": "none", "model_handler": "none",
            "config": {"host": redis_server.host, "port": redis_server.port, **config}}


def plain(redis_server: Any, qname: str) -> RedisSMQ:
    return RedisSMQ(host=redis_server.host, port=redis_server.port, qname=qname,
                    options={"decode_responses": False})


def test_rsmq_round_trips_the_context_in_the_envelope_and_a_plain_reader_still_reads_the_body(
        redis_server: Any, recorder: Any) -> None:
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    source, middle, sink = f"{prefix}-in", f"{prefix}-mid", f"{prefix}-out"
    seeder = plain(redis_server, source)
    seeder.createQueue().exceptions(enabled=False).execute()
    seeder.sendMessage(message=b'{"order": 1}').execute()  # a plain PyRSMQ producer: no context, a new trace

    def app(name: str, inbound: dict[str, Any], outbound: dict[str, Any]) -> Engine:
        return Engine(app_name=name, input_queue="in", output_queues=["out"],
                      queue_config={"in": inbound, "out": outbound}, metrics_port=None, poll_interval_seconds=0.05,
                      tracing="otel", tracing_settings={"tracer_provider": recorder.provider})

    first = app("first", rsmq_queue(redis_server, source), rsmq_queue(redis_server, middle, headers="envelope"))
    second = app("second", rsmq_queue(redis_server, middle, headers="envelope"), rsmq_queue(redis_server, sink))

    def handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message)]

    assert first.stream_app(handler).run_until_drained(timeout=20, drain_idle_seconds=0.2).acked == 1
    assert second.stream_app(handler).run_until_drained(timeout=20, drain_idle_seconds=0.2).acked == 1
    hop1, hop2 = recorder.one(f"process {source}"), recorder.one(f"process {middle}")
    assert hop1.parent is None
    assert hop2.context.trace_id == hop1.context.trace_id
    assert hop2.parent is not None and hop2.parent.span_id == hop1.context.span_id
    assert (hop2.attributes or {})["messaging.system"] == "rsmq"
    # The sink kept headers: drop (the default): a plain PyRSMQ reader gets the body as it was sent.
    message = plain(redis_server, sink).receiveMessage().execute()
    assert message["message"] == b'{"order": 1}'
    assert plain(redis_server, middle).getQueueAttributes().execute()["msgs"] == 0  # consumed and deleted


def test_a_plain_reader_of_an_envelope_queue_sees_the_document_with_the_context(
        redis_server: Any, recorder: Any) -> None:
    """What docs/tracing.md warns of: ``headers: envelope`` is for Volley readers (or readers that parse it)."""
    prefix = f"t-{uuid.uuid4().hex[:10]}"
    source, sink = f"{prefix}-in", f"{prefix}-out"
    seeder = plain(redis_server, source)
    seeder.createQueue().exceptions(enabled=False).execute()
    seeder.sendMessage(message=b"body").execute()
    app = Engine(app_name="enveloping", input_queue="in", output_queues=["out"],
                 queue_config={"in": rsmq_queue(redis_server, source),
                               "out": rsmq_queue(redis_server, sink, headers="envelope")},
                 metrics_port=None, poll_interval_seconds=0.05, tracing="otel",
                 tracing_settings={"tracer_provider": recorder.provider})

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message)]

    assert handler.run_until_drained(timeout=20, drain_idle_seconds=0.2).acked == 1
    document = json.loads(plain(redis_server, sink).receiveMessage().execute()["message"])
    span = recorder.one(f"process {source}")
    assert document["payload"] == "body"
    assert document["headers"]["traceparent"].split("-")[2] == format(span.context.span_id, "016x")
