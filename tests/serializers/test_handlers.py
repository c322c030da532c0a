"""The adapters on their own: caching, schemas other than models, conversions, threads, re-exports."""

from __future__ import annotations

import dataclasses
import enum
import threading
from datetime import UTC, date, datetime, time, timedelta
from decimal import Decimal
from pathlib import PurePosixPath
from typing import Any
from uuid import UUID

import msgpack
import orjson
import pytest
from pydantic import BaseModel
from typing_extensions import TypedDict

import volley
import volley_serializers
from volley import Engine
from volley.errors import ConfigurationError, DataValidationError, SerializationError
from volley_serializers import pydantic_handlers, to_plain
from volley_serializers.models import GenericMessage
from volley_serializers.msgpack_serializer import MsgpackSerializer
from volley_serializers.orjson_serializer import OrjsonSerializer
from volley_serializers.pydantic_handlers import (
    PydanticListModelHandler,
    PydanticModelHandler,
    PydanticParserModelHandler,
)


class Point(BaseModel):
    x: int
    y: int


@dataclasses.dataclass
class Pair:
    left: int
    right: str


class Named(TypedDict):
    name: str


def test_reexports_are_core_exceptions() -> None:
    assert volley_serializers.SerializationError is volley.SerializationError
    assert volley_serializers.DataValidationError is volley.DataValidationError
    assert volley_serializers.GenericMessage is GenericMessage
    with pytest.raises(AttributeError):
        _ = volley_serializers.NoSuchThing


def test_bound_functions_are_built_once_and_no_adapter_per_message(monkeypatch: pytest.MonkeyPatch) -> None:
    built: list[Any] = []
    real = pydantic_handlers.TypeAdapter

    def counting(schema: Any) -> Any:
        built.append(schema)
        return real(schema)

    monkeypatch.setattr(pydantic_handlers, "TypeAdapter", counting)
    for handler in (PydanticModelHandler(), PydanticParserModelHandler(), PydanticListModelHandler()):
        assert handler.bind(Point) is handler.bind(Point)
        assert handler.bind_deconstruct(Point) is handler.bind_deconstruct(Point)
        raw = b'{"x":1,"y":2}'
        data = raw if isinstance(handler, PydanticParserModelHandler) else orjson.loads(raw)
        for _ in range(200):
            assert handler.construct(data, Point) == Point(x=1, y=2)
            handler.deconstruct(Point(x=1, y=2))
    assert built == []  # models use their own validator and serializer
    handler = PydanticModelHandler()
    for _ in range(200):
        assert handler.construct([1, "2"], list[int]) == [1, 2]
        assert handler.bind_deconstruct(list[int])([3]) == [3]
    assert built == [list[int], list[int]]  # one for validation, one for dumping, whatever the message count


@pytest.mark.parametrize("handler", [PydanticModelHandler(), PydanticListModelHandler()])
def test_schemas_other_than_models(handler: PydanticModelHandler) -> None:
    assert handler.construct({"left": "1", "right": "r"}, Pair) == Pair(1, "r")
    assert handler.bind_deconstruct(Pair)(Pair(2, "s")) == {"left": 2, "right": "s"}
    assert handler.construct({"name": "n"}, Named) == {"name": "n"}
    with pytest.raises(DataValidationError, match="left"):
        handler.construct({"left": "x", "right": "r"}, Pair)
    with pytest.raises(SerializationError):
        handler.bind_deconstruct(list[int])(["not", "ints"])  # not a list[int]: no silent fallback
    assert handler.construct({"a": 1}, None) == {"a": 1}  # no data model: unchanged


def test_parser_handles_schemas_other_than_models() -> None:
    handler = PydanticParserModelHandler()
    assert handler.construct(b'{"left": 1, "right": "r"}', Pair) == Pair(1, "r")
    assert orjson.loads(handler.bind_deconstruct(Pair)(Pair(1, "r"))) == {"left": 1, "right": "r"}
    assert orjson.loads(handler.deconstruct(Pair(1, "r"))) == {"left": 1, "right": "r"}


def test_a_model_with_unresolved_references_fails_at_engine_construction() -> None:
    class Later(BaseModel):
        child: Missing  # type: ignore[name-defined]  # noqa: F821

    with pytest.raises(ConfigurationError, match=r"Later is not fully defined.*model_rebuild"):
        Engine(app_name="t", input_queue="in", metrics_port=None,
               queue_config={"in": {"value": "in", "profile": "memory-orjson-pydantic", "data_model": Later}})


def test_generic_message_is_permissive() -> None:
    handler = PydanticModelHandler()
    message = handler.construct({"anything": [1, {"x": None}], "n": "7"}, GenericMessage)
    assert message.anything == [1, {"x": None}] and message.n == "7"  # no coercion, no checks
    assert handler.deconstruct(message) == {"anything": [1, {"x": None}], "n": "7"}
    with pytest.raises(DataValidationError, match="GenericMessage"):
        handler.construct([1, 2], GenericMessage)  # still an object


def test_pydantic_list_construct_names_the_bad_item() -> None:
    handler = PydanticListModelHandler()
    assert handler.construct([{"x": 1, "y": 1}, {"x": 2, "y": 2}], Point) == [Point(x=1, y=1), Point(x=2, y=2)]
    with pytest.raises(DataValidationError, match=r"item 1: .*y: Field required") as caught:
        handler.construct([{"x": 1, "y": 1}, {"x": 2}], Point)
    assert caught.value.payload == [{"x": 1, "y": 1}, {"x": 2}]
    assert handler.deconstruct((Point(x=1, y=1),)) == [{"x": 1, "y": 1}]


def test_validation_reasons_are_short_and_name_the_fields() -> None:
    class Wide(BaseModel):
        a: int
        b: int
        c: int
        d: int
        e: int

    with pytest.raises(DataValidationError) as caught:
        PydanticModelHandler().construct({"a": "x" * 10_000}, Wide)
    reason = caught.value.reason
    assert reason.startswith("5 validation errors for Wide: a: Input should be a valid integer")
    assert reason.endswith("and 2 more") and "xxxxx" not in reason


def test_non_validation_errors_from_validators_are_validation_errors() -> None:
    class Big(BaseModel):
        n: int

    with pytest.raises(DataValidationError, match="Big"):
        PydanticModelHandler().construct({"n": "1" * 5000}, Big)  # int() digit limit raises ValueError


def test_dumping_failures_are_serialization_errors() -> None:
    deep: Any = []
    for _ in range(2000):
        deep = [deep]
    message = GenericMessage(nested=deep)
    for handler in (PydanticModelHandler(), PydanticParserModelHandler()):
        with pytest.raises(SerializationError, match="cannot dump GenericMessage"):
            handler.deconstruct(message)
    with pytest.raises(SerializationError):
        PydanticModelHandler().deconstruct(object())


class Shade(enum.Enum):
    DARK = "dark"


def test_to_plain_converts_common_values_and_refuses_the_rest() -> None:
    aware = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    assert to_plain(aware) == "2026-01-02T03:04:05+00:00"
    assert to_plain(date(2026, 1, 2)) == "2026-01-02" and to_plain(time(1, 2)) == "01:02:00"
    assert to_plain(Decimal("1.10")) == "1.10" and to_plain(UUID(int=1)) == "00000000-0000-0000-0000-000000000001"
    assert to_plain(Shade.DARK) == "dark" and sorted(to_plain({2, 1})) == [1, 2]
    assert to_plain(timedelta(seconds=90)) == 90.0 and to_plain(PurePosixPath("/a/b")) == "/a/b"
    assert to_plain(Point(x=1, y=2)) == {"x": 1, "y": 2} and to_plain(Pair(1, "r")) == {"left": 1, "right": "r"}
    with pytest.raises(TypeError, match="not serializable: object"):
        to_plain(object())


def test_serializers_use_to_plain_for_values_outside_models() -> None:
    value = {"amount": Decimal("2.50"), "at": datetime(2026, 1, 1), "tags": frozenset({"a"}), "shade": Shade.DARK}
    expected = {"amount": "2.50", "at": "2026-01-01T00:00:00", "tags": ["a"], "shade": "dark"}
    for serializer in (OrjsonSerializer(), MsgpackSerializer()):
        assert serializer.deserialize(serializer.serialize(value)) == expected


def test_msgpack_packers_are_per_thread() -> None:
    serializer = MsgpackSerializer()
    errors: list[str] = []
    start = threading.Barrier(4)

    def work(n: int) -> None:
        start.wait()
        for i in range(3000):
            value = {"thread": n, "i": i, "at": datetime(2026, 1, 1, n, i % 60), "blob": bytes([n]) * (i % 50)}
            back = msgpack.unpackb(serializer.serialize(value))
            if back != {**value, "at": value["at"].isoformat()}:
                errors.append(f"thread {n} item {i}: {back!r}")
                return

    threads = [threading.Thread(target=work, args=(n,)) for n in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_serializer_reprs_and_payloads() -> None:
    assert repr(OrjsonSerializer()) == "OrjsonSerializer()" and repr(MsgpackSerializer()) == "MsgpackSerializer()"
    assert repr(PydanticListModelHandler()) == "PydanticListModelHandler()"
    with pytest.raises(SerializationError) as caught:
        OrjsonSerializer().deserialize(b"{nope")
    assert caught.value.payload == b"{nope" and caught.value.reason.startswith("invalid JSON (orjson)")
