"""The serializers and model handlers that need nothing beyond the standard library.

They make volley-core usable on its own (the demo, unit tests of handlers);
faster and stricter ones (orjson, msgpack, Pydantic) come from volley-serializers.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from volley.errors import DataValidationError, SerializationError


class JsonSerializer:
    """Standard-library JSON, compact, UTF-8."""

    def __init__(self) -> None:
        self._encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        # JSON has no NaN or infinities: Python's json reads NaN and Infinity unless told not to. (A number too
        # large for a double, 1e400, still reads as infinity: refusing it would cost a call per number.)
        self._decode = json.JSONDecoder(parse_constant=_refuse_constant).decode

    def serialize(self, message: Any) -> bytes:
        try:
            return self._encoder.encode(message).encode()
        except (TypeError, ValueError, RecursionError) as exc:
            raise SerializationError(f"cannot encode {type(message).__name__} as JSON: {exc}", message) from exc

    def deserialize(self, message: bytes) -> Any:
        try:
            raw: Any = message  # bytes on the per-message path; text too, as json.loads reads both
            if not isinstance(raw, str):  # as json.loads reads bytes: UTF-8, -16 or -32
                raw = bytes(raw).decode(json.detect_encoding(raw), "surrogatepass")
            return self._decode(raw)
        except (ValueError, TypeError, RecursionError) as exc:
            raise SerializationError(f"invalid JSON: {exc}", message) from exc


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON (JSON has no NaN or infinities)")


class RawSerializer:
    """No serialization: bytes in, bytes out (``serializer: none``). Text is encoded as UTF-8 on the way out."""

    def serialize(self, message: Any) -> bytes:
        if isinstance(message, bytes):
            return message
        if isinstance(message, (bytearray, memoryview)):
            return bytes(message)
        if isinstance(message, str):
            return message.encode()
        raise SerializationError(
            f"queue has no serializer, so outputs must be bytes or str, got {type(message).__name__}", message
        )

    def deserialize(self, message: bytes) -> Any:
        return message


class DataclassModelHandler:
    """Dict to dataclass (or to dict, when the data model is ``dict``) and back, with the standard library.

    Field presence is checked; field types are not (the standard library has
    no validator; use the Pydantic handlers from volley-serializers for that).
    """

    def construct(self, message: Any, schema: Any) -> Any:
        if schema is None or schema is dict or schema is Any:
            if schema is dict and not isinstance(message, dict):
                raise DataValidationError(f"expected a JSON object, got {type(message).__name__}", message)
            return message
        if not isinstance(message, dict):
            raise DataValidationError(
                f"{getattr(schema, '__name__', schema)} needs a JSON object, got {type(message).__name__}", message
            )
        if isinstance(schema, type) and dataclasses.is_dataclass(schema):
            names = {f.name for f in dataclasses.fields(schema)}
            unknown = set(message) - names
            if unknown:
                raise DataValidationError(f"{schema.__name__} has no field(s) {sorted(unknown)}", message)
        try:
            return schema(**message)
        except TypeError as exc:
            raise DataValidationError(f"{getattr(schema, '__name__', schema)}: {exc}", message) from exc

    def deconstruct(self, model: Any) -> Any:
        if dataclasses.is_dataclass(model) and not isinstance(model, type):
            return dataclasses.asdict(model)
        return model


class PassThroughModelHandler:
    """No data model: the handler gets what the serializer produced (``model_handler: none``)."""

    def construct(self, message: Any, schema: Any) -> Any:
        return message

    def deconstruct(self, model: Any) -> Any:
        return model
