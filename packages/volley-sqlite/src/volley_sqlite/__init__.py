"""Volley's SQLite connector: a durable embedded broker in one file, no server.

Install the distribution and the ``sqlite*`` profiles exist. See
``settings`` for the queue ``config`` keys, ``schema`` for the table layout
and the meaning of ready / held / delayed rows, ``database`` for how work
reaches SQLite (one thread per file, group commit), and the docs page
``connectors/sqlite.md`` for the guarantees.
"""

from volley_sqlite.connector import SqliteConnector, SqliteConsumer, SqliteProducer
from volley_sqlite.settings import DEFAULT_PATH, PATH_ENV, SqliteSettings, parse_settings

__all__ = [
    "DEFAULT_PATH",
    "PATH_ENV",
    "SqliteConnector",
    "SqliteConsumer",
    "SqliteProducer",
    "SqliteSettings",
    "parse_settings",
]
