"""py-volley's demo on real servers: Kafka in, RSMQ out, and back to Kafka, until the maximum passes 10."""

from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
import redis

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]


@dataclass
class ValuesMessage:
    my_values: list[float]


@dataclass
class MaxMessage:
    max_value: float


def create_topic(bootstrap: str, topic: str) -> None:
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for future in admin.create_topics([NewTopic(topic, num_partitions=1, replication_factor=1)]).values():
        future.result(30)


def publish(bootstrap: str, topic: str, value: bytes) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, value)
    assert producer.flush(30) == 0


async def test_kafka_to_rsmq_and_back(kafka_bootstrap: str, rsmq_config: dict[str, Any],
                                      raw_redis: redis.Redis) -> None:
    from volley import Engine

    suffix = uuid.uuid4().hex[:8]
    values_topic, maxima_queue = f"demo-values-{suffix}", f"demo-maxima-{suffix}"
    create_topic(kafka_bootstrap, values_topic)
    kafka = {"bootstrap.servers": kafka_bootstrap, "group.id": f"demo-{suffix}"}
    json_dataclass = {"serializer": "json", "model_handler": "dataclass"}
    queues = {
        "values": {"value": values_topic, "connector": "kafka", "data_model": ValuesMessage, "config": kafka,
                   **json_dataclass},
        "maxima": {"value": maxima_queue, "connector": "rsmq", "data_model": MaxMessage, "config": rsmq_config,
                   **json_dataclass},
    }
    common = {"queue_config": queues, "metrics_port": None, "poll_interval_seconds": 0.05}
    node_one = Engine(app_name="node-one", input_queue="values", output_queues=["maxima"], **common)
    node_two = Engine(app_name="node-two", input_queue="maxima", output_queues=["values"], **common)
    seen: list[float] = []
    done = asyncio.Event()
    loop = asyncio.get_running_loop()

    @node_one.stream_app
    def find_max(message: ValuesMessage) -> list[tuple[str, MaxMessage]]:
        return [("maxima", MaxMessage(max_value=float(max(message.my_values))))]

    @node_two.stream_app
    def check_max(message: MaxMessage) -> bool | list[tuple[str, ValuesMessage]]:
        value = message.max_value
        seen.append(value)
        if value > 10:
            loop.call_soon_threadsafe(done.set)
            return True
        return [("values", ValuesMessage(my_values=[value, value + 1, value + 2]))]

    publish(kafka_bootstrap, values_topic, json.dumps({"my_values": [1, 2, 3]}).encode())
    tasks = [asyncio.ensure_future(app.run_async()) for app in (find_max, check_max)]
    try:
        await asyncio.wait_for(done.wait(), 120)
    finally:
        find_max.stop()
        check_max.stop()
        reports = await asyncio.gather(*tasks)
    assert seen == [3.0, 5.0, 7.0, 9.0, 11.0]
    assert [r.acked for r in reports] == [5, 5]
    assert raw_redis.zcard(f"rsmq:{maxima_queue}") == 0  # every maximum was deleted once handled
    assert int(raw_redis.hget(f"rsmq:{maxima_queue}:Q", "totalsent") or 0) == 5
