"""The queues' table and the statements on it. Blocking: the connector calls it on a
worker thread.

One table holds every queue. A message is visible when ``visible_at`` has
passed. Receiving one hides it for a lease and gives it a new ``receipt``; it
is acknowledged by deleting it, given back by making it visible again. Both
name the receipt, so a consumer whose lease expired (and whose message went to
another consumer since) cannot settle the other consumer's delivery.
"""

from __future__ import annotations

import base64
import json
import sqlite3
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from volley.message import Headers, OutgoingMessage

SCHEMA = """
CREATE TABLE IF NOT EXISTS volley_messages (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,  -- production order
    queue      TEXT    NOT NULL,
    value      BLOB    NOT NULL,
    key        BLOB,
    headers    TEXT,                               -- JSON {name: base64 value}, or NULL
    created_at REAL    NOT NULL,
    visible_at REAL    NOT NULL,
    receipt    TEXT,                               -- the current delivery, or NULL
    attempts   INTEGER NOT NULL DEFAULT 0          -- deliveries so far
);
CREATE INDEX IF NOT EXISTS volley_messages_ready ON volley_messages (queue, visible_at,
id);
"""


@dataclass(frozen=True, slots=True)
class Received:
    id: int
    value: bytes
    key: bytes | None
    headers: Headers | None
    created_at: float
    attempt: int
    receipt: str


def _encode_headers(headers: Headers | None) -> str | None:
    if not headers:
        return None
    return json.dumps(
        {
            name: base64.b64encode(value).decode("ascii")
            for name, value in headers.items()
        }
    )


def _decode_headers(text: str | None) -> Headers | None:
    if text is None:
        return None
    return {name: base64.b64decode(value) for name, value in json.loads(text).items()}


class Store:
    """One SQLite connection. Not thread-safe: each consumer and producer keeps one on
    its own thread."""

    def __init__(self, path: str, busy_timeout: float) -> None:
        # isolation_level=None: no implicit transactions; the statements below say where
        # they begin and end.
        self._db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
        # readers do not block the writer, and the other way round
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.executescript(SCHEMA)

    def close(self) -> None:
        self._db.close()

    def insert(self, messages: Sequence[OutgoingMessage], default_delay: float) -> None:
        now = time.time()
        self._write(
            "INSERT INTO volley_messages"
            " (queue, value, key, headers, created_at, visible_at)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            [
                (
                    m.topic,
                    m.value,
                    m.key,
                    _encode_headers(m.headers),
                    now,
                    now + (m.delay if m.delay is not None else default_delay),
                )
                for m in messages
            ],
        )

    def receive(self, queue: str, limit: int, lease_seconds: float) -> list[Received]:
        """Take up to ``limit`` visible messages, oldest first, and hide them for the
        lease."""
        now = time.time()
        receipt = uuid.uuid4().hex
        # the write lock first: two consumers never take the same message
        self._db.execute("BEGIN IMMEDIATE")
        try:
            rows = self._db.execute(
                "SELECT id, value, key, headers, created_at, attempts"
                " FROM volley_messages WHERE queue = ? AND visible_at <= ?"
                " ORDER BY id LIMIT ?",
                (queue, now, limit),
            ).fetchall()
            self._db.executemany(
                "UPDATE volley_messages"
                " SET visible_at = ?, receipt = ?, attempts = attempts + 1"
                " WHERE id = ?",
                [(now + lease_seconds, receipt, row[0]) for row in rows],
            )
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")
        return [
            Received(
                row[0],
                row[1],
                row[2],
                _decode_headers(row[3]),
                row[4],
                row[5] + 1,
                receipt,
            )
            for row in rows
        ]

    def delete(self, deliveries: Sequence[tuple[int, str]]) -> None:
        self._write(
            "DELETE FROM volley_messages WHERE id = ? AND receipt = ?", deliveries
        )

    def release(self, deliveries: Sequence[tuple[int, str]], delay: float) -> None:
        visible_at = time.time() + delay
        self._write(
            "UPDATE volley_messages SET visible_at = ?, receipt = NULL"
            " WHERE id = ? AND receipt = ?",
            [(visible_at, message_id, receipt) for message_id, receipt in deliveries],
        )

    def _write(self, statement: str, rows: Sequence[tuple[object, ...]]) -> None:
        """Run one statement for many rows in one transaction: one fsync for the whole
        batch."""
        self._db.execute("BEGIN IMMEDIATE")
        try:
            self._db.executemany(statement, rows)
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    def depth(self, queue: str) -> int:
        row = self._db.execute(
            "SELECT count(*) FROM volley_messages WHERE queue = ? AND visible_at <= ?",
            (queue, time.time()),
        ).fetchone()
        return int(row[0])
