"""The ``msgpack`` serializer: compact binary, with ``bytes`` as a first-class type.

Behaviour worth knowing:

- ``str`` and ``bytes`` stay distinct (msgpack's bin type); tuples come back
  as lists; map keys must be ``str`` or ``bytes`` when reading (msgpack's
  ``strict_map_key``, which protects against hash-flooding with odd keys).
- ``datetime`` and friends, ``UUID``, ``Decimal``, enums, sets and dataclasses
  are written as their JSON-style form through :func:`volley_serializers.to_plain`
  (ISO 8601 strings, ...). msgpack's own Timestamp extension is read back as a
  ``msgpack.Timestamp``.
- Pydantic models are dumped in Python mode (``dump_mode = "python"``, the
  ``volley.ports.DeclaresDumpMode`` ability: the Pydantic handlers dump in
  Python mode for it, or hand it the model itself), so ``bytes`` fields
  stay ``bytes``; only what msgpack cannot carry is converted: the values
  above as ``to_plain`` does, ``timedelta`` as an ISO 8601 duration, map keys
  other than ``str`` / ``bytes`` as strings (msgpack readers refuse them), and
  other Pydantic types (URLs, IP addresses...) as in Pydantic's JSON mode. The
  model validates back equal from what this serializer reads.
- Integers must fit in 64 bits; unknown extension types are read as
  ``msgpack.ExtType``; nesting, lengths and sizes are bounded by msgpack's
  own limits (a header claiming more items than the payload holds is rejected).

Packing reuses one ``msgpack.Packer`` per thread (about 40% cheaper than
``msgpack.packb``, which builds a Packer per call; a Packer is not safe to
share between threads). Every failure is a ``SerializationError``.
"""

from __future__ import annotations

import sys
import threading
import weakref
from collections.abc import Callable
from datetime import date, datetime, time
from typing import Any

import msgpack  # type: ignore[import-untyped,unused-ignore]  # msgpack ships no type information

from volley.errors import SerializationError
from volley_serializers._plain import plain_tree, to_plain
from volley_serializers._pydantic_schema import NO_TREE, plain_tree_need

_plain_trees: weakref.WeakKeyDictionary[type, bool] = weakref.WeakKeyDictionary()
"""Per Pydantic class: whether its Python-mode dumps go through ``plain_tree`` (decided once from its schema)."""


def _needs_plain_tree(cls: type) -> bool:
    needed = _plain_trees.get(cls)
    if needed is None:
        schema = getattr(cls, "__pydantic_core_schema__", None) or {"type": "any"}
        needed = _plain_trees[cls] = plain_tree_need(schema) != NO_TREE
    return needed


_CLOCK_TYPES = (datetime, date, time)


def to_msgpack(value: Any) -> Any:
    """The Packer's ``default`` hook: what msgpack cannot pack as it is, in a form it can."""
    if isinstance(value, _CLOCK_TYPES):  # the most common first: a datetime in a model's dump
        return value.isoformat()
    cls = type(value)
    if hasattr(cls, "__pydantic_fields__") and hasattr(cls, "__pydantic_serializer__"):
        # A Pydantic model or dataclass: Python mode. (Pydantic's URL types have a serializer too, which dumps
        # them as themselves in Python mode: they take the JSON-mode way below.)
        dumped = cls.__pydantic_serializer__.to_python(value)
        return plain_tree(dumped) if _needs_plain_tree(cls) else dumped
    try:
        return to_plain(value)
    except TypeError:
        pydantic_core = sys.modules.get("pydantic_core")
        if pydantic_core is None:  # no Pydantic loaded: the value cannot be one of its types
            raise
        # A Pydantic type left in a Python-mode dump (a URL, an IP address...): its JSON-mode form.
        return pydantic_core.to_jsonable_python(value)


class _ThreadPacker(threading.local):
    """One Packer per thread, created on that thread's first use."""

    def __init__(self) -> None:
        self.pack: Callable[[Any], bytes] = msgpack.Packer(default=to_msgpack, use_bin_type=True).pack


_EXPLAINED = {"StackError": "nested too deeply", "ExtraData": "extra bytes after the first value"}


def _describe(exc: BaseException) -> str:
    name = type(exc).__name__
    text = str(exc) or _EXPLAINED.get(name, "")
    return f"{name}: {text}" if text else name


class MsgpackSerializer:
    """msgpack pack / unpack with errors turned into ``SerializationError``."""

    __slots__ = ("_local", "deserialize", "serialize", "unchecked_deserialize")

    dump_mode = "python"
    """``volley.ports.DeclaresDumpMode``: what a model handler should hand over is the model itself (or its
    Python-mode dump), not JSON-mode data."""

    serialize: Callable[[Any], bytes]
    deserialize: Callable[[bytes], Any]
    # The library's own function, for the engine: it classifies whatever this raises as a
    # SerializationError itself, so the wrapper's try/except would be paid twice per message.
    unchecked_deserialize: Callable[[bytes], Any]

    def __init__(self) -> None:
        unpackb = msgpack.unpackb
        local = self._local = _ThreadPacker()

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

    def unchecked_serialize(self, message: Any) -> bytes:
        """msgpack's own packing, errors as the library raises them: for the engine's fused encode, whose
        fallback explains failures."""
        return self._local.pack(message)

    def __repr__(self) -> str:
        return "MsgpackSerializer()"
