"""Volley-sqlite's plugin: the ``sqlite`` connector and the ``sqlite*`` profiles.

``sqlite`` and ``sqlite-dlq`` use only volley-core's codecs (stdlib json), so
they work wherever the connector does. The ``sqlite-*-pydantic`` profiles are
the ``rsmq*`` / ``confluent*`` ones on this connector: they name serializers
and model handlers of volley-serializers (``pip install 'volley-sqlite[pydantic]'``);
without it, an Engine that uses one fails when it is built with the name of
the missing part and the ``pip install`` that provides it.
"""

from __future__ import annotations

from volley.plugins import Register, hookimpl
from volley_sqlite.connector import SqliteConnector

GENERIC_MESSAGE = "volley_serializers.models.GenericMessage"

PROFILES: dict[str, dict[str, object]] = {
    "sqlite": {"connector": "sqlite", "serializer": "json", "model_handler": "dataclass", "data_model": dict},
    "sqlite-pydantic": {
        "connector": "sqlite",
        "serializer": "none",
        "model_handler": "pydantic-parser",
        "data_model": GENERIC_MESSAGE,
    },
    "sqlite-orjson-pydantic": {
        "connector": "sqlite",
        "serializer": "orjson",
        "model_handler": "pydantic",
        "data_model": GENERIC_MESSAGE,
    },
    "sqlite-msgpack-pydantic": {
        "connector": "sqlite",
        "serializer": "msgpack",
        "model_handler": "pydantic",
        "data_model": GENERIC_MESSAGE,
    },
    # Raw payload; key and headers (the DLQ's error details) are columns of their own, so nothing is wrapped.
    "sqlite-dlq": {"connector": "sqlite", "serializer": "none", "model_handler": "none", "data_model": None},
}


@hookimpl
def volley_register_connectors(register: Register) -> None:
    register("sqlite", SqliteConnector())


@hookimpl
def volley_register_profiles(register: Register) -> None:
    for name, settings in PROFILES.items():
        register(name, settings)
