"""Secrets in connector settings kept out of text: reprs, tracebacks with locals, error trackers, log lines.

The settings themselves are passed on untouched (the broker's client still gets the real values); only what
prints them goes through here. One rule for every distribution, so that volley-core's queue objects and an
adapter's own settings objects hide the same keys.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

SECRET_WORDS = ("password", "secret", "token", "ssl.key.pem", "ssl_key")
"""A setting whose name contains one of these (any case) is a secret: sasl.password, ssl.key.password,
sasl.oauthbearer.client.secret, KAFKA_SECRET, a redis password, an auth token, a PEM private key."""

REDACTED = "[redacted]"


def is_secret(key: object) -> bool:
    name = str(key).lower()
    return any(word in name for word in SECRET_WORDS)


def redacted(config: Mapping[Any, Any]) -> dict[Any, Any]:
    """``config`` with the values of its secrets replaced, nested mappings included, for text."""
    return {key: REDACTED if is_secret(key) else redacted(value) if isinstance(value, Mapping) else value
            for key, value in config.items()}


def redacted_repr(instance: Any) -> str:
    """A dataclass instance's repr, as the dataclass would write it, with its secrets replaced (a field named
    like one, and the secrets of its mapping fields): the setting is named, its value is not shown."""
    fields = ", ".join(
        f"{field.name}={_shown(field.name, getattr(instance, field.name))!r}"
        for field in dataclasses.fields(instance) if field.repr)
    return f"{type(instance).__qualname__}({fields})"


def _shown(name: str, value: Any) -> Any:
    if value is not None and is_secret(name):
        return REDACTED
    return redacted(value) if isinstance(value, Mapping) else value
