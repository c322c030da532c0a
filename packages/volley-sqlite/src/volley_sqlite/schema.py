"""The tables and every statement on them. Blocking: only the database thread (or a tool) calls these.

One file holds many queues. ``volley_messages`` has one row per message not
yet compacted; a row is

- *ready* when ``acked_at IS NULL AND visible_at <= now``,
- *held* by a consumer when ``owner`` names it and ``visible_at > now`` (its
  lease; the heartbeat pushes ``visible_at`` forward while the consumer lives),
- *delayed* when ``owner IS NULL AND visible_at > now`` (delayed delivery, or a
  nack with a delay),
- *acked* when ``acked_at`` is set (kept only with a retention period).

``attempts`` is raised each time a row is handed out, so it survives restarts
and counts deliveries to consumers that died. ``volley_consumers`` lists live
consumers (renewed by the heartbeat) so that ordered queues can share their
partitions out fairly, and the dead ones while they own rows: what a consumer
held when it died is handed out one message at a time (``recovery``).
"""

from __future__ import annotations

import math
import operator
import sqlite3
import struct
import time
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from volley.message import Envelope, Headers, OutgoingMessage
from volley_sqlite import recovery

SCHEMA_VERSION = 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS volley_queues (
    name       TEXT PRIMARY KEY,
    partitions INTEGER NOT NULL,
    created_at REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS volley_messages (
    id          INTEGER PRIMARY KEY AUTOINCREMENT,  -- production order, never reused
    queue       TEXT    NOT NULL,
    partition   INTEGER NOT NULL,
    value       BLOB    NOT NULL,
    key         BLOB,
    headers     BLOB,
    created_at  REAL    NOT NULL,
    visible_at  REAL    NOT NULL,
    owner       TEXT,                -- the consumer that received it last (its lease runs until visible_at)
    attempts    INTEGER NOT NULL DEFAULT 0,
    acked_at    REAL
);
CREATE INDEX IF NOT EXISTS volley_messages_pending ON volley_messages (queue, id) WHERE acked_at IS NULL;
CREATE INDEX IF NOT EXISTS volley_messages_owner ON volley_messages (owner) WHERE owner IS NOT NULL;
CREATE INDEX IF NOT EXISTS volley_messages_acked ON volley_messages (queue, acked_at) WHERE acked_at IS NOT NULL;
-- What is ready in a partition: the probes, and takes while few rows are ready. Files made before it get it here.
CREATE INDEX IF NOT EXISTS volley_messages_ready ON volley_messages (queue, partition, visible_at)
    WHERE acked_at IS NULL;
CREATE TABLE IF NOT EXISTS volley_consumers (
    queue       TEXT NOT NULL,
    owner       TEXT NOT NULL,
    alive_until REAL NOT NULL,
    PRIMARY KEY (queue, owner)
) WITHOUT ROWID;
"""


def connect(path: str, synchronous: str = "full", busy_timeout: float = 30.0) -> sqlite3.Connection:
    """Open (and on first use create) a queue database: WAL, the given durability, the tables."""
    # isolation_level=None: no implicit transactions; the callers say where each begins and ends.
    db = sqlite3.connect(path, timeout=busy_timeout, isolation_level=None)
    try:
        db.execute("PRAGMA auto_vacuum = INCREMENTAL")  # takes effect only on a new file, before any table
        mode = db.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise sqlite3.OperationalError(f"{path!r} cannot use write-ahead logging (journal_mode is {mode})")
        db.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        db.execute("PRAGMA journal_size_limit = 2097152")  # a checkpointed WAL is cut back to 2 MiB
        # In one write transaction, so that processes opening a new file at once do not trip over each other.
        db.executescript(f"BEGIN IMMEDIATE;\n{SCHEMA}\nCOMMIT;")
    except BaseException:
        db.close()
        raise
    return db


# ---------------------------------------------------------------------------------------------- headers

_LENGTHS = struct.Struct(">HI")


def encode_headers(headers: Headers | None) -> bytes | None:
    """Length-prefixed names and values: compact, binary-safe, and no JSON on the hot path."""
    if not headers:
        return None
    parts: list[bytes] = []
    for name, value in headers.items():
        raw_name = name.encode()
        raw_value = bytes(value)
        parts += (_LENGTHS.pack(len(raw_name), len(raw_value)), raw_name, raw_value)
    return b"".join(parts)


def decode_headers(data: bytes | None) -> Headers | None:
    if data is None:
        return None
    headers: Headers = {}
    offset, size = 0, _LENGTHS.size
    while offset < len(data):
        name_length, value_length = _LENGTHS.unpack_from(data, offset)
        offset += size
        name = data[offset:offset + name_length].decode()
        offset += name_length
        headers[name] = data[offset:offset + value_length]
        offset += value_length
    return headers


# ---------------------------------------------------------------------------------------------- queues


def ensure_queue(db: sqlite3.Connection, queue: str, partitions: int) -> int:
    """Create the queue with ``partitions`` partitions unless it exists; return its partition count."""
    db.execute("INSERT OR IGNORE INTO volley_queues (name, partitions, created_at) VALUES (?, ?, ?)",
               (queue, partitions, time.time()))
    row = db.execute("SELECT partitions FROM volley_queues WHERE name = ?", (queue,)).fetchone()
    return int(row[0])


def partition_for(key: bytes, count: int) -> int:
    """Same as the memory broker: a key always lands in the same partition."""
    return zlib.crc32(key) % count


# ---------------------------------------------------------------------------------------------- producing

_INSERT = ("INSERT INTO volley_messages (queue, partition, value, key, headers, created_at, visible_at) "
           "VALUES (?, ?, ?, ?, ?, ?, ?)")


def _marks(count: int) -> str:
    """``?,?,?``: placeholders for an ``IN (...)`` list; only the number of them is built into the statement."""
    return ",".join("?" * count)


def insert(db: sqlite3.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    db.executemany(_INSERT, rows)


def row_for(message: OutgoingMessage, partition: int, now: float, default_delay: float) -> tuple[Any, ...]:
    delay = message.delay if message.delay is not None else default_delay
    return (message.topic, partition, message.value, message.key, encode_headers(message.headers), now,
            now + delay if delay > 0 else now)


# ---------------------------------------------------------------------------------------------- consuming

_READY_IN = ("FROM volley_messages INDEXED BY volley_messages_ready WHERE queue = ? AND acked_at IS NULL "
             "AND visible_at <= ? AND partition IN ")


def _ready(db: sqlite3.Connection, queue: str, partitions: Sequence[int], now: float, limit: int) -> list[int]:
    """Up to ``limit`` ids of rows ready in these partitions, in no particular order: a seek per partition in the
    ready index (which holds ids), whatever the backlog."""
    sql = f"SELECT id {_READY_IN}({_marks(len(partitions))}) LIMIT ?"
    return [row[0] for row in db.execute(sql, (queue, now, *partitions, limit))]


def _held_by_others(db: sqlite3.Connection, queue: str, owner: str, now: float) -> set[int]:
    """The partitions in which another consumer holds a message (read through the index of held rows: as many rows
    as are in flight, not the backlog)."""
    return {row[0] for row in db.execute(
        "SELECT DISTINCT partition FROM volley_messages INDEXED BY volley_messages_owner WHERE owner IS NOT NULL "
        "AND owner != ? AND queue = ? AND visible_at > ? AND acked_at IS NULL", (owner, queue, now))}


def anything_ready(db: sqlite3.Connection, queue: str, partitions: int, owner: str | None = None) -> bool:
    """A read outside any transaction. With ``owner`` (ordered queues): ready in a partition no other consumer holds."""
    now = time.time()
    candidates: Sequence[int] = range(partitions)
    if owner is not None:
        theirs = _held_by_others(db, queue, owner, now)
        candidates = [p for p in candidates if p not in theirs]
    return bool(candidates) and bool(_ready(db, queue, candidates, now, 1))


_REGISTER = "INSERT OR REPLACE INTO volley_consumers (queue, owner, alive_until) VALUES (?, ?, ?)"
_REGISTER_IF_NEW = "INSERT OR IGNORE INTO volley_consumers (queue, owner, alive_until) VALUES (?, ?, ?)"


def _allowed_partitions(db: sqlite3.Connection, queue: str, owner: str, partitions: int, lease: float,
                        now: float, heartbeat: bool) -> list[int] | None:
    """For an ordered queue: the partitions this consumer may take from now (None: all of them).

    A partition in which another consumer holds a message is not available:
    its messages are handed out in order, by one consumer at a time. Beyond
    that each live consumer takes at most its fair share, and stops taking
    from partitions above its share so that they drain and pass to others.

    A consumer without heartbeat says it is alive with each take. One with a heartbeat is registered by it alone:
    its registration must not outlive the leases the heartbeat renewed, or rows of a consumer that died would
    look ready while it still looked alive, and be handed out in a batch rather than one at a time (recovery).
    """
    db.execute(_REGISTER_IF_NEW if heartbeat else _REGISTER, (queue, owner, now + lease))
    others = db.execute("SELECT count(*) FROM volley_consumers WHERE queue = ? AND owner != ? AND alive_until > ?",
                        (queue, owner, now)).fetchone()[0]
    held = db.execute("SELECT DISTINCT partition, owner = ? FROM volley_messages INDEXED BY volley_messages_owner "
                      "WHERE owner IS NOT NULL AND queue = ? AND visible_at > ? AND acked_at IS NULL",
                      (owner, queue, now)).fetchall()
    theirs = {p for p, mine in held if not mine}
    if not others and not theirs:
        return None
    mine = sorted({p for p, is_mine in held if is_mine} - theirs)
    share = math.ceil(partitions / (others + 1))
    keep = mine[:share]
    allowed = list(keep)
    if len(allowed) < share:
        for partition in range(partitions):
            if len(allowed) >= share:
                break
            if partition in theirs or partition in mine:
                continue
            if _ready(db, queue, (partition,), now, 1):
                allowed.append(partition)
    return allowed


_first = operator.itemgetter(0)
_COLUMNS = "SELECT id, partition, value, key, headers, created_at, attempts FROM volley_messages "


def _oldest_ready(db: sqlite3.Connection, queue: str, owner: str, limit: int, partitions: Sequence[int],
                  only_these: bool, now: float) -> list[Any]:
    """The ``limit`` oldest ready rows of these partitions (by id: production order), not our own lapsed ones.

    No single index gives both "ready now" and "oldest first". While at most ``limit`` rows are ready (an idle or
    keeping-up consumer, however many rows are delayed or held), the ready index finds every one of them. With more
    ready than that (a backlog to work through), the oldest are at the front of the pending index, which is read
    in id order past the rows not ready (held: what is in flight; delayed: only those older than the backlog).
    ``only_these``: the partitions are a choice (ordered queues), not simply all of them. Never our own lapsed
    rows: they are still in our engine's hands."""
    ready = _ready(db, queue, partitions, now, limit + 1)
    if len(ready) <= limit:
        rows: list[Any] = []
        for start in range(0, len(ready), 500):
            chunk = ready[start:start + 500]
            rows += db.execute(f"{_COLUMNS}WHERE id IN ({_marks(len(chunk))}) AND owner IS NOT ?",
                               (*chunk, owner)).fetchall()
        rows.sort(key=_first)
        return rows
    sql = (f"{_COLUMNS}INDEXED BY volley_messages_pending WHERE queue = ? AND acked_at IS NULL AND visible_at <= ? "
           "AND owner IS NOT ?")
    params: list[Any] = [queue, now, owner]
    if only_these:
        sql += f" AND partition IN ({_marks(len(partitions))})"
        params += partitions
    return db.execute(sql + " ORDER BY id LIMIT ?", (*params, limit)).fetchall()


@dataclass(frozen=True, slots=True)
class Taken:
    """What a take handed out, and whether it found suspects (``recovery``) in the partitions it may take from:
    then it hands out one of them alone, or nothing while the consumer still holds something."""

    envelopes: list[Envelope]
    suspects: bool = False


def take(db: sqlite3.Connection, queue: str, owner: str, limit: int, lease: float, ordered: bool,
         partitions: int, heartbeat: bool = True) -> list[Envelope]:
    """Hand out up to ``limit`` ready messages, oldest first, and lease them to ``owner`` for ``lease`` seconds."""
    return lease_out(db, queue, owner, limit, lease, ordered, partitions, heartbeat).envelopes


def lease_out(db: sqlite3.Connection, queue: str, owner: str, limit: int, lease: float, ordered: bool,
              partitions: int, heartbeat: bool = True, holding: bool | None = None) -> Taken:
    """:func:`take`, saying whether suspects were about: a message a dead consumer held is handed out alone, to a
    consumer that holds nothing else, and before anything else of the partitions this consumer may take from.

    ``holding``: whether the consumer's engine still has deliveries of it to settle (the connector knows; a row
    whose ack failed is not one of them, though it stays leased). None: whether it leases any row."""
    now = time.time()
    allowed = _allowed_partitions(db, queue, owner, partitions, lease, now, heartbeat) if ordered else None
    if allowed is not None and not allowed:
        return Taken([])
    if not ordered and not heartbeat:  # (an ordered take registered it above) alive as long as its leases run
        db.execute(_REGISTER, (queue, owner, now + lease))
    dead = recovery.dead_owners(db, queue, owner, now)
    suspect = recovery.oldest_suspect(db, queue, dead, allowed, now) if dead else None
    if suspect is not None:
        if recovery.holds_anything(db, owner) if holding is None else holding:
            return Taken([], suspects=True)  # what it holds must be settled first
        rows = db.execute(f"{_COLUMNS}WHERE id = ?", (suspect,)).fetchall()
    else:
        rows = _oldest_ready(db, queue, owner, limit, range(partitions) if allowed is None else allowed,
                             allowed is not None, now)
        if not rows:
            return Taken([])
    until = now + lease
    for start in range(0, len(rows), 500):
        ids = [row[0] for row in rows[start:start + 500]]
        db.execute(f"UPDATE volley_messages SET owner = ?, visible_at = ?, attempts = attempts + 1 "  # noqa: S608
                   f"WHERE id IN ({_marks(len(ids))})", (owner, until, *ids))
    return Taken([
        Envelope(value, key, decode_headers(headers) if headers is not None else None, queue, partition, message_id,
                 created_at, attempts + 1)
        for message_id, partition, value, key, headers, created_at, attempts in rows
    ], suspect is not None)


def settle(db: sqlite3.Connection, owner: str, ids: Sequence[int], retention: float) -> int:
    """Acknowledge this owner's deliveries: delete them, or mark them acked when they are retained."""
    count = 0
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        marks = _marks(len(chunk))
        if retention > 0:
            cursor = db.execute(f"UPDATE volley_messages SET acked_at = ?, owner = NULL "  # noqa: S608
                                f"WHERE owner = ? AND acked_at IS NULL AND id IN ({marks})",
                                (time.time(), owner, *chunk))
        else:
            cursor = db.execute(f"DELETE FROM volley_messages WHERE owner = ? AND acked_at IS NULL "  # noqa: S608
                                f"AND id IN ({marks})", (owner, *chunk))
        count += cursor.rowcount
    return count


def give_back(db: sqlite3.Connection, owner: str, ids: Sequence[int] | None, delay: float,
              undelivered: bool = False) -> int:
    """Release this owner's deliveries (all of them when ``ids`` is None), visible again after ``delay``.

    ``undelivered``: the take that leased them never reached the engine (a cancelled consume), so it does not
    count as a delivery: their attempt count goes back down."""
    visible_at = time.time() + max(0.0, delay)
    uncount = ", attempts = max(attempts - 1, 0)" if undelivered else ""
    if ids is None:
        cursor = db.execute(f"UPDATE volley_messages SET owner = NULL, visible_at = ?{uncount} "  # noqa: S608
                            "WHERE owner = ? AND acked_at IS NULL", (visible_at, owner))
        return cursor.rowcount
    count = 0
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        cursor = db.execute(f"UPDATE volley_messages SET owner = NULL, visible_at = ?{uncount} WHERE owner = ? "  # noqa: S608
                            f"AND acked_at IS NULL AND id IN ({_marks(len(chunk))})",
                            (visible_at, owner, *chunk))
        count += cursor.rowcount
    return count


def renew(db: sqlite3.Connection, queue: str, owner: str, lease: float) -> None:
    """The heartbeat: extend the leases of everything this owner holds, and say it is alive. A lease that lapsed
    while this thread was stalled (a write lock held longer than ``vt`` by another process) is renewed too: the
    owner is unchanged only while nobody took the message since, and ``take`` never hands a consumer its own."""
    now = time.time()
    db.execute("UPDATE volley_messages SET visible_at = ? WHERE owner = ? AND acked_at IS NULL", (now + lease, owner))
    db.execute(_REGISTER, (queue, owner, now + lease))


def join(db: sqlite3.Connection, queue: str, owner: str, lease: float) -> None:
    """Count this consumer among the queue's live ones (for the fair share of partitions) from the start, and
    register as dead the owners of leased rows that are not registered (files written before ``recovery``)."""
    db.execute(_REGISTER, (queue, owner, time.time() + lease))
    recovery.register_orphans(db, queue)


def leave(db: sqlite3.Connection, queue: str, owner: str) -> None:
    db.execute("DELETE FROM volley_consumers WHERE queue = ? AND owner = ?", (queue, owner))


def leave_with_suspect(db: sqlite3.Connection, queue: str, owner: str, suspect: int) -> None:
    """Leave while a suspect (``recovery``) was being handled alone and did not finish: everything else is given
    back, and the suspect stays leased to this owner, registered as dead, with its lease lapsed: it is a suspect
    again for the next consumer (handed out alone), not a message given back (which would come in a batch)."""
    db.execute("UPDATE volley_messages SET owner = NULL, visible_at = ? WHERE owner = ? AND acked_at IS NULL "
               "AND id != ?", (time.time(), owner, suspect))
    db.execute("UPDATE volley_messages SET visible_at = ? WHERE owner = ? AND id = ? AND acked_at IS NULL",
               (time.time(), owner, suspect))
    db.execute(_REGISTER, (queue, owner, 0.0))  # dead from now: compaction forgets it once it owns nothing


def is_drained(db: sqlite3.Connection, queue: str, owner: str) -> bool:
    """Nothing ready or delayed, and nothing held by ``owner``; messages other live consumers hold do not count."""
    row = db.execute("SELECT 1 FROM volley_messages WHERE queue = ? AND acked_at IS NULL "
                     "AND NOT (owner IS NOT NULL AND owner != ? AND visible_at > ?) LIMIT 1",
                     (queue, owner, time.time())).fetchone()
    return row is None


def depth(db: sqlite3.Connection, queue: str) -> int:
    """Messages ready to be consumed now."""
    row = db.execute("SELECT count(*) FROM volley_messages WHERE queue = ? AND acked_at IS NULL AND visible_at <= ?",
                     (queue, time.time())).fetchone()
    return int(row[0])


COMPACT_ROWS = 20_000
"""The most acked rows one compaction of a queue deletes in one transaction: a consumer's compaction runs on the
database thread, whose other work (takes, acks, produces) waits for it, and other processes' writes wait for its
lock. What is left is deleted by the next one, right after the work queued meanwhile."""


def compact(db: sqlite3.Connection, queue: str | None, retention: float, vacuum_pages: int = 2000,
            limit: int | None = None) -> int:
    """Delete acked rows older than ``retention`` seconds (of ``queue``: at most ``limit``, the oldest) and
    consumers dead for an hour that own nothing, then give free pages back.

    Returns the number of rows deleted. Runs in short transactions of its own.
    """
    cutoff = time.time() - retention
    db.execute("BEGIN IMMEDIATE")
    try:
        if queue is None:
            deleted = db.execute("DELETE FROM volley_messages WHERE acked_at IS NOT NULL AND acked_at <= ?",
                                 (cutoff,)).rowcount
        elif limit is None:
            deleted = db.execute("DELETE FROM volley_messages WHERE queue = ? AND acked_at IS NOT NULL "
                                 "AND acked_at <= ?", (queue, cutoff)).rowcount
        else:
            deleted = db.execute("DELETE FROM volley_messages WHERE id IN (SELECT id FROM volley_messages "
                                 "INDEXED BY volley_messages_acked WHERE queue = ? AND acked_at IS NOT NULL "
                                 "AND acked_at <= ? ORDER BY acked_at LIMIT ?)", (queue, cutoff, limit)).rowcount
        db.execute(recovery.FORGET_DEAD_CONSUMERS, (time.time() - 3600,))
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")
    free = db.execute("PRAGMA freelist_count").fetchone()[0]
    if free:
        # incremental_vacuum returns one row per freed page; it must run to the end to take effect.
        db.executescript(f"PRAGMA incremental_vacuum({int(vacuum_pages)});")  # execute() frees one page only
    db.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    return int(deleted)


def stats(db: sqlite3.Connection) -> dict[str, dict[str, int]]:
    """Per queue: ready, delayed, held and acked (retained) rows: for the command line and tests."""
    now = time.time()
    out: dict[str, dict[str, int]] = {}
    for (name,) in db.execute("SELECT name FROM volley_queues ORDER BY name").fetchall():
        out[name] = {"ready": 0, "delayed": 0, "held": 0, "acked": 0}
    rows = db.execute(
        "SELECT queue, "
        "sum(acked_at IS NULL AND visible_at <= ?), "
        "sum(acked_at IS NULL AND visible_at > ? AND owner IS NULL), "
        "sum(acked_at IS NULL AND visible_at > ? AND owner IS NOT NULL), "
        "sum(acked_at IS NOT NULL) FROM volley_messages GROUP BY queue", (now, now, now)).fetchall()
    for queue, ready, delayed, held, acked in rows:
        out[queue] = {"ready": ready or 0, "delayed": delayed or 0, "held": held or 0, "acked": acked or 0}
    return out


# ---------------------------------------------------------------------------------------------- browsing (volley dlq)


def last_id(db: sqlite3.Connection) -> int:
    """The highest message id so far: a browse started now ends there."""
    row = db.execute("SELECT max(id) FROM volley_messages").fetchone()
    return int(row[0] or 0)


def browse(db: sqlite3.Connection, queue: str, after: int, upto: int, limit: int) -> list[Envelope]:
    """Unacknowledged messages with ``after < id <= upto``, oldest first, read in place: no lease, no attempt."""
    rows = db.execute("SELECT id, partition, value, key, headers, created_at, attempts FROM volley_messages "
                      "INDEXED BY volley_messages_pending WHERE queue = ? AND acked_at IS NULL AND id > ? AND id <= ? "
                      "ORDER BY id LIMIT ?", (queue, after, upto, limit)).fetchall()
    return [Envelope(value, key, decode_headers(headers) if headers is not None else None, queue, partition,
                     message_id, created_at, max(attempts, 1))
            for message_id, partition, value, key, headers, created_at, attempts in rows]


def delete(db: sqlite3.Connection, queue: str, ids: Sequence[int]) -> int:
    """Remove these messages for good, whoever holds them (a consumer's later ack then finds nothing)."""
    count = 0
    for start in range(0, len(ids), 500):
        chunk = ids[start:start + 500]
        count += db.execute(f"DELETE FROM volley_messages WHERE queue = ? AND id IN ({_marks(len(chunk))})",  # noqa: S608
                            (queue, *chunk)).rowcount
    return count
