"""The ``default=`` hook of the orjson and msgpack serializers: common Python values they cannot encode natively.

It only runs for values the library does not know, so it costs nothing on the
usual path. It converts the way Pydantic's JSON mode does for the same types
(so a raw dict holding a ``Decimal`` and a model holding one look alike on the
wire) and refuses anything else: an unknown object must fail loudly, not turn
into ``"<object at 0x...>"`` as a ``default=str`` would make it.
"""

from __future__ import annotations

import dataclasses
import enum
from datetime import date, datetime, time, timedelta
from decimal import Decimal
from pathlib import PurePath
from typing import Any
from uuid import UUID


def to_plain(value: Any) -> Any:
    """Turn ``value`` into something JSON and msgpack can hold; raise ``TypeError`` for anything unknown."""
    if isinstance(value, (datetime, date, time)):
        return value.isoformat()
    if isinstance(value, (Decimal, UUID, PurePath)):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if isinstance(value, (set, frozenset)):
        return list(value)
    if isinstance(value, timedelta):
        return value.total_seconds()
    model_dump = getattr(value, "model_dump", None)
    if callable(model_dump):  # a Pydantic model inside a plain dict
        return model_dump(mode="json")
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    if isinstance(value, int):  # msgpack asks about the integers it cannot pack
        raise OverflowError(f"integer out of range ({value.bit_length()} bits): at most 64 bits are supported")
    raise TypeError(f"Type is not serializable: {type(value).__qualname__}")


def plain_tree(value: Any) -> Any:
    """A Pydantic Python-mode dump made safe for msgpack readers: map keys that are not ``str`` or ``bytes``
    become strings (as in JSON mode: ``1`` -> ``"1"``), ``timedelta`` becomes Pydantic's ISO 8601 duration
    (exact, where float seconds round). Everything else is left to the serializer's ``default`` hook."""
    if isinstance(value, dict):
        return {key if isinstance(key, (str, bytes)) else _plain_key(key): plain_tree(item)
                for key, item in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [plain_tree(item) for item in value]
    if isinstance(value, timedelta):
        from pydantic_core import to_jsonable_python  # only reached while dumping a Pydantic model

        return to_jsonable_python(value)
    return value


def _plain_key(key: Any) -> str:
    if isinstance(key, bool):
        return "true" if key else "false"
    if key is None:
        return "null"
    if isinstance(key, (int, float)):
        return str(key)
    plain = plain_tree(key) if isinstance(key, timedelta) else to_plain(key)
    return plain if isinstance(plain, str) else str(plain)
