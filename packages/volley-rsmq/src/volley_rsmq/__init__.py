"""Volley's RSMQ connector: Redis Simple Message Queue, wire-compatible with PyRSMQ and py-volley.

Install the distribution and the ``rsmq*`` profiles exist; see ``settings``
for the queue ``config`` keys, ``consumer`` for the acknowledgement and
visibility-timeout policy, ``envelope`` for how dead letters keep their
error headers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from volley_rsmq.connector import RsmqConnector
from volley_rsmq.settings import RsmqSettings, parse_settings

if TYPE_CHECKING:
    from volley_rsmq.client import RsmqClient
    from volley_rsmq.consumer import LAST_ERROR_HEADER, RsmqConsumer
    from volley_rsmq.producer import RsmqProducer

# Imported when first asked for: they import redis-py and PyRSMQ, which an app without RSMQ queues never needs
# (the plugin registry imports this package in every app and every volley command).
_LAZY = {"RsmqClient": "volley_rsmq.client", "LAST_ERROR_HEADER": "volley_rsmq.consumer",
         "RsmqConsumer": "volley_rsmq.consumer", "RsmqProducer": "volley_rsmq.producer"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'volley_rsmq' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


__all__ = [
    "LAST_ERROR_HEADER",
    "RsmqClient",
    "RsmqConnector",
    "RsmqConsumer",
    "RsmqProducer",
    "RsmqSettings",
    "parse_settings",
]
