"""Volley-rsmq's plugin: the ``rsmq`` connector and the ``rsmq*`` profiles of py-volley.

The serializers and model handlers the profiles name (orjson, msgpack,
pydantic, pydantic-parser) come from volley-serializers, a dependency of this
distribution.
"""

from __future__ import annotations

from volley.plugins import Register, hookimpl
from volley_rsmq.connector import RsmqConnector

GENERIC_MESSAGE = "volley_serializers.models.GenericMessage"

PROFILES: dict[str, dict[str, object]] = {
    "rsmq": {"connector": "rsmq", "serializer": "orjson", "model_handler": "pydantic", "data_model": GENERIC_MESSAGE},
    "rsmq-pydantic": {
        "connector": "rsmq",
        "serializer": "none",
        "model_handler": "pydantic-parser",
        "data_model": GENERIC_MESSAGE,
    },
    "rsmq-orjson-pydantic": {
        "connector": "rsmq",
        "serializer": "orjson",
        "model_handler": "pydantic",
        "data_model": GENERIC_MESSAGE,
    },
    "rsmq-msgpack-pydantic": {
        "connector": "rsmq",
        "serializer": "msgpack",
        "model_handler": "pydantic",
        "data_model": GENERIC_MESSAGE,
    },
    # Raw payload; key and headers (the DLQ's error details) travel in a JSON envelope: see volley_rsmq.envelope.
    "rsmq-dlq": {
        "connector": "rsmq",
        "serializer": "none",
        "model_handler": "none",
        "data_model": None,
        "config": {"headers": "envelope"},
    },
}


@hookimpl
def volley_register_connectors(register: Register) -> None:
    register("rsmq", RsmqConnector())


@hookimpl
def volley_register_profiles(register: Register) -> None:
    for name, settings in PROFILES.items():
        register(name, settings)
