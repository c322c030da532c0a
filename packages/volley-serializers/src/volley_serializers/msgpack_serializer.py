"""The ``msgpack`` serializer: compact binary, with ``bytes`` as a first-class type.

Behaviour worth knowing:

- ``str`` and ``bytes`` stay distinct (msgpack's bin type); tuples come back
  as lists; map keys must be ``str`` or ``bytes`` when reading (msgpack's
  ``strict_map_key``, which protects against hash-flooding with odd keys).
- ``datetime`` and friends, ``UUID``, ``Decimal``, enums, sets and dataclasses
  are written as their JSON-style form through :func:`volley_serializers.to_plain`
  (ISO 8601 strings, ...), the same form the Pydantic handlers produce, so a
  model round-trips through msgpack exactly as through JSON. msgpack's own
  Timestamp extension is read back as a ``msgpack.Timestamp``.
- Integers must fit in 64 bits; unknown extension types are read as
  ``msgpack.ExtType``; nesting, lengths and sizes are bounded by msgpack's
  own limits (a header claiming more items than the payload holds is rejected).

Packing reuses one ``msgpack.Packer`` per thread (about 40% cheaper than
``msgpack.packb``, which builds a Packer per call; a Packer is not safe to
share between threads). Every failure is a ``SerializationError``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]  # msgpack ships no type information

from volley.errors import SerializationError
from volley_serializers._plain import to_plain


class _ThreadPacker(threading.local):
    """One Packer per thread, created on that thread's first use."""

    def __init__(self) -> None:
        self.pack: Callable[[Any], bytes] = msgpack.Packer(default=to_plain, use_bin_type=True).pack


_EXPLAINED = {"StackError": "nested too deeply", "ExtraData": "extra bytes after the first value"}


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc) or _EXPLAINED.get(name, "")
    return f"{name}: {text}" if text else name


class MsgpackSerializer:
    """msgpack pack / unpack with errors turned into ``SerializationError``."""

    __slots__ = ("deserialize", "serialize", "unchecked_deserialize")

    serialize: Callable[[Any], bytes]
    deserialize: Callable[[bytes], Any]
    # The library's own function, for the engine: it classifies whatever this raises as a
    # SerializationError itself, so the wrapper's try/except would be paid twice per message.
    unchecked_deserialize: Callable[[bytes], Any]

    def __init__(self) -> None:
        unpackb = msgpack.unpackb
        local = _ThreadPacker()

        def serialize(message: Any) -> bytes:
            try:
                return local.pack(message)
            except Exception as exc:
                raise SerializationError(
                    f"cannot encode {type(message).__qualname__} as msgpack: {_describe(exc)}", message
                ) from exc

        def deserialize(message: bytes) -> Any:
            try:
                return unpackb(message)
            except Exception as exc:
                raise SerializationError(f"invalid msgpack: {_describe(exc)}", message) from exc

        self.serialize = serialize
        self.deserialize = deserialize
        self.unchecked_deserialize = unpackb

    def __repr__(self) -> str:
        return "MsgpackSerializer()"
