"""How a message's key and headers travel on RSMQ, which only stores a body: a small JSON document.

With ``headers: envelope`` (the default of a dead-letter queue, and of the
``rsmq-dlq`` profile) a producer stores every message as::

    {"volley-envelope": 1,
     "payload": "<the original bytes, as UTF-8 text>",      # or "payload_base64" when not UTF-8
     "key": "<key>",                                         # only when there is a key ("key_base64" likewise)
     "headers": {"volley-error-stage": "handler", ...},      # values that are UTF-8 text
     "headers_base64": {"name": "<base64>"}}                 # only for header values that are not UTF-8

so that anyone can read a dead letter with ``redis-cli`` or PyRSMQ: the raw
payload, why it failed, where it came from. A consumer with ``headers:
envelope`` unwraps such documents back into value, key and headers (a body
that is not an envelope passes through as it is), so dead letters can be
replayed through Volley unchanged. With ``headers: drop`` (every other queue)
the body is the payload alone, as py-volley wrote it.
"""

from __future__ import annotations

import base64
import json
from typing import Any

MARKER = "volley-envelope"
_PREFIX = b'{"' + MARKER.encode() + b'":'


def _text_or_base64(document: dict[str, Any], name: str, value: bytes) -> None:
    try:
        document[name] = value.decode()
    except UnicodeDecodeError:
        document[name + "_base64"] = base64.b64encode(value).decode("ascii")


def wrap(value: bytes, key: bytes | None, headers: dict[str, bytes] | None) -> bytes:
    """The JSON envelope of one message."""
    document: dict[str, Any] = {MARKER: 1}
    _text_or_base64(document, "payload", value)
    if key is not None:
        _text_or_base64(document, "key", key)
    if headers:
        text: dict[str, str] = {}
        binary: dict[str, str] = {}
        for name, raw in headers.items():
            data = raw if isinstance(raw, bytes) else str(raw).encode()
            try:
                text[name] = data.decode()
            except UnicodeDecodeError:
                binary[name] = base64.b64encode(data).decode("ascii")
        document["headers"] = text
        if binary:
            document["headers_base64"] = binary
    try:
        return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:  # a header name that is not UTF-8 (a lone surrogate): escaped, as JSON allows
        return json.dumps(document, separators=(",", ":")).encode()


def _field(document: dict[str, Any], name: str) -> bytes | None:
    if isinstance(document.get(name), str):
        return str(document[name]).encode()
    if isinstance(document.get(name + "_base64"), str):
        return base64.b64decode(document[name + "_base64"], validate=True)
    return None


def unwrap(body: bytes) -> tuple[bytes, bytes | None, dict[str, bytes] | None]:
    """Value, key and headers of a stored body: the envelope's contents, or the body itself if it is none."""
    if not body.startswith(_PREFIX):
        return body, None, None
    try:
        document = json.loads(body)
        value = _field(document, "payload")
        if not isinstance(document, dict) or value is None:
            return body, None, None
        headers: dict[str, bytes] = {}
        for name, text in (document.get("headers") or {}).items():
            headers[str(name)] = str(text).encode()
        for name, encoded in (document.get("headers_base64") or {}).items():
            headers[str(name)] = base64.b64decode(str(encoded), validate=True)
        return value, _field(document, "key"), headers or None
    except Exception:  # not an envelope after all (bad JSON or base64, nested too deep): this runs after the
        return body, None, None  # receive hid the batch, so nothing may escape from here and lose the batch
