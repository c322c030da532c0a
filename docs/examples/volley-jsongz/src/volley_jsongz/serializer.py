"""JSON, gzip-compressed: for large, repetitive payloads where broker storage and
bandwidth cost more than CPU."""

from __future__ import annotations

import gzip
import json
import zlib
from typing import Any

from volley.errors import SerializationError

MAX_DECOMPRESSED_BYTES = 64 * 1024 * 1024
"""A small, hostile message must not expand into gigabytes in the worker (a "zip
bomb")."""


class GzipJsonSerializer:
    """Compact UTF-8 JSON in a gzip member. Built once per queue by Volley, so it may
    hold reusable state."""

    def __init__(self, level: int = 6, max_size: int = MAX_DECOMPRESSED_BYTES) -> None:
        self._level = level
        self._max_size = max_size
        self._encoder = json.JSONEncoder(
            separators=(",", ":"), ensure_ascii=False, allow_nan=False
        )

    def serialize(self, message: Any) -> bytes:
        try:
            text = self._encoder.encode(message)
        except (TypeError, ValueError) as exc:
            raise SerializationError(
                f"cannot encode {type(message).__name__} as JSON: {exc}", message
            ) from exc
        # mtime=0: equal messages give equal bytes, which keeps compaction and
        # deduplication working.
        return gzip.compress(text.encode(), compresslevel=self._level, mtime=0)

    def deserialize(self, message: bytes) -> Any:
        # 16: expect a gzip header
        inflater = zlib.decompressobj(wbits=zlib.MAX_WBITS | 16)
        try:
            data = inflater.decompress(message, self._max_size)
        except zlib.error as exc:
            raise SerializationError(f"not gzip data: {exc}", message) from exc
        if inflater.unconsumed_tail:
            raise SerializationError(
                f"decompresses to more than {self._max_size} bytes", message
            )
        if not inflater.eof:
            raise SerializationError("truncated gzip data", message)
        try:
            return json.loads(data)
        except (ValueError, RecursionError) as exc:
            raise SerializationError(
                f"invalid JSON inside gzip: {exc}", message
            ) from exc
