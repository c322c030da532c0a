"""A third-party serializer's abilities reach the Pydantic handlers through ports, whatever its functions are.

The handlers used to find the serializer by probing ``unchecked_serialize.__self__`` (and then its
``dump_mode`` and ``unchecked_deserialize`` attributes): that only worked when ``unchecked_serialize`` was a
bound method of the serializer. A serializer whose ``unchecked_serialize`` was a plain function or a callable
instance (as the orjson serializer's is) had its Python dump mode ignored: its models went out in JSON mode.
Now the engine hands the serializer itself to the handler, which asks ``isinstance(serializer,
DeclaresDumpMode)`` / ``UncheckedDeserializer`` once per queue.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import msgpack
import pytest
from pydantic import BaseModel

from volley.plugins import get_registry
from volley.ports import DeclaresDumpMode, FusedEncodeBinder, UncheckedDeserializer
from volley.queues import ResolvedQueue, resolve_queue
from volley_serializers.msgpack_serializer import MsgpackSerializer
from volley_serializers.orjson_serializer import OrjsonSerializer
from volley_serializers.pydantic_handlers import PydanticModelHandler


class Part(BaseModel):
    name: str
    raw: bytes


class Loose(BaseModel):
    """Content typed only at run time: a Python-mode dump is packed, then read back to check it."""

    name: str
    payload: Any


class Recorder:
    """A callable instance: no ``__self__`` leads from it back to the serializer it belongs to."""

    def __init__(self) -> None:
        self.seen: list[Any] = []

    def __call__(self, message: Any) -> bytes:
        self.seen.append(message)
        return repr(message).encode()


def plain_function(seen: list[Any]) -> Callable[[Any], bytes]:
    def unchecked_serialize(message: Any) -> bytes:
        seen.append(message)
        return repr(message).encode()

    return unchecked_serialize


class RecordingSerializer:
    """A third-party serializer whose ``unchecked_serialize`` is an attribute, not a method (as orjson's is)."""

    def __init__(self, kind: str) -> None:
        self.seen: list[Any] = []
        if kind == "callable instance":
            recorder = Recorder()
            self.seen = recorder.seen
            self.unchecked_serialize: Callable[[Any], bytes] = recorder
        else:
            self.unchecked_serialize = plain_function(self.seen)

    def serialize(self, message: Any) -> bytes:
        return repr(message).encode()

    def deserialize(self, message: bytes) -> Any:
        return message


class PythonModeSerializer(RecordingSerializer):
    dump_mode = "python"


class JsonModeSerializer(RecordingSerializer):
    dump_mode = "json"


class RereadingSerializer(PythonModeSerializer):
    """Python mode, and the library's raw decode, which the handler uses to check a dump of run-time-typed content."""

    def __init__(self, kind: str) -> None:
        super().__init__(kind)
        self.reread: list[bytes] = []

    def unchecked_deserialize(self, message: bytes) -> Any:
        self.reread.append(message)
        return message


def output_queue(serializer: Any, model: Any, handler: Any = "pydantic") -> ResolvedQueue:
    settings = {"value": "q", "connector": "memory", "serializer": serializer, "model_handler": handler,
                "data_model": model}
    return resolve_queue(get_registry(), "q", settings, "t", "output")


KINDS = ["plain function", "callable instance"]


@pytest.mark.parametrize("kind", KINDS)
def test_a_serializer_declaring_python_mode_gets_python_mode_dumps(kind: str) -> None:
    serializer = PythonModeSerializer(kind)
    assert isinstance(serializer, DeclaresDumpMode)
    output_queue(serializer, Part).encode(Part(name="p", raw=b"\x00\xff"))
    assert serializer.seen == [{"name": "p", "raw": b"\x00\xff"}]  # bytes stay bytes


@pytest.mark.parametrize("serializer_class", [RecordingSerializer, JsonModeSerializer], ids=["undeclared", "json"])
@pytest.mark.parametrize("kind", KINDS)
def test_a_serializer_not_declaring_python_mode_gets_json_mode_dumps(kind: str, serializer_class: type) -> None:
    serializer = serializer_class(kind)
    output_queue(serializer, Part).encode(Part(name="p", raw=b"abc"))
    assert serializer.seen == [{"name": "p", "raw": "abc"}]  # JSON mode: bytes as UTF-8 text


@pytest.mark.parametrize("kind", KINDS)
def test_a_python_mode_serializer_with_an_unchecked_decode_gets_its_dumps_checked_by_it(kind: str) -> None:
    serializer = RereadingSerializer(kind)
    assert isinstance(serializer, UncheckedDeserializer)
    output_queue(serializer, Loose).encode(Loose(name="l", payload={"k": b"\x01"}))
    assert serializer.seen == [{"name": "l", "payload": {"k": b"\x01"}}]
    assert serializer.reread == [repr(serializer.seen[0]).encode()]  # packed once, read back once


def test_msgpack_and_orjson_declare_what_they_want() -> None:
    msgpack, orjson = MsgpackSerializer(), OrjsonSerializer()
    assert isinstance(msgpack, DeclaresDumpMode) and msgpack.dump_mode == "python"
    assert not isinstance(orjson, DeclaresDumpMode)
    assert isinstance(msgpack, UncheckedDeserializer) and isinstance(orjson, UncheckedDeserializer)
    assert isinstance(PydanticModelHandler(), FusedEncodeBinder)


class Secretive(BaseModel):
    n: int
    secret: str


class NoSecrets(PydanticModelHandler):
    """A subclass written for the older port: its own dump leaves a field out, and its bind_fast_encode turns the
    fused path off so that the engine uses that dump."""

    def bind_deconstruct(self, schema: Any, queue: str | None = None) -> Any:
        return lambda model: model.model_dump(mode="json", exclude={"secret"})

    def bind_fast_encode(self, schema: Any, serialize: Any, fallback: Any) -> Any:
        return None


def test_a_subclass_overriding_the_older_bind_fast_encode_still_decides() -> None:
    """The engine prefers bind_fused_encode, which every subclass inherits: a subclass's bind_fast_encode was
    never called any more, and the fused path dumped the field its own dump leaves out (a leak)."""
    queue = output_queue("orjson", Secretive, NoSecrets())
    assert json.loads(queue.encode(Secretive(n=1, secret="s"))) == {"n": 1}


class Wrapping(PydanticModelHandler):
    """A subclass of the older port that only special-cases one schema and leaves the rest to super()."""

    def bind_fast_encode(self, schema: Any, serialize: Any, fallback: Any) -> Any:
        if schema is None:
            return None
        return super().bind_fast_encode(schema, serialize, fallback)


def test_a_subclass_delegating_to_super_keeps_python_mode_for_msgpack() -> None:
    """Its super() call reached a JSON-mode-only bind_fast_encode: msgpack outputs went out with bytes as text, and
    bytes that are not UTF-8 failed (a review found it)."""
    part = Part(name="p", raw=b"\x00\xff")
    base = output_queue("msgpack", Part, PydanticModelHandler()).encode(part)
    assert output_queue("msgpack", Part, Wrapping()).encode(part) == base
    assert msgpack.unpackb(base) == {"name": "p", "raw": b"\x00\xff"}
