"""What a poll reads: the take and the probe find ready rows through an index, not by walking the backlog.

(Their cost by backlog size, in milliseconds: ``benchmarks/sqlite_poll_cost.py``. Here only the plans and the
results, which do not depend on the machine.)
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlite_parts import open_consumer, trace_statements

from volley_sqlite import schema

QUEUE = "jobs"
PARTITIONS = 4


def backlog(path: Path, delayed: int, ready: int) -> sqlite3.Connection:
    """``delayed`` rows hidden for an hour, then ``ready`` rows visible now, round the partitions."""
    db = schema.connect(str(path), "off")
    now = time.time()
    schema.ensure_queue(db, QUEUE, PARTITIONS)
    schema.insert(db, [(QUEUE, i % PARTITIONS, f"m-{i}".encode(), None, None, now, now + 3600 if i < delayed else now)
                       for i in range(delayed + ready)])
    return db


def plans_of(db: sqlite3.Connection, work: Callable[[], object]) -> list[str]:
    """The query plan of each SELECT ``work`` runs on the messages (traced with its values), one line each."""
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    db.execute("BEGIN IMMEDIATE")
    try:
        work()
    finally:
        db.execute("ROLLBACK")
        db.set_trace_callback(None)
    selects = [s for s in statements if s.lstrip().upper().startswith("SELECT") and "volley_messages" in s]
    assert selects, f"no read of the messages among {statements}"
    return [" | ".join(row[3] for row in db.execute(f"EXPLAIN QUERY PLAN {sql}")) for sql in selects]


@pytest.mark.parametrize("ordered", [False, True])
def test_the_probe_and_a_take_find_the_ready_rows_through_the_ready_index(tmp_path: Path, ordered: bool) -> None:
    """Before: both read the pending index in id order, past every delayed row (its visible_at from the table), so
    an idle poll of a queue with a million delayed rows took ~100 ms (a seek now, whatever the backlog)."""
    db = backlog(tmp_path / "q.sqlite3", delayed=2000, ready=3)
    try:
        probe_owner = "me" if ordered else None
        for work in (lambda: schema.anything_ready(db, QUEUE, PARTITIONS, probe_owner),
                     lambda: schema.take(db, QUEUE, "me", 100, 30, ordered, PARTITIONS)):
            plans = plans_of(db, work)
            for plan in plans:
                assert "volley_messages_pending" not in plan and "SCAN" not in plan, plans
            assert any("USING INDEX volley_messages_ready (queue=? AND partition=? AND visible_at<?)" in plan
                       for plan in plans), plans
    finally:
        db.close()


@pytest.mark.parametrize("ordered", [False, True])
def test_a_take_behind_delayed_rows_hands_out_the_ready_ones_oldest_first(tmp_path: Path, ordered: bool) -> None:
    db = backlog(tmp_path / "q.sqlite3", delayed=500, ready=7)
    try:
        assert schema.anything_ready(db, QUEUE, PARTITIONS, "me" if ordered else None)
        db.execute("BEGIN IMMEDIATE")
        taken = schema.take(db, QUEUE, "me", 5, 30, ordered, PARTITIONS)
        db.execute("COMMIT")
        assert [e.value for e in taken] == [f"m-{i}".encode() for i in range(500, 505)]
        db.execute("BEGIN IMMEDIATE")
        rest = schema.take(db, QUEUE, "other", 100, 30, False, PARTITIONS)  # fewer ready than asked for
        db.execute("COMMIT")
        assert [e.value for e in rest] == [b"m-505", b"m-506"]
        assert not schema.anything_ready(db, QUEUE, PARTITIONS)
    finally:
        db.close()


async def test_a_file_made_before_the_ready_index_gets_it_when_a_consumer_opens_it(tmp_path: Path) -> None:
    path = tmp_path / "old.sqlite3"
    db = backlog(path, delayed=0, ready=10)
    db.execute("DROP INDEX IF EXISTS volley_messages_ready")  # the schema as it was before the index
    db.close()
    consumer = await open_consumer(path, QUEUE)
    try:
        with sqlite3.connect(path) as check:
            names = {row[0] for row in check.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert "volley_messages_ready" in names, names
        got = await consumer.consume(100, 1.0)
        assert sorted(e.value for e in got) == sorted(f"m-{i}".encode() for i in range(10))
    finally:
        await consumer.close()


async def test_asking_whether_a_queue_is_drained_or_how_deep_it_is_takes_no_write_lock(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``is_drained`` (asked every poll while an app waits to stop when drained) and ``depth`` (for the queue depth
    metric) only read: before, each ran in a write transaction (BEGIN IMMEDIATE), so a worker waiting to drain
    took the file's write lock every poll, in the way of every other process's writes."""
    statements = trace_statements(monkeypatch)
    backlog(tmp_path / "q.sqlite3", delayed=3, ready=2).close()
    consumer = await open_consumer(tmp_path / "q.sqlite3", QUEUE, heartbeat=False,
                                   compaction_interval_seconds=3600)
    try:
        await consumer.consume(1, 1.0)
        deadline = time.monotonic() + 10.0  # the first compaction runs at the start: wait until it is over
        while not any("wal_checkpoint" in s for s in statements):
            assert time.monotonic() < deadline, statements
            await asyncio.sleep(0.01)
        before = len(statements)
        drained = [await asyncio.to_thread(consumer.is_drained) for _ in range(5)]
        depth = await consumer.depth()
        asked = statements[before:]
        assert (drained, depth) == ([False] * 5, 1)  # the answers are still right: 1 ready, 1 held, 3 delayed
        assert any("volley_messages" in s for s in asked), asked  # they did read
        assert not [s for s in asked if s.lstrip().upper().startswith("BEGIN")], asked
    finally:
        await consumer.close()
