"""Crash recovery, found by a review (each test failed before its fix): a row whose ack failed stayed leased to
the consumer for ever (renewed by its heartbeat), so the consumer never held "nothing" again and took no suspect
(nor anything else while suspects remained): the only consumer of a queue stopped for good once another had died;
and with ``heartbeat: false, ordered: false`` every consumer looked dead ``vt`` after it started, so each take of
every consumer searched every other consumer's in-flight rows for suspects, on the normal path."""

from __future__ import annotations

import sqlite3
import time
from pathlib import Path

import pytest
from sqlite_parts import open_consumer, produce, records

from volley_sqlite import schema

QUEUE = "jobs"


def died_holding_free(path: Path, count: int, owner: str = "dead") -> list[int]:
    """Of the messages nobody holds, the ``count`` oldest were leased to ``owner``, which then died."""
    with sqlite3.connect(path, isolation_level=None) as db:
        now = time.time()
        ids = [row[0] for row in db.execute(
            "SELECT id FROM volley_messages WHERE queue = ? AND owner IS NULL ORDER BY id LIMIT ?", (QUEUE, count))]
        db.execute(f"UPDATE volley_messages SET owner = ?, visible_at = ?, attempts = 1 "
                   f"WHERE id IN ({','.join('?' * len(ids))})", (owner, now - 1, *ids))
        db.execute("INSERT OR REPLACE INTO volley_consumers (queue, owner, alive_until) VALUES (?, ?, ?)",
                   (QUEUE, owner, now - 1))
    return ids


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_failed_ack_does_not_stop_the_consumer_once_another_died(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ordered: bool) -> None:
    path = tmp_path / "q.sqlite3"
    await produce(path, records(QUEUE, 20), partitions=2)
    consumer = await open_consumer(path, partitions=2, ordered=ordered, vt=0.6)
    try:
        batch = await consumer.consume(2, 1.0)
        assert len(batch) == 2
        real_settle = schema.settle

        def failing_settle(*args: object, **kwargs: object) -> int:  # a 'database is locked', a full disk
            raise sqlite3.OperationalError("database is locked")

        monkeypatch.setattr(schema, "settle", failing_settle)
        with pytest.raises(sqlite3.OperationalError):
            await consumer.ack(batch[:1])  # the engine logs that it will be delivered again, and goes on
        monkeypatch.setattr(schema, "settle", real_settle)
        await consumer.ack(batch[1:])
        suspects = set(died_holding_free(path, 5))  # another worker was killed holding messages, and is not restarted
        got: list[int] = []
        deadline = time.monotonic() + 10.0
        while time.monotonic() < deadline and not suspects <= set(got):
            taken = await consumer.consume(100, 0.2)
            got += [e.position for e in taken]
            await consumer.ack(taken)
        assert suspects <= set(got), f"took {got}: the row whose ack failed kept the consumer from the suspects"
        assert batch[0].position in got, "the message whose ack failed was not delivered again"
    finally:
        await consumer.close()


def test_a_consumer_without_heartbeat_stays_registered_while_it_takes(tmp_path: Path,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    """Nothing died: the others' in-flight rows are not suspects, and a take does not search them."""
    clock = [1_000_000.0]
    monkeypatch.setattr(schema.time, "time", lambda: clock[0])
    db = schema.connect(str(tmp_path / "q.sqlite3"), "off")
    try:
        schema.ensure_queue(db, QUEUE, 4)
        schema.insert(db, [(QUEUE, i % 4, b"x", None, None, clock[0], clock[0]) for i in range(400)])
        for owner in ("w0", "w1", "me"):
            schema.join(db, QUEUE, owner, 30.0)
        clock[0] += 20
        for owner in ("w0", "w1"):
            assert len(schema.take(db, QUEUE, owner, 50, 30.0, False, 4, heartbeat=False)) == 50
        clock[0] += 15  # 35 s after they joined, 15 s into their leases
        assert schema.lease_out(db, QUEUE, "me", 10, 30.0, False, 4, heartbeat=False).suspects is False
        alive = {row[0] for row in db.execute("SELECT owner FROM volley_consumers WHERE alive_until > ?",
                                             (clock[0],))}
        assert alive == {"w0", "w1", "me"}
    finally:
        db.close()



async def test_a_suspect_whose_handling_a_close_cut_short_is_handed_out_alone_again(tmp_path: Path) -> None:
    """A graceful close (SIGTERM, the shutdown deadline passed) while a suspect was handled alone gave it back like
    any message: it lost its mark, and the next consumer took it in a batch (if it is the poison, the batch's
    counts went with it)."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records(QUEUE, 20), partitions=1)
    suspects = died_holding_free(path, 3)
    first = await open_consumer(path, partitions=1)
    alone = await first.consume(100, 1.0)
    assert [e.position for e in alone] == suspects[:1]
    await first.close()  # its handler did not finish
    second = await open_consumer(path, partitions=1)
    try:
        again = await second.consume(100, 1.0)
        assert [e.position for e in again] == suspects[:1], "the cut-short suspect came back in a batch"
    finally:
        await second.close()
