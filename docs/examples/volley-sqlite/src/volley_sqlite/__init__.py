"""A Volley connector whose queues live in a SQLite database file, registered as
``sqlite``."""

from volley_sqlite.connector import (
    SqliteConnector,
    SqliteConsumer,
    SqliteProducer,
    SqliteSettings,
)

__all__ = ["SqliteConnector", "SqliteConsumer", "SqliteProducer", "SqliteSettings"]
