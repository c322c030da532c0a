"""Pydantic models through msgpack: Python-mode dumps, so bytes stay bytes, and the model comes back equal.

The handler used to dump every model in JSON mode, whatever the serializer: ``bytes`` fields went out as
UTF-8 strings (binary data failed to encode at all) although msgpack carries bytes natively.
"""

from __future__ import annotations

import enum
from datetime import date, datetime, time, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import msgpack
import pytest
from pydantic import AnyUrl, BaseModel, ConfigDict

from volley import Engine, MemoryBroker
from volley_serializers.models import GenericMessage
from volley_serializers.msgpack_serializer import MsgpackSerializer

BINARY = bytes(range(256))  # not UTF-8


class Shade(enum.Enum):
    DARK = "dark"
    LIGHT = "light"


class Part(BaseModel):
    name: str
    raw: bytes


class Rich(BaseModel):
    blob: bytes
    blobs: list[bytes]
    maybe: bytes | None
    at: datetime
    naive: datetime
    day: date
    clock: time
    took: timedelta
    long_ago: timedelta
    amount: Decimal
    ident: UUID
    tags: set[str]
    frozen: frozenset[int]
    shade: Shade
    by_id: dict[int, str]
    part: Part
    parts: list[Part]


class Base64Config(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    data: bytes


class Linked(BaseModel):
    url: AnyUrl
    data: bytes


def rich() -> Rich:
    return Rich(
        blob=BINARY, blobs=[b"", b"\x00\x01", BINARY], maybe=b"\xff",
        at=datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=timezone(timedelta(hours=-5))),
        naive=datetime(2026, 1, 2, 3, 4, 5), day=date(2026, 1, 2), clock=time(23, 59, 59, 999999),
        took=timedelta(days=99999, seconds=86399, microseconds=999999), long_ago=timedelta(microseconds=-1),
        amount=Decimal("12345678901234567890.123456789"), ident=UUID(int=2**128 - 1),
        tags={"a", "b"}, frozen=frozenset({1, 2}), shade=Shade.LIGHT, by_id={1: "one", -2: "minus two"},
        part=Part(name="p", raw=BINARY), parts=[Part(name="q", raw=b"\x80")],
    )


def engine_with(model: Any, broker: MemoryBroker | None = None, handler: str = "pydantic") -> Engine:
    broker = broker or MemoryBroker()
    queue = {"profile": "memory-msgpack-pydantic", "data_model": model, "model_handler": handler,
             "config": {"broker": broker}}
    return Engine(app_name="t", input_queue="in", output_queues=["out"], metrics_port=None, poll_interval_seconds=0.02,
                  queue_config={"in": {"value": "in", **queue}, "out": {"value": "out", **queue}})


@pytest.mark.parametrize("model", [rich(), Base64Config(data=BINARY), Linked(url="https://example.org/x", data=b"\x00"),
                                   GenericMessage(blob=BINARY, n=1, nested={"raw": [b"\x00"]})],
                         ids=["rich", "base64-config", "url", "generic"])
def test_a_model_round_trips_equal_through_msgpack(model: BaseModel) -> None:
    queue = engine_with(type(model)).queues["out"]
    raw = queue.encode(model)
    back = queue.validate(queue.deserialize(raw))
    assert back == model
    wire = msgpack.unpackb(raw)
    blob_field = "blob" if "blob" in wire else "data"
    assert isinstance(wire[blob_field], bytes), wire[blob_field]  # msgpack's bin type, not a string


def test_the_wire_form_of_what_msgpack_cannot_carry() -> None:
    wire = msgpack.unpackb(engine_with(Rich).queues["out"].encode(rich()))
    assert wire["blob"] == BINARY and wire["blobs"][2] == BINARY and wire["part"]["raw"] == BINARY
    assert wire["at"] == "2026-01-02T03:04:05.678901-05:00" and wire["naive"] == "2026-01-02T03:04:05"
    assert wire["day"] == "2026-01-02" and wire["clock"] == "23:59:59.999999"
    assert wire["took"] == "P273Y354DT23H59M59.999999S"  # Pydantic's ISO 8601 form: exact, float seconds round
    assert wire["amount"] == "12345678901234567890.123456789"
    assert wire["ident"] == "ffffffff-ffff-ffff-ffff-ffffffffffff"
    assert sorted(wire["tags"]) == ["a", "b"] and wire["shade"] == "light"
    assert wire["by_id"] == {"1": "one", "-2": "minus two"}  # msgpack readers refuse integer map keys


def test_end_to_end_through_the_engine() -> None:
    broker = MemoryBroker()
    engine = engine_with(Rich, broker)
    broker.publish("in", engine.input.encode(rich()))
    seen: list[Rich] = []

    @engine.stream_app
    def forward(message: Rich) -> list[tuple[str, Rich]]:
        seen.append(message)
        return [("out", message.model_copy(update={"blob": message.blob[::-1]}))]

    report = forward.run_until_drained(timeout=20)
    assert (report.acked, report.dead_lettered) == (1, 0)
    assert seen == [rich()]
    out = engine.queues["out"]
    assert [out.validate(out.deserialize(raw)) for raw in broker.produced("out")] == [
        rich().model_copy(update={"blob": BINARY[::-1]})]


def test_a_subclass_and_a_list_of_models_are_dumped_in_python_mode_too() -> None:
    class Child(Part):
        extra: bytes = b"\x01"

    queue = engine_with(Part).queues["out"]
    assert msgpack.unpackb(queue.encode(Child(name="c", raw=BINARY))) == {"name": "c", "raw": BINARY, "extra": b"\x01"}
    batch = engine_with(Part, handler="pydantic-list").queues["out"]
    assert msgpack.unpackb(batch.encode([Part(name="a", raw=BINARY)])) == [{"name": "a", "raw": BINARY}]


def test_a_model_handed_to_the_serializer_directly_is_dumped_in_python_mode() -> None:
    serializer = MsgpackSerializer()
    value = {"part": Part(name="p", raw=BINARY), "parts": [Part(name="q", raw=b"")]}
    assert serializer.deserialize(serializer.serialize(value)) == {
        "part": {"name": "p", "raw": BINARY}, "parts": [{"name": "q", "raw": b""}]}


def test_a_wrong_output_still_says_what_is_wrong() -> None:
    queue = engine_with(Part).queues["out"]
    with pytest.raises(TypeError, match="data model is Part, but the handler produced dict"):
        queue.encode({"name": "p", "raw": b""})


def test_integer_keys_in_content_typed_at_run_time_are_written_as_strings() -> None:
    """msgpack readers refuse integer map keys: JSON mode wrote them as strings, and so does Python mode."""
    queue = engine_with(GenericMessage).queues["out"]
    back = queue.validate(queue.deserialize(queue.encode(GenericMessage(counts={1: "a"}, raw=b"\xff"))))
    assert back.model_dump() == {"counts": {"1": "a"}, "raw": b"\xff"}
