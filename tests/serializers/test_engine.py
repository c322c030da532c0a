"""The serializers and Pydantic handlers inside the engine, on the in-memory broker: profiles, DLQ, batches."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from pydantic import BaseModel

from volley import Engine, MemoryBroker
from volley_serializers.models import GenericMessage

PROFILES = ["memory-pydantic", "memory-orjson-pydantic", "memory-msgpack-pydantic", "memory-json-pydantic"]


class Reading(BaseModel):
    sensor: str
    value: float
    at: datetime


class Alert(BaseModel):
    sensor: str
    level: int
    at: datetime


def build(broker: MemoryBroker, profile: str, **queue: Any) -> Engine:
    config = {
        "in": {"value": "in", "profile": profile, "config": {"broker": broker}, **queue},
        "out": {"value": "out", "profile": profile, "config": {"broker": broker}},
        "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    if "data_model" in queue:
        config["out"]["data_model"] = Alert
    return Engine(app_name="t", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                  queue_config=config, metrics_port=None, poll_interval_seconds=0.02, retry_backoff_seconds=0.0)


def headers(broker: MemoryBroker) -> list[dict[str, str]]:
    return [{k: v.decode() for k, v in (env.headers or {}).items()} for env in broker.produced_records("dlq")]


@pytest.mark.parametrize("profile", PROFILES)
def test_profiles_carry_generic_messages_end_to_end(profile: str) -> None:
    broker = MemoryBroker()
    engine = build(broker, profile)
    assert engine.input.data_model is GenericMessage
    sent = [GenericMessage(n=n, name=f"item-{n}", tags=["a", "b"], nested={"ok": True}) for n in range(20)]
    for message in sent:
        broker.publish("in", engine.input.encode(message))

    @engine.stream_app
    def forward(message: GenericMessage) -> list[tuple[str, GenericMessage]]:
        assert isinstance(message, GenericMessage)
        return [("out", GenericMessage(**message.model_dump(), seen=True))]

    report = forward.run_until_drained(timeout=20)
    assert report.acked == 20 and report.dead_lettered == 0
    out = engine.queues["out"]
    received = [out.validate(out.deserialize(raw)) for raw in broker.produced("out")]
    assert [m.model_dump() for m in received] == [{**m.model_dump(), "seen": True} for m in sent]


@pytest.mark.parametrize("profile", PROFILES)
def test_bad_inputs_go_to_the_dlq_with_the_reason(profile: str) -> None:
    broker = MemoryBroker()
    engine = build(broker, profile, data_model=Reading)
    good = Reading(sensor="s1", value=1.5, at=datetime(2026, 1, 1, tzinfo=UTC))
    encoded = engine.input.encode(good)
    wrong_shape = engine.queues["out"].encode(Alert(sensor="s1", level=2, at=good.at))  # valid, but not a Reading
    broker.publish("in", encoded)
    broker.publish("in", encoded[: len(encoded) // 2])  # truncated
    broker.publish("in", wrong_shape)
    broker.publish("in", b"[" * 50_000)  # deeply nested, and unterminated
    broker.publish("in", encoded)

    @engine.stream_app
    def alert(reading: Reading) -> list[tuple[str, Alert]]:
        return [("out", Alert(sensor=reading.sensor, level=int(reading.value), at=reading.at))]

    report = alert.run_until_drained(timeout=20)
    assert report.acked == 2 and report.dead_lettered == 3
    dead = broker.produced_records("dlq")
    assert [env.value for env in dead] == [encoded[: len(encoded) // 2], wrong_shape, b"[" * 50_000]
    meta = headers(broker)
    assert [h["volley-error-type"] for h in meta] == ["SerializationError", "DataValidationError",
                                                      "SerializationError"]
    assert "value: Field required" in meta[1]["volley-error-reason"]
    assert all(h["volley-error-reason"] and "\n" not in h["volley-error-reason"] for h in meta)
    assert {h["volley-error-stage"] for h in meta} <= {"deserialize", "validate"}
    assert len(broker.produced("out")) == 2


def test_an_output_of_the_wrong_type_goes_to_the_dlq_as_a_type_error() -> None:
    broker = MemoryBroker()
    engine = build(broker, "memory-orjson-pydantic", data_model=Reading)
    for n in range(3):
        broker.publish("in", orjson.dumps({"sensor": f"s{n}", "value": n, "at": "2026-01-01T00:00:00Z"}))

    @engine.stream_app
    def alert(reading: Reading) -> list[tuple[str, Any]]:
        if reading.sensor == "s1":
            return [("out", reading)]  # a Reading where the queue wants an Alert
        return [("out", Alert(sensor=reading.sensor, level=0, at=reading.at))]

    report = alert.run_until_drained(timeout=20)
    assert report.acked == 2 and report.dead_lettered == 1
    (meta,) = headers(broker)
    assert meta["volley-error-stage"] == "output" and meta["volley-error-type"] == "TypeError"
    assert "Alert" in meta["volley-error-reason"] and "Reading" in meta["volley-error-reason"]


def test_pydantic_list_batches_are_validated_per_record() -> None:
    broker = MemoryBroker()
    engine = build(broker, "memory-orjson-pydantic", data_model=Reading, model_handler="pydantic-list",
                   batch_size=5)
    for n in range(10):
        value: Any = "not a number" if n == 3 else n
        broker.publish("in", orjson.dumps({"sensor": f"s{n}", "value": value, "at": "2026-01-01T00:00:00Z"}))
    batches: list[list[str]] = []

    @engine.stream_app
    def summarize(readings: list[Reading]) -> list[tuple[str, Alert]]:
        assert all(isinstance(r, Reading) for r in readings)
        batches.append([r.sensor for r in readings])
        return [("out", Alert(sensor=",".join(r.sensor for r in readings), level=len(readings), at=readings[0].at))]

    report = summarize.run_until_drained(timeout=20)
    assert report.dead_lettered == 1
    assert sorted(s for batch in batches for s in batch) == sorted(f"s{n}" for n in range(10) if n != 3)
    (meta,) = headers(broker)
    assert meta["volley-error-type"] == "DataValidationError" and "value:" in meta["volley-error-reason"]
    assert broker.produced_records("dlq")[0].value == orjson.dumps(
        {"sensor": "s3", "value": "not a number", "at": "2026-01-01T00:00:00Z"})


@pytest.mark.parametrize("profile", PROFILES)
def test_inline_handling_explains_bad_inputs_and_outputs_like_the_thread(
        profile: str, caplog: pytest.LogCaptureFixture) -> None:
    """Once calibrated, a fast sync handler runs inline, where validation and encoding take unchecked fast
    paths: their failures must still reach the DLQ with the checked path's explanation."""
    broker = MemoryBroker()
    config = {
        "in": {"value": "in", "profile": profile, "data_model": Reading, "config": {"broker": broker}},
        "out": {"value": "out", "profile": profile, "data_model": Alert, "config": {"broker": broker}},
        "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    engine = Engine(app_name="t", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                    queue_config=config, metrics_port=None, poll_interval_seconds=0.02, retry_backoff_seconds=0.0,
                    consume_batch_size=5, max_buffered=5)
    at = datetime(2026, 1, 1, tzinfo=UTC)
    wrong_shape = engine.queues["out"].encode(Alert(sensor="s", level=2, at=at))  # valid data, not a Reading
    for n in range(30):
        broker.publish("in", wrong_shape if n == 22 else engine.input.encode(Reading(sensor=f"s{n}", value=n, at=at)))

    @engine.stream_app
    def alert(reading: Reading) -> list[tuple[str, Any]]:
        if reading.sensor == "s25":
            return [("out", reading)]  # a Reading where the queue wants an Alert
        return [("out", Alert(sensor=reading.sensor, level=int(reading.value), at=reading.at))]

    with caplog.at_level("DEBUG", logger="volley"):
        report = alert.run_until_drained(timeout=20, drain_idle_seconds=0.0)
    assert "running them inline" in caplog.text
    assert report.acked == 28 and report.dead_lettered == 2
    bad_input, bad_output = headers(broker)
    assert bad_input["volley-error-stage"] == "validate"
    assert bad_input["volley-error-type"] == "DataValidationError"
    assert "value: Field required" in bad_input["volley-error-reason"]
    assert bad_output["volley-error-stage"] == "output" and bad_output["volley-error-type"] == "TypeError"
    assert "Alert" in bad_output["volley-error-reason"] and "Reading" in bad_output["volley-error-reason"]
    alerts = [engine.queues["out"].validate(engine.queues["out"].deserialize(raw)) for raw in broker.produced("out")]
    assert [a.sensor for a in alerts] == [f"s{n}" for n in range(30) if n not in (22, 25)]
