"""The sqlite connector's own behaviour: leases and heartbeats, restarts, shared partitions, compaction, settings."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import textwrap
import time
from collections.abc import Sequence
from pathlib import Path

import pytest
from sqlite_parts import open_consumer, produce, records, spec

from volley.errors import ConfigurationError
from volley.message import Envelope, OutgoingMessage
from volley.testing.contract import DeliveryRecorder, assert_exactly_once, assert_in_order, deadline_in, drain_until
from volley_sqlite import PATH_ENV, SqliteConnector, SqliteProducer, admin, parse_settings

# ---------------------------------------------------------------------------------------------- leases


async def test_a_consumer_that_stops_heart_beating_loses_its_messages_after_the_visibility_timeout(
    tmp_path: Path,
) -> None:
    path = tmp_path / "q.sqlite3"
    vt = 0.6
    await produce(path, records("jobs", 5), partitions=1)
    silent = await open_consumer(path, heartbeat=False, vt=vt, ordered=False)
    other = await open_consumer(path, vt=30, ordered=False)
    try:
        taken = await drain_until(silent, lambda got: len(got) >= 5, deadline_in(5))
        taken_at = time.monotonic()
        assert [e.attempt for e in taken] == [1] * 5
        # Its registration lapsed with its leases: nothing tells it from a consumer that died, so its deliveries
        # come again one at a time, each once the one before it is settled (volley_sqlite.recovery).
        again: list[Envelope] = []
        while len(again) < 5:
            if again and len(again) < 5:
                await other.ack(again[-1:])
            one = await drain_until(other, lambda got: len(got) >= 1, deadline_in(10), poll_timeout=0.05)
            assert len(one) == 1, f"{len(one)} messages of a lapsed consumer handed out together"
            again += one
        waited = time.monotonic() - taken_at
        assert_exactly_once(again, [e.value for e in taken])
        assert waited >= 0.9 * vt, f"the lease ended after {waited:.2f} s, before the visibility timeout of {vt} s"
        assert [e.attempt for e in again] == [2] * 5
        # The lapsed consumer's late ack does not settle the other consumer's delivery.
        await silent.ack(taken)
        assert admin.stats(path)["jobs"]["held"] == 1
        await other.ack(again[-1:])
        assert admin.stats(path)["jobs"] == {"ready": 0, "delayed": 0, "held": 0, "acked": 0}
    finally:
        await silent.close()
        await other.close()


async def test_a_live_consumer_keeps_its_messages_past_the_visibility_timeout(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    vt = 0.5
    await produce(path, records("jobs", 5), partitions=1)
    live = await open_consumer(path, vt=vt, ordered=False)
    other = await open_consumer(path, vt=vt, ordered=False)
    try:
        taken = await drain_until(live, lambda got: len(got) >= 5, deadline_in(5))
        # Watch for four visibility timeouts: the heartbeat must renew the leases all along.
        await produce(path, [OutgoingMessage("jobs", b"sentinel", token="s")])
        seen = await drain_until(other, lambda _got: False, deadline_in(4 * vt), poll_timeout=0.05)
        assert [e.value for e in seen] == [b"sentinel"], "a live consumer's messages went to another consumer"
        await other.ack(seen)
        await live.ack(taken)
        assert admin.stats(path)["jobs"] == {"ready": 0, "delayed": 0, "held": 0, "acked": 0}
    finally:
        await live.close()
        await other.close()


KILLED_CONSUMER = textwrap.dedent("""
    import asyncio, os, sys
    from volley.ports import QueueSpec
    from volley_sqlite import SqliteConnector

    async def main():
        spec = QueueSpec(name="jobs", value="jobs", connector="sqlite",
                         config={"path": sys.argv[1], "vt": float(sys.argv[2])})
        consumer = SqliteConnector().create_consumer(spec)
        await consumer.start()
        got = []
        while len(got) < 3:
            got += await consumer.consume(10, 1.0)
        print(",".join(str(e.attempt) for e in got), flush=True)
        os._exit(0)  # no close, no ack: as kill -9 would leave it

    asyncio.run(main())
""")


async def test_delivery_count_and_leases_survive_a_process_that_died(tmp_path: Path) -> None:
    """A process takes three messages and dies; after its lease they come back here with attempt 2 (then 3): one
    at a time, each once the one before it is settled, since any of them may be what killed it (recovery)."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 3, key=b"k"))
    vt = 1.0
    started = time.monotonic()
    done = await asyncio.to_thread(subprocess.run, [sys.executable, "-c", KILLED_CONSUMER, str(path), str(vt)],
                                   capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "1,1,1"
    consumer = await open_consumer(path)
    try:
        again: list[Envelope] = []
        for _ in range(3):
            one = await drain_until(consumer, lambda got: len(got) >= 1, deadline_in(10))
            assert len(one) == 1, f"{len(one)} messages of a dead consumer handed out together"
            again += one
            await consumer.nack(one, 0.0)  # a give-back settles it (it is no longer a suspect): the next comes
        assert time.monotonic() - started >= 0.9 * vt
        assert [e.attempt for e in again] == [2, 2, 2]
        assert_in_order(again, lambda e: e.partition)
    finally:
        await consumer.close()
    # A new connector on the same file (this process had closed the database): the count goes on.
    consumer = await open_consumer(path)
    try:
        third = await drain_until(consumer, lambda got: len(got) >= 3, deadline_in(10))
        assert [e.attempt for e in third] == [3, 3, 3]
        assert [e.value for e in third] == [b"m-00000", b"m-00001", b"m-00002"]
        await consumer.ack(third)
    finally:
        await consumer.close()


# ---------------------------------------------------------------------------------------------- partitions


async def test_ordered_partitions_are_shared_fairly_and_handed_over_in_order(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    first = await open_consumer(path, partitions=4)
    second = await open_consumer(path, partitions=4)
    messages = [OutgoingMessage("jobs", f"m-{i:05d}".encode(), f"key-{i % 8}".encode(), token=i) for i in range(80)]
    await produce(path, messages)
    try:
        got_first = await first.consume(500, 1.0)
        got_second = await second.consume(500, 1.0)
        partitions_first = {e.partition for e in got_first}
        partitions_second = {e.partition for e in got_second}
        assert len(partitions_first) == 2 and len(partitions_second) == 2, (partitions_first, partitions_second)
        assert not partitions_first & partitions_second
        assert_exactly_once([*got_first, *got_second], [m.value for m in messages])
        # While the first holds its partitions, nothing more of them goes to the second...
        await produce(path, [OutgoingMessage("jobs", b"late", next(iter(_keys_in(got_first))), token="late")])
        assert await second.consume(500, 0.3) == []
        # ...and once the first has settled them and left, the second takes everything, in order.
        await first.ack(got_first)
        await first.close()
        rest = await drain_until(second, lambda got: any(e.value == b"late" for e in got), deadline_in(5))
        assert [e.value for e in rest] == [b"late"]
        await second.ack([*got_second, *rest])
    finally:
        await first.close()
        await second.close()


def _keys_in(envelopes: Sequence[Envelope]) -> list[bytes]:
    return [e.key for e in envelopes if e.key is not None]


async def test_a_queue_keeps_the_partition_count_it_was_created_with(tmp_path: Path,
                                                                     caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 4), partitions=2)
    consumer = await open_consumer(path, partitions=8)
    try:
        got = await drain_until(consumer, lambda got: len(got) >= 4, deadline_in(5))
        assert {e.partition for e in got} == {0, 1}
        assert "has 2 partition(s)" in caplog.text
        await consumer.ack(got)
    finally:
        await consumer.close()


# ---------------------------------------------------------------------------------------------- retention


async def test_acked_rows_are_kept_for_their_retention_then_compacted(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 50))
    consumer = await open_consumer(path, retention_seconds=0.5, compaction_interval_seconds=0.1)
    try:
        got = await drain_until(consumer, lambda got: len(got) >= 50, deadline_in(5))
        await consumer.ack(got)
        assert admin.stats(path)["jobs"]["acked"] == 50
        assert sum(m.acked for m in admin.messages(path, "jobs")) == 50
        deadline = deadline_in(10)
        while admin.stats(path)["jobs"]["acked"]:
            assert time.monotonic() < deadline, "acked rows were never compacted"
            await asyncio.sleep(0.05)
        assert admin.messages(path, "jobs") == []
    finally:
        await consumer.close()


async def test_the_file_does_not_grow_with_traffic(tmp_path: Path) -> None:
    """Acked rows are deleted and their pages reused: ten rounds of traffic need no more room than one."""
    path = tmp_path / "q.sqlite3"
    consumer = await open_consumer(path)
    producer = SqliteConnector().create_producer(spec(path, role="output"))
    await producer.start()
    payload = b"x" * 1000
    sizes = []
    try:
        for round_number in range(10):
            messages = [OutgoingMessage("jobs", payload + str(i).encode(), token=i) for i in range(1000)]
            recorder = DeliveryRecorder()
            producer.produce(messages, recorder)
            await producer.flush(10)
            recorder.assert_all_delivered(messages)
            got = await drain_until(consumer, lambda got: len(got) >= 1000, deadline_in(10), max_messages=500)
            assert len(got) == 1000, f"round {round_number}"
            await consumer.ack(got)
            sizes.append(path.stat().st_size)
        assert admin.compact(path) == 0
        assert max(sizes[3:]) <= 1.2 * max(sizes[:3]), f"the file grew: {sizes}"
        assert path.stat().st_size <= max(sizes)
    finally:
        await producer.close()
        await consumer.close()


# ---------------------------------------------------------------------------------------------- settings


def test_settings_defaults_environment_and_mistakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv(PATH_ENV, raising=False)
    defaults = parse_settings({}, "q")
    assert (defaults.path, defaults.partitions, defaults.synchronous, defaults.visibility_timeout_seconds) == (
        "volley.sqlite3", 4, "full", 30.0)
    monkeypatch.setenv(PATH_ENV, str(tmp_path / "env.sqlite3"))
    assert parse_settings({}, "q").path == str(tmp_path / "env.sqlite3")
    assert parse_settings({"path": "x.db", "vt": 5, "ordered": "false", "synchronous": "NORMAL"}, "q") == (
        parse_settings({"path": "x.db", "visibility_timeout_seconds": 5.0, "ordered": False,
                        "synchronous": "normal"}, "q"))
    for config, message in (
        ({"nope": 1}, "unknown config key"),
        ({"partitions": 0}, "partitions must be a positive integer"),
        ({"partitions": 1.5}, "partitions must be a positive integer"),
        ({"vt": 0}, "vt must be positive"),
        ({"vt": "soon"}, "vt must be a number of seconds"),
        ({"synchronous": "extra"}, "synchronous must be one of full, normal, off"),
        ({"heartbeat": "maybe"}, "heartbeat must be true or false"),
        # found by a review, session 38: accepted before, and each did something else than asked
        ({"vt": True}, "vt must be a number of seconds"),  # read as 1 s
        ({"busy_timeout_seconds": 5_000_000}, "busy_timeout_seconds must be at most 2147483"),  # became 0 ms
        ({"delay": -1}, "delay must be 0 or more"),
        ({"vt": 5, "visibility_timeout_seconds": 60}, "the same setting"),  # one of them won silently
    ):
        with pytest.raises(ConfigurationError, match=message):
            parse_settings(config, "q")


async def test_an_unusable_path_fails_at_start(tmp_path: Path) -> None:
    consumer = SqliteConnector().create_consumer(spec(tmp_path / "missing-dir" / "q.sqlite3"))
    with pytest.raises(ConfigurationError, match="cannot open the sqlite queue database"):
        await consumer.start()
    producer = SqliteConnector().create_producer(spec(tmp_path / "missing-dir" / "q.sqlite3", role="output"))
    with pytest.raises(ConfigurationError, match="cannot open the sqlite queue database"):
        await producer.start()


def test_command_line_publish_and_stats(tmp_path: Path) -> None:
    path = tmp_path / "cli.sqlite3"
    env = {**os.environ, PATH_ENV: str(path)}
    published = subprocess.run([sys.executable, "-m", "volley_sqlite", "publish", "orders", '{"a": 1}', '{"a": 2}',
                                "--key", "k"], env=env, capture_output=True, text=True, check=True, timeout=60)
    assert "published 2 message(s) to orders" in published.stdout
    shown = subprocess.run([sys.executable, "-m", "volley_sqlite", "stats"], env=env, capture_output=True, text=True,
                           check=True, timeout=60)
    assert "orders ready=2 delayed=0 held=0 acked=0" in shown.stdout
    assert admin.values(path, "orders") == [b'{"a": 1}', b'{"a": 2}']


def test_producer_reports_nothing_before_start(tmp_path: Path) -> None:
    producer: SqliteProducer = SqliteConnector().create_producer(spec(tmp_path / "q.sqlite3", role="output"))
    with pytest.raises(RuntimeError, match="not started"):
        producer.produce(records("jobs", 1), DeliveryRecorder())


async def test_a_cancelled_consume_gives_its_messages_back(tmp_path: Path) -> None:
    """A consume cancelled while its take runs (a shutdown, a timeout) must not leave messages leased to nobody."""
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 20))
    consumer = await open_consumer(path)
    try:
        cancelled = 0
        for _ in range(50):  # cancel at once, so that the take is still queued or running on the database thread
            task = asyncio.ensure_future(consumer.consume(100, 0.0))
            await asyncio.sleep(0)
            task.cancel()
            try:
                got = await task
            except asyncio.CancelledError:
                cancelled += 1
            else:
                await consumer.nack(got, 0.0)
        assert cancelled
        again = await drain_until(consumer, lambda got: len(got) >= 20, deadline_in(5))
        assert_exactly_once(again, [m.value for m in records("jobs", 20)])
        await consumer.ack(again)
    finally:
        await consumer.close()


def test_a_queue_is_located_by_its_database_file(tmp_path: Path) -> None:
    """volley.ports.LocatingConnector: what names a queue's dead-letter journal besides its name (review 38)."""
    connector = SqliteConnector()
    here = connector.locate(spec(tmp_path / "a.sqlite3"))
    assert here == connector.locate(spec(tmp_path / "." / "a.sqlite3", partitions=3))
    assert here != connector.locate(spec(tmp_path / "b.sqlite3"))
