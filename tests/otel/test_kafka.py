"""volley-otel on a real Kafka broker: a two-hop pipeline is one trace, the context riding in Kafka headers."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from volley import Engine

pytestmark = pytest.mark.kafka

UPSTREAM = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"


def create_topics(bootstrap: str, names: list[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(n, num_partitions=1, replication_factor=1) for n in names]).values():
        future.result(30)


def read_one(bootstrap: str, topic: str) -> Any:
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": f"reader-{uuid.uuid4().hex[:8]}",
                         "enable.auto.commit": False})
    try:
        consumer.assign([TopicPartition(topic, 0, 0)])
        for _ in range(300):
            message = consumer.poll(0.1)
            if message is not None and message.error() is None:
                return message
        raise AssertionError(f"nothing to read in {topic}")
    finally:
        consumer.close()


async def test_a_two_hop_kafka_pipeline_is_one_trace(kafka_bootstrap: str, recorder: Any) -> None:
    prefix = f"t-otel-{uuid.uuid4().hex[:8]}"
    source, middle, sink = f"{prefix}-in", f"{prefix}-mid", f"{prefix}-out"
    create_topics(kafka_bootstrap, [source, middle, sink])

    def queue(topic: str, group: str) -> dict[str, Any]:
        return {"value": topic, "profile": "confluent", "serializer": "none", "model_handler": "none",
                "config": {"bootstrap.servers": kafka_bootstrap, "group.id": group, "auto.offset.reset": "earliest"}}

    def app(name: str, inbound: str, outbound: str) -> Engine:
        return Engine(app_name=name, input_queue="in", output_queues=["out"],
                      queue_config={"in": queue(inbound, f"{prefix}-{name}"), "out": queue(outbound, "unused")},
                      metrics_port=None, poll_interval_seconds=0.05, tracing="otel",
                      tracing_settings={"tracer_provider": recorder.provider})

    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    producer.produce(source, b"o-1", headers={"traceparent": UPSTREAM.encode()})
    assert producer.flush(30) == 0

    def handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message + b"+")]

    for name, inbound, outbound in (("first", source, middle), ("second", middle, sink)):
        report = await asyncio.wait_for(app(name, inbound, outbound).stream_app(handler).run_async(max_messages=1),
                                        60)
        assert report.acked == 1
    hop1, hop2 = recorder.one(f"process {source}"), recorder.one(f"process {middle}")
    trace_id = int(UPSTREAM.split("-")[1], 16)
    assert hop1.context.trace_id == hop2.context.trace_id == trace_id
    assert hop2.parent is not None and hop2.parent.span_id == hop1.context.span_id
    attributes = dict(hop1.attributes or {})
    assert attributes["messaging.system"] == "kafka" and attributes["messaging.kafka.offset"] == 0
    assert attributes["messaging.destination.partition.id"] == "0"
    assert attributes["messaging.consumer.group.name"] == f"{prefix}-first"
    headers = dict(read_one(kafka_bootstrap, sink).headers() or [])
    assert headers["traceparent"].decode().split("-")[1:3] == [format(trace_id, "032x"),
                                                               format(hop2.context.span_id, "016x")]
