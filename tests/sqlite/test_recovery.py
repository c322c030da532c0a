"""What a dead consumer left behind comes back one message at a time (volley_sqlite.recovery).

A consumer's death is staged in the file: its registration and the leases of its rows lapsed, as after a kill -9
(test_crash_poison.py does it with real processes). Each test names the rule it checks.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from pathlib import Path

import pytest
from sqlite_parts import open_consumer, produce, records

from volley.testing.contract import deadline_in, drain_until
from volley_sqlite import admin, schema

QUEUE = "jobs"


def died_holding(path: Path, count: int, owner: str = "dead", registered: bool = True) -> list[int]:
    """The ``count`` oldest messages were leased to ``owner`` (delivered once), which then died: its lease and its
    registration lapsed. Without ``registered``, its row in volley_consumers is gone too (compacted by an old
    version). Returns their ids."""
    with sqlite3.connect(path, isolation_level=None) as db:
        now = time.time()
        ids = [row[0] for row in db.execute("SELECT id FROM volley_messages WHERE queue = ? ORDER BY id LIMIT ?",
                                            (QUEUE, count))]
        db.execute(f"UPDATE volley_messages SET owner = ?, visible_at = ?, attempts = 1 "
                   f"WHERE id IN ({','.join('?' * len(ids))})", (owner, now - 1, *ids))
        if registered:
            db.execute("INSERT OR REPLACE INTO volley_consumers (queue, owner, alive_until) VALUES (?, ?, ?)",
                       (QUEUE, owner, now - 1))
    return ids


@pytest.mark.parametrize("ordered", [True, False])
async def test_a_dead_consumers_messages_come_one_at_a_time_before_anything_else(
    tmp_path: Path, ordered: bool, caplog: pytest.LogCaptureFixture,
) -> None:
    """One at a time, oldest first, the next only once the one before is settled; the messages nobody died
    holding wait until the suspects are cleared, then come in batches again. The log says why, once."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records(QUEUE, 30), partitions=2)
    suspects = died_holding(path, 10)
    consumer = await open_consumer(path, partitions=2, ordered=ordered)
    try:
        seen = []
        for _ in range(10):
            one = await consumer.consume(100, 1.0)
            assert len(one) == 1, f"{len(one)} messages handed out together while suspects remain"
            assert await consumer.consume(100, 0.05) == [], "something leased beside an unsettled suspect"
            assert one[0].attempt == 2
            seen.append(one[0].position)
            await consumer.ack(one)
        assert seen == suspects, "suspects not handed out oldest first"
        rest = await consumer.consume(100, 1.0)
        assert len(rest) == 20 and {e.attempt for e in rest} == {1}, "the others do not come in a batch again"
        await consumer.ack(rest)
        said = [r.getMessage() for r in caplog.records if "died holding messages" in r.getMessage()]
        assert len(said) == 1, said
    finally:
        await consumer.close()


async def test_a_consumer_holding_a_batch_takes_no_suspect_until_it_settled_the_batch(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    await produce(path, records(QUEUE, 30), partitions=1)
    consumer = await open_consumer(path, partitions=1, ordered=False)
    try:
        batch = await consumer.consume(5, 1.0)
        assert len(batch) == 5
        with sqlite3.connect(path, isolation_level=None) as db:  # another consumer died holding the next five
            now = time.time()
            db.execute("UPDATE volley_messages SET owner = 'dead', visible_at = ?, attempts = 1 WHERE id IN "
                       "(SELECT id FROM volley_messages WHERE owner IS NULL ORDER BY id LIMIT 5)", (now - 1,))
            db.execute("INSERT INTO volley_consumers (queue, owner, alive_until) VALUES (?, 'dead', ?)",
                       (QUEUE, now - 1))
        assert await consumer.consume(100, 0.1) == [], "a suspect (or more) leased beside a batch"
        await consumer.ack(batch[:4])
        assert await consumer.consume(100, 0.1) == []
        await consumer.nack(batch[4:], 0.0)
        one = await consumer.consume(100, 1.0)
        assert [e.attempt for e in one] == [2]
        await consumer.ack(one)
    finally:
        await consumer.close()


async def test_live_consumers_each_take_one_suspect_at_a_time(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    await produce(path, records(QUEUE, 6), partitions=1)
    died_holding(path, 6)
    first = await open_consumer(path, partitions=1, ordered=False)
    second = await open_consumer(path, partitions=1, ordered=False)
    try:
        a = await first.consume(100, 1.0)
        b = await second.consume(100, 1.0)
        assert len(a) == len(b) == 1 and a[0].position != b[0].position
        await asyncio.gather(first.ack(a), second.ack(b))
    finally:
        await first.close()
        await second.close()


async def test_the_next_suspect_comes_as_soon_as_the_one_before_is_settled_not_at_the_next_poll(
    tmp_path: Path,
) -> None:
    """A waiting consume is woken by the settle of this process (a poll interval per suspect would make clearing
    a prefetched buffer of 2,000 take minutes)."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records(QUEUE, 3), partitions=1)
    died_holding(path, 3)
    consumer = await open_consumer(path, partitions=1, poll_interval_seconds=30)
    try:
        one = await consumer.consume(100, 1.0)
        waiting = asyncio.create_task(consumer.consume(100, 20.0))
        await asyncio.sleep(0)  # (lets the consume start waiting: not a synchronisation, either order works)
        began = time.monotonic()
        await consumer.ack(one)
        nxt = await asyncio.wait_for(waiting, 20.0)
        assert len(nxt) == 1 and time.monotonic() - began < 5.0
        await consumer.ack(nxt)
    finally:
        await consumer.close()


async def test_a_give_back_and_a_graceful_close_leave_no_suspects(tmp_path: Path) -> None:
    """A nack and a close clear the owner: what they gave back comes again in a batch (nobody died)."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records(QUEUE, 10), partitions=1)
    first = await open_consumer(path, partitions=1, vt=0.2)
    nacked = await first.consume(5, 1.0)
    await first.nack(nacked, 0.0)
    held = await first.consume(100, 1.0)
    assert len(held) == 10
    await first.close()
    second = await open_consumer(path, partitions=1)
    try:
        again = await drain_until(second, lambda got: len(got) >= 10, deadline_in(5))
        assert len(again) == 10
        assert len(await second.consume(100, 0.05)) == 0
        await second.ack(again)
    finally:
        await second.close()


async def test_rows_of_an_owner_an_old_version_forgot_are_suspects_too(tmp_path: Path) -> None:
    """Before, compaction deleted a dead consumer's row after an hour, whatever it still owned: such rows are
    registered as a dead consumer's when a consumer starts."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records(QUEUE, 4), partitions=1)
    died_holding(path, 3, owner="forgotten", registered=False)
    consumer = await open_consumer(path, partitions=1)
    try:
        for _ in range(3):
            one = await consumer.consume(100, 1.0)
            assert [e.attempt for e in one] == [2]
            await consumer.ack(one)
        last = await consumer.consume(100, 1.0)
        assert [e.attempt for e in last] == [1]
        await consumer.ack(last)
    finally:
        await consumer.close()


def test_compaction_keeps_a_dead_consumer_while_it_owns_messages(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    admin.publish(path, QUEUE, [b"a", b"b"], partitions=1)
    died_holding(path, 1, owner="owns")
    with sqlite3.connect(path, isolation_level=None) as db:
        long_ago = time.time() - 7200
        db.execute("UPDATE volley_consumers SET alive_until = ?", (long_ago,))
        db.execute("INSERT INTO volley_consumers (queue, owner, alive_until) VALUES (?, 'owns nothing', ?)",
                   (QUEUE, long_ago))
    admin.compact(path)
    with schema.connect(str(path)) as db:
        owners = {row[0] for row in db.execute("SELECT owner FROM volley_consumers")}
    assert owners == {"owns"}


def test_a_take_does_not_keep_a_consumer_with_a_heartbeat_alive_past_the_leases_it_renewed(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An ordered take used to register its consumer as alive for another ``vt``, without renewing what it held:
    when it died, what it had taken before its last take lapsed while it still looked alive, and was handed out in
    a batch. Only the heartbeat (which renews both) keeps a consumer with a heartbeat registered."""
    clock = [time.time()]
    monkeypatch.setattr(schema.time, "time", lambda: clock[0])  # time.time itself: nothing else here reads it
    db = schema.connect(str(tmp_path / "q.sqlite3"), "off")
    try:
        schema.ensure_queue(db, QUEUE, 2)
        schema.insert(db, [(QUEUE, 0, f"early-{i}".encode(), None, None, clock[0], clock[0]) for i in range(3)])
        schema.join(db, QUEUE, "worker", 30)
        early = schema.take(db, QUEUE, "worker", 100, 30, True, 2)
        assert len(early) == 3
        clock[0] += 20  # no heartbeat since: the worker died, say, right after its next take
        schema.insert(db, [(QUEUE, 1, b"late", None, None, clock[0], clock[0])])
        assert len(schema.take(db, QUEUE, "worker", 100, 30, True, 2)) == 1
        clock[0] += 15  # the early leases lapsed; the late one runs 15 s more
        taken = schema.lease_out(db, QUEUE, "survivor", 100, 30, True, 2)
        assert taken.suspects and [e.value for e in taken.envelopes] == [b"early-0"], taken
    finally:
        db.close()
