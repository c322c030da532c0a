"""How the engine binds a model handler to its serializer's abilities, once per queue, through declared ports.

A ``FusedEncodeBinder`` is handed the serializer itself (so it can ask ``isinstance`` about the serializer's
other abilities, such as ``DeclaresDumpMode``), where a ``FastEncodeBinder`` (the older port, still honoured)
only got the serializer's ``unchecked_serialize``. A ``dump_mode`` that is neither "json" nor "python" fails
at Engine construction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import pytest

from volley.errors import ConfigurationError
from volley.plugins import get_registry
from volley.ports import DeclaresDumpMode, FastEncodeBinder, FusedEncodeBinder, UncheckedSerializer
from volley.queues import ResolvedQueue, resolve_queue


@dataclass
class Point:
    x: int
    y: int


def to_json(message: Any) -> bytes:
    return json.dumps(message).encode()


class PlainSerializer:
    def serialize(self, message: Any) -> bytes:
        return to_json(message)

    def deserialize(self, message: bytes) -> Any:
        return json.loads(message)


class UncheckedJson(PlainSerializer):
    def __init__(self) -> None:
        self.unchecked_serialize = to_json  # a plain function, not a method


class PythonModeJson(UncheckedJson):
    dump_mode = "python"


class DumpHandler:
    """A handler with a bound dump (``DeconstructBinder``): the engine then asks for a fused encode."""

    def construct(self, message: Any, schema: Any) -> Any:
        return schema(**message)

    def deconstruct(self, model: Any) -> Any:
        return asdict(model)

    def bind_deconstruct(self, model: Any, queue: str) -> Callable[[Any], Any]:
        return self.deconstruct


class FusingHandler(DumpHandler):
    def __init__(self) -> None:
        self.given: list[object] = []

    def bind_fused_encode(self, model: Any, serializer: UncheckedSerializer,
                          checked: Callable[[Any], bytes]) -> Callable[[Any], bytes] | None:
        self.given.append(serializer)
        serialize = serializer.unchecked_serialize
        python_mode = isinstance(serializer, DeclaresDumpMode) and serializer.dump_mode == "python"
        deconstruct = self.deconstruct

        def fused(message: Any) -> bytes:
            return serialize({"python": python_mode, **deconstruct(message)})

        return fused


class OldStyleHandler(DumpHandler):
    """Written against the older port: ``bind_fast_encode`` gets the serializer's function, not the serializer."""

    def __init__(self) -> None:
        self.given: list[object] = []

    def bind_fast_encode(self, model: Any, unchecked_serialize: Callable[[Any], bytes],
                         checked: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        self.given.append(unchecked_serialize)
        deconstruct = self.deconstruct

        def fused(message: Any) -> bytes:
            return unchecked_serialize({"old": True, **deconstruct(message)})

        return fused


class BothHandler(FusingHandler, OldStyleHandler):
    pass


def output_queue(serializer: Any, handler: Any) -> ResolvedQueue:
    settings = {"value": "q", "connector": "memory", "serializer": serializer, "model_handler": handler,
                "data_model": Point}
    return resolve_queue(get_registry(), "q", settings, "t", "output")


@pytest.mark.parametrize("serializer_class", [UncheckedJson, PythonModeJson])
def test_a_fused_encode_binder_is_handed_the_serializer_itself(serializer_class: type) -> None:
    serializer, handler = serializer_class(), FusingHandler()
    assert isinstance(handler, FusedEncodeBinder)
    queue = output_queue(serializer, handler)
    assert handler.given == [serializer]
    python_mode = serializer_class is PythonModeJson
    assert json.loads(queue.encode(Point(1, 2))) == {"python": python_mode, "x": 1, "y": 2}


def test_a_handler_with_only_the_older_fast_encode_port_still_gets_the_function() -> None:
    serializer, handler = UncheckedJson(), OldStyleHandler()
    assert isinstance(handler, FastEncodeBinder) and not isinstance(handler, FusedEncodeBinder)
    queue = output_queue(serializer, handler)
    assert handler.given == [to_json]
    assert json.loads(queue.encode(Point(1, 2))) == {"old": True, "x": 1, "y": 2}


def test_a_handler_with_both_ports_is_bound_once_through_the_newer_one() -> None:
    serializer, handler = UncheckedJson(), BothHandler()
    queue = output_queue(serializer, handler)
    assert handler.given == [serializer]
    assert json.loads(queue.encode(Point(1, 2))) == {"python": False, "x": 1, "y": 2}


def test_without_an_unchecked_serializer_nothing_is_fused() -> None:
    handler = BothHandler()
    queue = output_queue(PlainSerializer(), handler)
    assert handler.given == []
    assert json.loads(queue.encode(Point(1, 2))) == {"x": 1, "y": 2}


def test_an_unknown_dump_mode_fails_at_engine_construction() -> None:
    class Misspelled(UncheckedJson):
        dump_mode = "Python"

    with pytest.raises(ConfigurationError, match=r"dump_mode 'Python': it must be 'json' or 'python'"):
        output_queue(Misspelled(), DumpHandler())
