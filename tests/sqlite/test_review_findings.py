"""volley-sqlite defects found by a review (session 31): each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
import struct
import threading
import time
from pathlib import Path
from typing import Any

import pytest
from sqlite_parts import open_consumer, produce, records, spec, trace_statements

from volley.errors import ConfigurationError
from volley.message import OutgoingMessage
from volley.testing.contract import DeliveryRecorder, deadline_in, drain_until
from volley_sqlite import SqliteConnector, SqliteConsumer, SqliteProducer, admin, parse_settings, schema


def file_size(path: str | Path) -> int:
    """(A stat is not worth a thread here.)"""
    return os.path.getsize(path)


async def wait_for(condition: Any, seconds: float, what: str) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


# ------------------------------------------------------------------------------------------------ order


async def test_ordered_queue_with_one_partition_is_held_by_one_consumer_at_a_time(tmp_path: Path) -> None:
    """Docs: with ordered: true a partition is held by one consumer at a time (no exception for 1 partition)."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 10), partitions=1)
    first = await open_consumer(path, partitions=1)
    second = await open_consumer(path, partitions=1)
    try:
        held = await first.consume(3, 1.0)
        assert [e.value for e in held] == [b"m-00000", b"m-00001", b"m-00002"]
        # first still holds 0..2 of the only partition: the second consumer must not get 3.. meanwhile
        overtaking = await second.consume(10, 0.3)
        assert overtaking == [], (f"second consumer got {[e.value for e in overtaking]} while the first "
                                  f"still holds the partition's earlier messages")
    finally:
        await first.close()
        await second.close()


# ------------------------------------------------------------------------------------------------ partition count cache


async def _produce_after_a_failed_first_write(path: Path) -> list[OutgoingMessage]:
    """A producer's first batch to a new queue fails (one record names a partition out of range), its next ones
    are delivered. The failed batch created the queue inside its savepoint, which was rolled back."""
    producer: SqliteProducer = SqliteConnector().create_producer(spec(path, role="output", partitions=8))
    await producer.start()
    try:
        first = DeliveryRecorder()
        producer.produce([OutgoingMessage("jobs", b"bad", None, partition=99, token=-1)], first)
        await producer.flush(10)
        assert first.failed, "the record for partition 99 should have been reported failed"
        messages = [OutgoingMessage("jobs", f"k{i}".encode(), f"k{i}".encode(), token=i) for i in range(32)]
        recorder = DeliveryRecorder()
        producer.produce(messages, recorder)
        await producer.flush(10)
        recorder.assert_all_delivered(messages)
        return messages
    finally:
        await producer.close()


async def test_a_queue_created_in_a_rolled_back_savepoint_is_created_again(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    await _produce_after_a_failed_first_write(path)
    with sqlite3.connect(path) as db:
        queues = dict(db.execute("SELECT name, partitions FROM volley_queues").fetchall())
    assert queues.get("jobs") == 8, f"volley_queues after the producer stored 32 rows in 'jobs': {queues}"


async def test_rows_of_a_forgotten_queue_are_stranded_for_ordered_consumers(tmp_path: Path) -> None:
    """The consequence: two ordered workers (other processes: another busy timeout gives another connection and
    cache) create the queue with 2 partitions and never get the rows the producer put in partitions 2..7."""
    path = tmp_path / "q.sqlite3"
    messages = await _produce_after_a_failed_first_write(path)
    a = await open_consumer(path, partitions=2, busy_timeout_seconds=5.0)
    b = await open_consumer(path, partitions=2, busy_timeout_seconds=5.0)
    try:
        got: list[Any] = []
        deadline = deadline_in(3)
        while len(got) < len(messages) and time.monotonic() < deadline:
            for consumer in (a, b):
                batch = await consumer.consume(100, 0.05)
                got += batch
                await consumer.ack(batch)
        assert sorted(e.value for e in got) == sorted(m.value for m in messages), (
            f"{len(got)} of {len(messages)} delivered; stats: {admin.stats(path)}")
    finally:
        await a.close()
        await b.close()


# ------------------------------------------------------------------------------------------------ delivery count


async def test_a_cancelled_consume_does_not_count_a_delivery(tmp_path: Path) -> None:
    """The engine cancels its fetch task at every shutdown. A take cancelled before its result reached the engine
    handed nothing to anybody; giving it back must not leave the delivery counted (max_deliveries would
    dead-letter messages no handler ever saw)."""
    from volley_sqlite import database as databases

    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 5), partitions=1)
    consumer = await open_consumer(path, partitions=1)
    gate = threading.Event()
    blocked = threading.Event()
    try:
        db = consumer._db
        assert db is not None

        def hold(_conn: sqlite3.Connection) -> None:
            blocked.set()
            gate.wait(10)

        db.submit(databases.Operation(hold, lambda _r, _e: None))
        await wait_for(blocked.is_set, 5, "the database thread to be busy")
        for _ in range(3):  # three shutdowns at a bad moment
            task = asyncio.ensure_future(consumer.consume(5, 1.0))
            await asyncio.sleep(0)  # let it queue its take behind the busy database thread
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
        gate.set()
        got = await drain_until(consumer, lambda got: len(got) >= 5, deadline_in(5))
        assert [e.attempt for e in got] == [1] * 5, f"attempts of messages never handed out: {[e.attempt for e in got]}"
    finally:
        gate.set()
        await consumer.close()


# ------------------------------------------------------------------------------------------------ leases and locks


async def test_a_live_consumer_keeps_its_leases_across_a_lock_held_longer_than_the_visibility_timeout(
    tmp_path: Path,
) -> None:
    """Docs: the database thread renews the leases of everything the consumer holds, so a slow message is never
    taken by another worker while the consumer lives. A write lock held by another process (a backup, a
    ``sqlite3`` shell, a big compaction) for longer than ``vt`` stalls the database thread inside its busy wait;
    when it is released, the lapsed leases are not renewed (renew skips them) and they are handed out again."""
    path = tmp_path / "q.sqlite3"
    vt = 0.6
    await produce(path, records("jobs", 10), partitions=1)
    worker = await open_consumer(path, partitions=1, vt=vt, busy_timeout_seconds=10, ordered=False)
    other = await open_consumer(path, partitions=1, vt=vt, busy_timeout_seconds=9, ordered=False)  # another process
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        in_flight = await worker.consume(5, 1.0)  # the handler is working on these, and stays alive throughout
        assert len(in_flight) == 5
        taken_at = time.time()
        locker.execute("BEGIN IMMEDIATE")
        pending = asyncio.ensure_future(worker.consume(5, 5.0))  # the fetch loop polls on: blocks in the busy wait
        await wait_for(lambda: time.time() > taken_at + 2 * vt, 10, "the lock to outlast the visibility timeout")
        locker.execute("COMMIT")
        polled = await asyncio.wait_for(pending, 10)
        seen_by_other = await drain_until(other, lambda got: False, deadline_in(2 * vt))
        again = {e.value for e in [*polled, *seen_by_other]} & {e.value for e in in_flight}
        assert not again, (f"messages still in flight at the live worker were delivered again: {sorted(again)}; "
                           f"to the worker itself: {[(e.value, e.attempt) for e in polled]}, "
                           f"to the other: {[(e.value, e.attempt) for e in seen_by_other]}")
    finally:
        locker.close()
        await worker.close()
        await other.close()


# ------------------------------------------------------------------------------------------------ settings


@pytest.mark.parametrize("key", ["vt", "poll_interval_seconds", "busy_timeout_seconds", "compaction_interval_seconds",
                                 "retention_seconds", "delay"])
@pytest.mark.parametrize("value", ["nan", float("nan"), "inf", float("inf")])
def test_non_finite_numbers_are_configuration_errors(key: str, value: Any) -> None:
    """``float()`` accepts 'nan' and 'inf' (YAML ``.nan`` / ``.inf`` too). vt=nan makes the database thread spin
    (its next heartbeat is never due, and max(0, nan - now) is 0, so it never waits) and every take fail with a
    NOT NULL constraint; vt=inf leases messages forever, so a killed worker's messages never come back."""
    with pytest.raises(ConfigurationError, match=key):
        parse_settings({key: value}, "jobs")


def test_vt_nan_fails_at_start_with_a_sqlite_constraint_error_instead_of_a_configuration_error(tmp_path: Path) -> None:
    """The consequence of accepting vt=nan: the Engine builds, and the worker fails when it starts, with
    "NOT NULL constraint failed: volley_consumers.alive_until", which names neither the key nor the fix."""
    with pytest.raises(ConfigurationError, match="vt"):
        SqliteConnector().create_consumer(spec(tmp_path / "q.sqlite3", partitions=1, vt="nan"))


# ------------------------------------------------------------------------------------------------ tools


def test_stats_on_a_mistyped_path_says_so_instead_of_creating_an_empty_database(
    tmp_path: Path, capsys: pytest.CaptureFixture[str],
) -> None:
    """``python -m volley_sqlite stats --path /var/lib/shop/queue.sqlite3`` (one letter off) must not create a
    new empty queue database there and report an empty broker with exit status 0."""
    from volley_sqlite.__main__ import main

    typo = tmp_path / "queue.sqlite3"
    try:
        status = main(["--path", str(typo), "stats"])
    except SystemExit as exc:
        status = exc.code
    except Exception:  # any clear failure is fine here
        status = 1
    assert not typo.exists(), "a read-only command created a database file at a mistyped path"
    assert status != 0, f"stats on a missing file exited {status}: {capsys.readouterr().out!r}"


def test_publishing_one_message_at_a_time_spreads_over_the_partitions(tmp_path: Path) -> None:
    """Docs: messages without a key go round-robin. ``python -m volley_sqlite publish`` (and the harness's
    ``send``) publish one message per call, and every one of them lands in partition 0, so ordered workers
    beyond the first get nothing to do."""
    path = tmp_path / "q.sqlite3"
    for i in range(8):
        admin.publish(path, "jobs", [f"m{i}".encode()], partitions=4)
    partitions = sorted({m.partition for m in admin.messages(path, "jobs")})
    assert partitions == [0, 1, 2, 3], f"8 keyless messages published one per call went to partitions {partitions}"


# ------------------------------------------------------------------------------------------------ idle polling


async def test_a_consumer_with_nothing_it_may_take_does_not_commit_a_write_transaction_every_poll(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Ordered queue, two partitions, three workers: two hold one partition each (a backlog behind them), the
    third can take nothing. Its ready-probe sees the backlog, so every poll (20 a second at the default interval)
    runs a take: a BEGIN IMMEDIATE write transaction (it rewrites its volley_consumers row), a commit and, with
    synchronous=full, an fsync, contending for the one write lock with the workers that do the work."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 40), partitions=2)
    first = await open_consumer(path, partitions=2, busy_timeout_seconds=5.0)  # other processes
    second = await open_consumer(path, partitions=2, busy_timeout_seconds=6.0)
    idle = await open_consumer(path, partitions=2)
    takes = 0
    real_take = schema.take

    def counting_take(*args: Any) -> Any:
        nonlocal takes
        takes += 1
        return real_take(*args)

    try:
        held = [*await first.consume(10, 1.0), *await second.consume(10, 1.0)]
        assert {e.partition for e in held} == {0, 1}
        monkeypatch.setattr(schema, "take", counting_take)
        got = await idle.consume(10, 1.0)
        assert got == []
        assert takes <= 3, f"{takes} write transactions in one second of polling with nothing to take"
    finally:
        await first.close()
        await second.close()
        await idle.close()


# ------------------------------------------------------------------------------------------------ file size


async def _burst_consumed(path: Path, consumer: SqliteConsumer) -> int:
    """20 MB written in one burst, then consumed and acked: the backlog is empty again. Returns the size of the
    write-ahead log right after the burst."""
    value = b"x" * 10_000
    await produce(path, [OutgoingMessage("jobs", value, None, token=i) for i in range(2000)], partitions=1)
    wal = file_size(f"{path}-wal")
    got = await drain_until(consumer, lambda got: len(got) >= 2000, deadline_in(20), max_messages=500, ack=True)
    assert len(got) == 2000
    return wal


async def test_compact_command_shrinks_the_file_after_a_burst(tmp_path: Path) -> None:
    """Docs: ``python -m volley_sqlite compact`` "delete[s] acked rows ... and shrink[s] the file"; compaction
    "returns free pages to the file system". ``PRAGMA incremental_vacuum(N)`` run with ``execute`` (even with
    ``fetchall``) frees ONE page in Python's sqlite3: the statement yields no result columns, so the cursor
    steps it once. The file keeps the size of its largest backlog."""
    path = tmp_path / "q.sqlite3"
    consumer = await open_consumer(path, partitions=1)
    try:
        await _burst_consumed(path, consumer)
    finally:
        await consumer.close()
    before = path.stat().st_size
    admin.compact(path)
    with sqlite3.connect(path) as db:
        free = db.execute("PRAGMA freelist_count").fetchone()[0]
    after = path.stat().st_size
    assert after < before / 4, f"compact left the file at {after} bytes (was {before}); {free} free pages in it"


async def test_periodic_compaction_gives_free_pages_back_to_the_file_system(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    consumer = await open_consumer(path, partitions=1, compaction_interval_seconds=0.05)
    try:
        await _burst_consumed(path, consumer)
        before = path.stat().st_size

        def free_pages() -> int:
            with contextlib.closing(sqlite3.connect(path)) as db:
                return int(db.execute("PRAGMA freelist_count").fetchone()[0])

        start = free_pages()
        deadline = time.monotonic() + 5  # 100 compactions at the 0.05 s interval
        while free_pages() > 100 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert free_pages() <= 100, (f"free pages: {start} after the burst, {free_pages()} after ~100 compactions "
                                     f"(file {before} -> {path.stat().st_size} bytes)")
    finally:
        await consumer.close()


async def test_the_write_ahead_log_shrinks_back_after_a_burst(tmp_path: Path) -> None:
    """Docs: "a file's size follows its backlog, not its history" and compaction "checkpoints the write-ahead
    log". While workers run, the -wal file keeps the size of the largest burst ever written: checkpoints rewind it
    but nothing truncates it (no ``journal_size_limit``, PASSIVE checkpoints only)."""
    path = tmp_path / "q.sqlite3"
    wal = Path(f"{path}-wal")
    consumer = await open_consumer(path, partitions=1, compaction_interval_seconds=0.05)
    try:
        burst = await _burst_consumed(path, consumer)
        assert burst > 15_000_000
        deadline = time.monotonic() + 5
        while file_size(wal) > 4_000_000 and time.monotonic() < deadline:  # traffic and compactions go on
            await produce(path, records("jobs", 1), partitions=1)
            await drain_until(consumer, lambda got: len(got) >= 1, deadline_in(5), ack=True)
        assert file_size(wal) <= 4_000_000, f"the write-ahead log stays at {file_size(wal)} bytes"
    finally:
        await consumer.close()


# ------------------------------------------------------------------------------------ from the "suspected" list


async def test_an_ack_of_a_message_another_consumer_took_meanwhile_is_reported(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    """An ack of a message this consumer no longer held (another took it after the lease lapsed) matched no row
    and said nothing, although the message may now be processed twice (the RSMQ connector warns)."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 2), partitions=1)
    consumer = await open_consumer(path, partitions=1, ordered=False)
    try:
        got = await consumer.consume(2, 1.0)
        assert len(got) == 2
        with contextlib.closing(sqlite3.connect(path, isolation_level=None)) as db:  # another worker took one
            db.execute("UPDATE volley_messages SET owner = 'someone-else' WHERE id = ?", (got[0].position,))
        with caplog.at_level("WARNING", logger="volley_sqlite"):
            await consumer.ack(got)
        assert "1 acknowledged message(s) were no longer held by this consumer" in caplog.text
    finally:
        await consumer.close()


async def test_a_message_whose_ack_and_give_back_both_failed_comes_back(tmp_path: Path) -> None:
    """An ack that fails (another process holds the write lock past busy_timeout) queues a give-back behind it;
    when that failed too, nothing tried again: the row stayed leased to the live consumer, its heartbeat renewing
    it, and no consumer ever took it again until the process stopped (found by a review, session 38)."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 1), partitions=1)
    a = await open_consumer(path, partitions=1, vt=0.6, busy_timeout_seconds=0.2)
    b = await open_consumer(path, partitions=1, vt=0.6, busy_timeout_seconds=0.3)
    blocker = sqlite3.connect(path, isolation_level=None, timeout=5)
    try:
        got = await a.consume(1, 1.0)
        assert len(got) == 1
        blocker.execute("BEGIN IMMEDIATE")  # a long compaction or backup in another process
        with pytest.raises(sqlite3.OperationalError):
            await a.ack(got)  # the engine then says the message will be delivered again
        db = a._db
        assert db is not None
        with contextlib.suppress(sqlite3.OperationalError):  # queued after the give-back: that one was tried too
            await db.call(lambda conn: None)
        blocker.execute("ROLLBACK")  # the lock comes free
        deadline = time.monotonic() + 10.0
        again: list[Any] = []
        while not again:
            assert time.monotonic() < deadline, "the message never came back"
            again = [*await b.consume(1, 0.1), *await a.consume(1, 0.1)]
        assert [e.value for e in again] == [got[0].value]
    finally:
        blocker.close()
        await a.close()
        await b.close()


async def test_a_record_the_queue_cannot_take_fails_alone_as_an_invalid_record(tmp_path: Path) -> None:
    """One record with a partition its queue lacks (or a header name over 64 KiB) failed every record of the
    produce call, as ValueError: the engine retried them all, then gave the input back and stopped the app. The
    memory and Kafka producers report the bad record alone, as InvalidRecordError (found by a review, session 38)."""
    path = tmp_path / "q.sqlite3"
    producer = SqliteConnector().create_producer(spec(path, role="output", partitions=2))
    await producer.start()
    try:
        batch = [OutgoingMessage("jobs", b"good-1", None, token=1),
                 OutgoingMessage("jobs", b"bad", None, partition=9, token=2),
                 OutgoingMessage("jobs", b"good-2", None, token=3),
                 OutgoingMessage("jobs", b"long", None, {"x" * 70_000: b"1"}, token=4),
                 # refused when SQLite binds them, after good rows of the batch were inserted (review 38: those
                 # were then inserted a second time)
                 OutgoingMessage("jobs", "not-utf-8-\udc80", None, token=5),  # type: ignore[arg-type]
                 OutgoingMessage("jobs", {"a": 1}, None, token=6),  # type: ignore[arg-type]
                 OutgoingMessage("jobs", b"good-3", None, token=7)]
        recorder = DeliveryRecorder()
        producer.produce(batch, recorder)
        assert await recorder.wait_for(len(batch), deadline_in(5))
        assert {m.token: type(exc).__name__ for m, exc in recorder.failed} == dict.fromkeys((2, 4, 5, 6),
                                                                                            "InvalidRecordError")
        assert sorted(m.token for m in recorder.delivered) == [1, 3, 7]
    finally:
        await producer.close()
    assert sorted(m.value for m in admin.messages(str(path), "jobs")) == [b"good-1", b"good-2", b"good-3"]


def test_the_engine_dead_letters_an_output_to_a_partition_its_queue_lacks(tmp_path: Path) -> None:
    """As on the memory broker: that input goes to the DLQ at stage output, the others are handled."""
    from volley import Engine

    database = str(tmp_path / "app.sqlite3")
    config = {"path": database, "partitions": 2}
    app = Engine(
        app_name="router", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
        queue_config={"in": {"value": "in", "profile": "sqlite", "config": config},
                      "out": {"value": "out", "profile": "sqlite", "config": config},
                      "dlq": {"value": "in-dlq", "profile": "sqlite-dlq", "config": config}},
        metrics_port=None, poll_interval_seconds=0.02, redelivery_delay_seconds=0.0,
        retry_backoff_seconds=0.01, retry_backoff_max_seconds=0.02,
    )

    @app.stream_app
    def route(message: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        return [("out", message, {"partition": 7 if message["n"] == 3 else 0})]

    admin.publish(database, "in", [f'{{"n": {i}}}'.encode() for i in range(6)], partitions=2)
    report = route.run_until_drained(timeout=30, drain_idle_seconds=0.2)
    dead = admin.messages(database, "in-dlq")
    assert [m.value for m in dead] == [b'{"n": 3}']
    assert dead[0].headers is not None and dead[0].headers.get("volley-error-stage") == b"output", dead[0].headers
    assert dead[0].headers["volley-error-reason"].endswith(b"sqlite queue 'out' refused a record: it has 2 "
                                                           b"partition(s), not 7")
    assert report.acked == 5 and report.dead_lettered == 1, report


async def test_a_chore_set_practically_never_does_not_kill_the_database_thread(tmp_path: Path) -> None:
    """compaction_interval_seconds 1e10 with the heartbeat off: the idle wait was longer than a condition takes,
    the OverflowError killed the database thread, and every later operation on the file hung (found by a review,
    session 38)."""
    path = tmp_path / "q.sqlite3"
    consumer = await open_consumer(path, partitions=1, heartbeat=False, compaction_interval_seconds=1e10)
    try:
        await asyncio.wait_for(consumer.consume(1, 0.1), 5.0)  # idle: the thread now waits for its next chore
        await produce(path, records("jobs", 1), partitions=1)
        got = await asyncio.wait_for(consumer.consume(1, 2.0), 5.0)
        assert len(got) == 1
        assert consumer._db is not None and consumer._db._thread.is_alive()
    finally:
        await asyncio.wait_for(consumer.close(), 15.0)


async def test_an_operations_own_fault_does_not_fail_the_others_committed_with_it(tmp_path: Path) -> None:
    """Only some exceptions undid the one operation that raised them; any other (struct.error, sqlite3.DataError)
    failed the whole group, other consumers' acks with it (found by a review, session 38)."""
    from volley_sqlite import database as databases

    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 1), partitions=1)
    consumer = await open_consumer(path, partitions=1)
    gate, busy = threading.Event(), threading.Event()
    try:
        got = await consumer.consume(1, 1.0)
        db = consumer._db
        assert db is not None and len(got) == 1

        def hold(_conn: object) -> None:
            busy.set()
            gate.wait(10)

        def broken(_conn: object) -> None:
            raise struct.error("argument out of range")

        db.submit(databases.Operation(hold, lambda _r, _e: None))
        deadline = time.monotonic() + 5.0
        while not busy.is_set():
            assert time.monotonic() < deadline
            await asyncio.sleep(0.01)
        ack = asyncio.ensure_future(consumer.ack(got))
        await asyncio.sleep(0)  # the ack is queued behind the busy thread
        failing = db.call(broken)  # in the same group as the ack
        gate.set()
        with pytest.raises(struct.error):
            await failing
        await ack  # it raised with the other operation's error before
        assert admin.messages(str(path), "jobs") == []
    finally:
        gate.set()
        await consumer.close()


async def test_a_consume_cancelled_as_its_result_arrives_gives_the_messages_back(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Cancelled after the take's future had its result and before the consume resumed: the result was dropped
    and, the future not being cancelled, nothing gave the messages back: they stayed leased to the consumer, its
    heartbeat renewing them, their delivery counted (found by a review, session 38)."""
    from volley_sqlite import database as databases

    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 3), partitions=1)
    consumer = await open_consumer(path, partitions=1, vt=0.6)
    task: asyncio.Task[Any] | None = None
    resolve = databases._resolve_future

    def resolve_then_cancel(future: Any, result: Any, error: Any, abandoned: Any = None) -> None:
        resolve(future, result, error, abandoned)
        if abandoned is not None and task is not None and not task.done():
            task.cancel()  # shutdown, or a wait_for around consume timing out, at this very moment

    monkeypatch.setattr(databases, "_resolve_future", resolve_then_cancel)
    try:
        task = asyncio.ensure_future(consumer.consume(3, 1.0))
        with pytest.raises(asyncio.CancelledError):
            await task
        monkeypatch.setattr(databases, "_resolve_future", resolve)
        deadline = time.monotonic() + 3.0  # five visibility timeouts
        got: list[Any] = []
        while len(got) < 3:
            assert time.monotonic() < deadline, f"got {len(got)} of 3 back"
            got += await consumer.consume(3, 0.1)
        assert [e.attempt for e in got] == [1, 1, 1]  # handed out once, never handled: not counted
    finally:
        await consumer.close()


async def test_a_large_compaction_is_done_in_parts_with_other_work_between(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A consumer's compaction deleted every retained row past its retention in one transaction on the database
    thread (millions at a high rate with retention on): takes, acks and produces of the process, and every other
    process's writes, waited seconds for it. Now at most COMPACT_ROWS per transaction, and the next part right
    after the work queued meanwhile (found by a review, session 38)."""
    monkeypatch.setattr(schema, "COMPACT_ROWS", 100)
    path = tmp_path / "q.sqlite3"
    db = schema.connect(str(path), "off")
    schema.ensure_queue(db, "jobs", 1)
    old = time.time() - 3600
    db.executemany("INSERT INTO volley_messages (queue, partition, value, created_at, visible_at, acked_at) "
                   "VALUES ('jobs', 0, ?, ?, ?, ?)", [(b"x", old, old, old + i * 0.001) for i in range(350)])
    db.close()
    statements = trace_statements(monkeypatch)
    consumer = await open_consumer(path, partitions=1, retention_seconds=60, compaction_interval_seconds=3600)
    try:
        deadline = time.monotonic() + 10.0
        while True:
            with sqlite3.connect(path) as check:
                left = check.execute("SELECT count(*) FROM volley_messages").fetchone()[0]
            if left == 0:
                break
            assert time.monotonic() < deadline, f"{left} retained rows left after the compaction at the start"
            await asyncio.sleep(0.02)
        parts = [s for s in statements if s.startswith("DELETE FROM volley_messages WHERE id IN")]
        assert len(parts) == 4, parts  # 100, 100, 100, 50
    finally:
        await consumer.close()
