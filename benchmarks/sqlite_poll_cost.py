"""What one poll of the sqlite connector costs as the backlog grows (not a throughput benchmark).

    python benchmarks/sqlite_poll_cost.py [ROWS ...]        (default: 200000 1000000)
    python benchmarks/sqlite_poll_cost.py 0                 (what the ready index costs publish, lease and ack)

For each backlog size it builds a fresh file (``synchronous=off``, 4 partitions) and times, median of
several runs, each inside a transaction that is rolled back so that the backlog stays as it was:

- ``take100``: ``schema.take`` of 100 messages, competing consumers (``ordered: false``) and ordered;
- ``probe``: the read-only probe a consumer runs before a take, competing and ordered;

in four shapes of backlog: every row ready; every row delayed (an hour) but the last 100 (an idle probe
until those); every row ready but each partition held by another live consumer (ordered: an idle consumer);
every row delayed but the last 10,000 ("mixed": more ready than a take, behind the delayed ones: the case
the take still reads in id order past the delayed rows).
It prints the ``EXPLAIN QUERY PLAN`` of the take and the probe once. Flat cost: the figures for 1,000,000 rows
are those for 200,000 (within noise).
"""

from __future__ import annotations

import sqlite3
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from volley_sqlite import schema

QUEUE = "jobs"
PARTITIONS = 4
REPEATS = 7


def build(path: Path, rows: int, shape: str) -> None:
    db = schema.connect(str(path), "off")
    now = time.time()
    schema.ensure_queue(db, QUEUE, PARTITIONS)
    later = now + 3600 if shape in ("delayed", "mixed") else now
    ready_tail = 10_000 if shape == "mixed" else 100
    db.execute("BEGIN")
    batch = []
    for i in range(rows):
        visible = later if i < rows - ready_tail else now
        batch.append((QUEUE, i % PARTITIONS, b"x" * 40, None, None, now, visible))
        if len(batch) == 10000:
            schema.insert(db, batch)
            batch.clear()
    schema.insert(db, batch)
    if shape == "held":  # another live consumer holds the oldest message of every partition
        db.execute("UPDATE volley_messages SET owner = 'other', visible_at = ?, attempts = 1 WHERE id <= ?",
                   (now + 3600, PARTITIONS))
        schema.join(db, QUEUE, "other", 3600)
    db.execute("COMMIT")
    db.execute("ANALYZE")  # what a long-lived file may have; the plans must not depend on it either way
    db.close()


def timed(db: sqlite3.Connection, work: Callable[[], object]) -> float:
    figures = []
    for _ in range(REPEATS):
        db.execute("BEGIN IMMEDIATE")
        began = time.perf_counter()
        work()
        figures.append(time.perf_counter() - began)
        db.execute("ROLLBACK")
    return statistics.median(figures) * 1000


def plans(db: sqlite3.Connection, label: str, work: Callable[[], object]) -> None:
    """The query plan of every SELECT that ``work`` runs (traced with their values)."""
    statements: list[str] = []
    db.set_trace_callback(statements.append)
    db.execute("BEGIN IMMEDIATE")
    try:
        work()
    finally:
        db.execute("ROLLBACK")
        db.set_trace_callback(None)
    for sql in statements:
        if sql.lstrip().upper().startswith("SELECT"):
            steps = [row[3] for row in db.execute("EXPLAIN QUERY PLAN " + sql)]
            print(f"  {label}: {sql[:90]}...\n      plan: {' | '.join(steps)}")


def measure(db: sqlite3.Connection, shape: str, rows: int, first: bool) -> None:
    works: dict[str, Callable[[], object]] = {
        "take100 competing": lambda: schema.take(db, QUEUE, "me", 100, 30, False, PARTITIONS),
        "take100 ordered": lambda: schema.take(db, QUEUE, "me", 100, 30, True, PARTITIONS),
        "probe competing": lambda: schema.anything_ready(db, QUEUE, PARTITIONS),
        "probe ordered": lambda: schema.anything_ready(db, QUEUE, PARTITIONS, "me"),
    }
    if first:
        for label, work in works.items():
            plans(db, f"{shape} {label}", work)
    figures = {label: timed(db, work) for label, work in works.items()}
    print(f"{shape:8} {rows:>9,} rows: " + ", ".join(f"{k} {v:8.3f} ms" for k, v in figures.items()), flush=True)


def write_cost(directory: str, with_index: bool, rounds: int = 200) -> dict[str, float]:
    """Microseconds per message to publish, lease and ack (delete) batches of 100 rows on a 100,000-row backlog,
    with the ready index or without it (the schema before it): what the index costs the writes."""
    path = Path(directory) / f"writes-{with_index}-{time.monotonic_ns()}.sqlite3"
    build(path, 100_000, "ready")
    db = schema.connect(str(path), "normal")
    if not with_index:
        db.execute("DROP INDEX volley_messages_ready")
    spent = {"publish": 0.0, "lease": 0.0, "ack": 0.0}
    try:
        for _ in range(rounds):
            now = time.time()
            began = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            schema.insert(db, [(QUEUE, i % PARTITIONS, b"x" * 40, None, None, now, now) for i in range(100)])
            db.execute("COMMIT")
            spent["publish"] += time.perf_counter() - began
            ids = [row[0] for row in db.execute("SELECT id FROM volley_messages WHERE queue = ? AND acked_at IS NULL "
                                                "AND owner IS NULL ORDER BY id LIMIT 100", (QUEUE,))]
            marks = ",".join("?" * len(ids))
            began = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")  # what a take writes
            db.execute(f"UPDATE volley_messages SET owner = 'me', visible_at = ?, attempts = attempts + 1 "
                       f"WHERE id IN ({marks})", (now + 30, *ids))
            db.execute("COMMIT")
            spent["lease"] += time.perf_counter() - began
            began = time.perf_counter()
            db.execute("BEGIN IMMEDIATE")
            schema.settle(db, "me", ids, 0.0)
            db.execute("COMMIT")
            spent["ack"] += time.perf_counter() - began
    finally:
        db.close()
        path.unlink()
    return {k: v / (rounds * 100) * 1e6 for k, v in spent.items()}


def main(sizes: list[int]) -> None:
    if sizes == [0]:  # the writes, alternately without and with the index, three times each
        with tempfile.TemporaryDirectory() as directory:
            for _ in range(3):
                for with_index in (False, True):
                    figures = write_cost(directory, with_index)
                    print(f"writes {'with   ' if with_index else 'without'} the ready index: "
                          + ", ".join(f"{k} {v:6.2f} us/msg" for k, v in figures.items()), flush=True)
        return
    with tempfile.TemporaryDirectory() as directory:
        for shape in ("ready", "delayed", "held", "mixed"):
            for rows in sizes:
                path = Path(directory) / f"{shape}-{rows}.sqlite3"
                build(path, rows, shape)
                db = schema.connect(str(path), "off")
                try:
                    measure(db, shape, rows, rows == sizes[0])
                finally:
                    db.close()
                path.unlink()


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]] or [200_000, 1_000_000])
