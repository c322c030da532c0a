"""The ``orjson`` serializer: JSON through orjson, several times faster than the standard library.

Behaviour worth knowing:

- Output is compact UTF-8 JSON. ``datetime``, ``date``, ``time``, ``UUID``,
  enums and dataclasses are encoded natively by orjson (RFC 3339 datetimes);
  ``Decimal``, sets and ``timedelta`` through :func:`volley_serializers.to_plain`.
  Naive datetimes stay naive (py-volley added ``+00:00``; that changes the value,
  so Volley does not).
- Dict keys must be strings; integers must fit in 64 bits (signed or unsigned);
  NaN and infinities are written as ``null`` (orjson's rule; JSON has no NaN).
- On input, integers beyond 64 bits are read as floats (orjson's rule) and
  numbers beyond the range of a double are rejected.
- Nesting deeper than 1024 levels is rejected on both sides.
- With a Pydantic model handler and a data model (profiles ``confluent``, ``rsmq``...), the bytes are read and
  written by Pydantic itself (``wire_format = "json"``, see ``volley_serializers.pydantic_handlers``): integers
  beyond 64 bits are then kept exactly, both ways.

Every failure is a :class:`volley.errors.SerializationError` carrying the payload.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import orjson

from volley.errors import SerializationError
from volley_serializers._plain import to_plain


class OrjsonSerializer:
    """orjson ``loads`` / ``dumps`` with errors turned into ``SerializationError`` and nothing else in between.

    ``serialize`` and ``deserialize`` are plain functions bound at construction
    (no ``self`` lookups, no per-call allocation beyond the library's own).
    """

    __slots__ = ("deserialize", "serialize", "unchecked_deserialize", "unchecked_serialize")

    # volley.ports.DeclaresWireFormat: plain compact JSON, so a model handler may read and write the bytes itself
    # (Pydantic's parser and encoder: no dict in between). Not inherited (__init_subclass__): a subclass may write
    # other bytes (orjson options, a framing prefix), so it declares JSON itself when it writes plain JSON.
    wire_format: str = "json"

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "wire_format" not in cls.__dict__:
            cls.wire_format = ""

    serialize: Callable[[Any], bytes]
    deserialize: Callable[[bytes], Any]
    # The library's own function, for the engine: it classifies whatever this raises as a
    # SerializationError itself, so the wrapper's try/except would be paid twice per message.
    unchecked_deserialize: Callable[[bytes], Any]
    # orjson.dumps itself, without the hook for types orjson does not know: for data already in JSON form
    # (a model handler's fused dump, volley.queues), which falls back to ``serialize`` if it raises. A subclass
    # that changes what ``serialize`` writes (orjson options) must change this one alike.
    unchecked_serialize: Callable[[Any], bytes]

    def __init__(self) -> None:
        dumps = orjson.dumps
        loads = orjson.loads
        default = to_plain

        def serialize(message: Any) -> bytes:
            try:
                return dumps(message, default=default)
            except Exception as exc:
                raise SerializationError(
                    f"cannot encode {type(message).__qualname__} as JSON (orjson): {exc}", message
                ) from exc

        def deserialize(message: bytes) -> Any:
            try:
                return loads(message)
            except Exception as exc:
                raise SerializationError(f"invalid JSON (orjson): {exc}", message) from exc

        self.serialize = serialize
        self.deserialize = deserialize
        self.unchecked_deserialize = loads
        self.unchecked_serialize = dumps

    def __repr__(self) -> str:
        return "OrjsonSerializer()"
