"""py-volley's confluent* profiles round-trip a GenericMessage through a real broker."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import msgpack
import pytest

from volley import Engine

pytestmark = pytest.mark.kafka

ENCODERS = {
    "confluent": lambda d: json.dumps(d).encode(),
    "confluent-orjson-pydantic": lambda d: json.dumps(d).encode(),
    "confluent-pydantic": lambda d: json.dumps(d).encode(),
    "confluent-msgpack-pydantic": msgpack.packb,
}
DECODERS = {
    "confluent": json.loads,
    "confluent-orjson-pydantic": json.loads,
    "confluent-pydantic": json.loads,
    "confluent-msgpack-pydantic": msgpack.unpackb,
}


@pytest.mark.parametrize("profile", sorted(ENCODERS))
async def test_profile_round_trips_a_generic_message(kit: Any, profile: str) -> None:
    source = kit.topic("prof-in")
    sink = kit.topic("prof-out")
    count = 20
    kit.produce(source, [ENCODERS[profile]({"order": i, "item": f"thing-{i}"}) for i in range(count)])
    engine = Engine(app_name=kit.unique("profiles"), input_queue="input", output_queues=["out"],
                    queue_config={
                        "input": {"value": source, "profile": profile,
                                  "config": {"bootstrap.servers": kit.bootstrap, "group.id": kit.unique("g")}},
                        "out": {"value": sink, "profile": profile, "config": {"bootstrap.servers": kit.bootstrap}},
                    }, metrics_port=None, poll_interval_seconds=0.2)
    from volley_serializers.models import GenericMessage

    @engine.stream_app
    def handler(message: GenericMessage) -> list[tuple[str, GenericMessage]]:
        assert isinstance(message, GenericMessage)
        fields = message.model_dump()
        return [("out", GenericMessage(**fields, seen=True))]

    report = await asyncio.wait_for(handler.run_async(max_messages=count), 60)
    assert report.acked == count
    decoded = [DECODERS[profile](m.value()) for m in kit.read_topic(sink)]
    assert sorted(d["order"] for d in decoded) == list(range(count))
    assert all(d["seen"] is True and d["item"] == f"thing-{d['order']}" for d in decoded)


async def test_batch_json_profile_hands_lists_and_dlq_profile_keeps_raw_bytes(kit: Any) -> None:
    source = kit.topic("pbatch-in")
    sink = kit.topic("pbatch-out")
    dlq = kit.topic("pbatch-dlq")
    values = [json.dumps({"n": i}).encode() for i in range(30)]
    values[11] = b"\x00 not json"
    kit.produce(source, values, keys=[b"k%d" % i for i in range(30)], headers={"trace": b"t-1"})
    sizes: list[int] = []
    engine = Engine(app_name=kit.unique("batch"), input_queue="input", output_queues=["out"],
                    dead_letter_queue="dlq",
                    queue_config={
                        "input": {"value": source, "profile": "confluent-batch-json", "batch_size": 8,
                                  "config": {"bootstrap.servers": kit.bootstrap, "group.id": kit.unique("g")}},
                        "out": {"value": sink, "profile": "confluent", "config": {"bootstrap.servers": kit.bootstrap}},
                        "dlq": {"value": dlq, "profile": "confluent-dlq",
                                "config": {"bootstrap.servers": kit.bootstrap}},
                    }, metrics_port=None, poll_interval_seconds=0.2)
    from volley_serializers.models import GenericMessage

    @engine.stream_app
    def handler(messages: list[GenericMessage]) -> list[tuple[str, GenericMessage]]:
        sizes.append(len(messages))
        return [("out", GenericMessage(total=sum(m.n for m in messages)))]  # type: ignore[attr-defined]

    report = await asyncio.wait_for(handler.run_async(max_messages=30), 60)
    assert report.dead_lettered == 1
    assert sum(sizes) == 29 and max(sizes) <= 8
    assert sum(json.loads(m.value())["total"] for m in kit.read_topic(sink)) == sum(range(30)) - 11
    [dead] = kit.read_topic(dlq)
    assert dead.value() == b"\x00 not json", "the DLQ record is the raw input"
    assert dead.key() == b"k11"
    headers = dict(dead.headers())
    assert headers["trace"] == b"t-1"
    assert headers["volley-error-stage"] == b"deserialize"
    assert headers["volley-source-position"] == b"11"
