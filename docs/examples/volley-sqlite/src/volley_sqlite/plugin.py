"""volley-sqlite's plugin module: the one the ``volley`` entry point names."""

from __future__ import annotations

from volley.plugins import Register, hookimpl
from volley_sqlite.connector import SqliteConnector


@hookimpl
def volley_register_connectors(register: Register) -> None:
    register("sqlite", SqliteConnector())


@hookimpl
def volley_register_profiles(register: Register) -> None:
    # Only volley-core's parts, so the profiles work wherever the connector does.
    register(
        "sqlite",
        {
            "connector": "sqlite",
            "serializer": "json",
            "model_handler": "dataclass",
            "data_model": dict,
        },
    )
    register(
        "sqlite-dlq",
        {
            "connector": "sqlite",
            "serializer": "none",
            "model_handler": "none",
            "data_model": None,
        },
    )
