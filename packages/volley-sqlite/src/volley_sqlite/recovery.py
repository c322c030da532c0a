"""What a dead consumer left behind: its deliveries are *suspects*, handed out one at a time.

A worker that dies while it handles a message (kill -9, an OOM kill, a segfault in a C extension) leaves leased
to it every message its engine had prefetched, up to ``max_buffered``. Any one of them may be what killed it.
Handed out again in batches, the one that kills its worker every time would take the others with it: each death
would raise every count, and after ``max_deliveries`` deaths all of them would be dead-lettered.

A *suspect* is an unacknowledged row whose lease lapsed while it was still leased (``owner`` set: an ack, a nack
and a graceful close all clear it) to a consumer that is no longer alive in ``volley_consumers`` (its heartbeat
stopped). While a consumer may take suspects (for an ordered queue: in the partitions it may take from), it takes
them oldest first, **one at a time and alone**: nothing else leased to it until that one is settled. A death
during a suspect's handling then raises only that message's count, and the dead consumer's row makes it a
suspect again. The others it holds nothing else to share their fate with: the innocent are handled at their
second delivery, the poison one reaches ``max_deliveries`` alone.

Finding suspects costs a normal take one read of the queue's registered consumers (a handful of rows: those
alive, and the dead ones for an hour) and a seek in the owner index per dead consumer.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence


def dead_owners(db: sqlite3.Connection, queue: str, owner: str, now: float) -> list[str]:
    """The queue's registered consumers whose registration lapsed (their heartbeat stopped), other than ``owner``."""
    return [row[0] for row in db.execute(
        "SELECT owner FROM volley_consumers WHERE queue = ? AND alive_until <= ? AND owner != ?", (queue, now, owner))]


def oldest_suspect(db: sqlite3.Connection, queue: str, dead: Sequence[str], partitions: Sequence[int] | None,
                   now: float) -> int | None:
    """The id of the oldest suspect among the rows of these dead consumers (in these partitions: None for all).

    One seek per dead consumer in the owner index, whose entries are in (owner, id) order: the first row of a dead
    consumer that is still unacknowledged and lapsed is its oldest suspect."""
    sql = ("SELECT id FROM volley_messages INDEXED BY volley_messages_owner WHERE owner = ? AND acked_at IS NULL "
           "AND visible_at <= ? AND queue = ?")
    if partitions is not None:
        sql += f" AND partition IN ({','.join('?' * len(partitions))})"
    sql += " ORDER BY id LIMIT 1"
    oldest: int | None = None
    for dead_owner in dead:
        row = db.execute(sql, (dead_owner, now, queue, *(partitions or ()))).fetchone()
        if row is not None and (oldest is None or row[0] < oldest):
            oldest = int(row[0])
    return oldest


def holds_anything(db: sqlite3.Connection, owner: str) -> bool:
    """Whether ``owner`` still holds an unacknowledged delivery (lapsed or not): a seek in the owner index."""
    return db.execute("SELECT 1 FROM volley_messages INDEXED BY volley_messages_owner WHERE owner = ? "
                      "AND acked_at IS NULL LIMIT 1", (owner,)).fetchone() is not None


def register_orphans(db: sqlite3.Connection, queue: str) -> int:
    """Register, as dead, owners of unacknowledged rows that have no row in ``volley_consumers``; their lapsed rows
    are then suspects like those of any dead consumer. Returns how many.

    A live consumer is always registered (when it starts, then by its heartbeat); compaction keeps the row of a
    dead one while it owns anything. Orphans come from files written before that (compaction forgot consumers
    after an hour, whatever they held). Run once when a consumer starts: it reads every leased row of the queue
    (what is in flight), not the backlog."""
    orphans = [row[0] for row in db.execute(
        "SELECT DISTINCT owner FROM volley_messages INDEXED BY volley_messages_owner WHERE owner IS NOT NULL "
        "AND queue = ? AND acked_at IS NULL AND owner NOT IN (SELECT owner FROM volley_consumers WHERE queue = ?)",
        (queue, queue))]
    db.executemany("INSERT OR IGNORE INTO volley_consumers (queue, owner, alive_until) VALUES (?, ?, 0)",
                   [(queue, orphan) for orphan in orphans])
    return len(orphans)


FORGET_DEAD_CONSUMERS = (
    "DELETE FROM volley_consumers WHERE alive_until < ? AND NOT EXISTS (SELECT 1 FROM volley_messages "
    "INDEXED BY volley_messages_owner WHERE volley_messages.owner = volley_consumers.owner "
    "AND volley_messages.acked_at IS NULL)")
"""Compaction: consumers dead for a while and owning nothing any more. One that still owns rows is kept: its rows
are suspects only while it is known dead."""
