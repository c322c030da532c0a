"""Blocking tools on a queue database, for scripts, tests and the command line (``python -m volley_sqlite``).

They open a connection of their own for each call: safe to use while workers
run on the same file (WAL lets readers and one writer work side by side).
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from volley.message import Headers, OutgoingMessage
from volley_sqlite import schema
from volley_sqlite.settings import DEFAULT_PATH, PATH_ENV


def default_path() -> str:
    """Where queues live when nothing says otherwise: ``$VOLLEY_SQLITE_PATH``, else ``volley.sqlite3``."""
    return os.environ.get(PATH_ENV) or DEFAULT_PATH


@contextlib.contextmanager
def connection(path: str | os.PathLike[str] | None = None, synchronous: str = "full") -> Iterator[sqlite3.Connection]:
    db = schema.connect(os.fspath(path or default_path()), synchronous)
    try:
        yield db
    finally:
        db.close()


def publish(path: str | os.PathLike[str] | None, queue: str, values: Iterable[bytes], *, key: bytes | None = None,
            headers: Headers | None = None, delay: float = 0.0, partitions: int = 4) -> int:
    """Append messages to ``queue`` in one transaction (creating the queue with ``partitions``); return how many."""
    with connection(path) as db:
        db.execute("BEGIN IMMEDIATE")
        try:
            count = schema.ensure_queue(db, queue, partitions)
            now = time.time()
            offset = schema.last_id(db)  # one message per call still goes round the partitions
            rows = []
            for index, value in enumerate(values):
                partition = schema.partition_for(key, count) if key is not None else (offset + index) % count
                rows.append(schema.row_for(OutgoingMessage(queue, value, key, headers, delay=delay), partition, now,
                                           0.0))
            schema.insert(db, rows)
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")
        return len(rows)


@dataclass(frozen=True, slots=True)
class StoredMessage:
    """A row as stored, for inspection: it is not leased by reading it."""

    id: int
    queue: str
    partition: int
    value: bytes
    key: bytes | None
    headers: Headers | None
    attempts: int
    acked: bool


def messages(path: str | os.PathLike[str] | None, queue: str, *, include_acked: bool = True) -> list[StoredMessage]:
    """Every row of ``queue`` in production order (acked ones only while retained)."""
    with connection(path) as db:
        rows = db.execute("SELECT id, queue, partition, value, key, headers, attempts, acked_at IS NOT NULL "
                          "FROM volley_messages WHERE queue = ? ORDER BY id", (queue,)).fetchall()
    out = [StoredMessage(r[0], r[1], r[2], r[3], r[4], schema.decode_headers(r[5]), r[6], bool(r[7])) for r in rows]
    return out if include_acked else [m for m in out if not m.acked]


def values(path: str | os.PathLike[str] | None, queue: str) -> list[bytes]:
    """The values of ``queue``'s rows in production order (pending ones, and acked ones while retained)."""
    return [m.value for m in messages(path, queue)]


def stats(path: str | os.PathLike[str] | None = None) -> dict[str, dict[str, int]]:
    """Per queue: rows ready, delayed, held by a consumer, and acked (kept for their retention period)."""
    with connection(path) as db:
        return schema.stats(db)


def compact(path: str | os.PathLike[str] | None = None, retention_seconds: float = 0.0) -> int:
    """Delete acked rows older than ``retention_seconds`` in every queue, return free pages, truncate the WAL."""
    with connection(path) as db:
        deleted = schema.compact(db, None, retention_seconds, vacuum_pages=1 << 30)
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        return deleted
