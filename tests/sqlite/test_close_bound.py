"""Closing while another process holds the write lock returns within close_timeout_seconds.

Before, a consumer's close waited for its give-back through the whole busy timeout (30 s by default) and then
for the database thread (up to 30 s more), and a producer's close flushed for busy timeout + 30 s: a worker asked
to stop hung for about a minute behind a ``sqlite3`` shell, a backup or a stuck process. The lock is held here by
a second connection (``BEGIN IMMEDIATE``), which is what another process does; the busy timeout stays at its
default, so a close that waits for it cannot finish within the tests' deadline.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from pathlib import Path

import pytest
from sqlite_parts import open_consumer, produce, records, spec

from volley.errors import ConfigurationError
from volley.testing.contract import DeliveryRecorder
from volley_sqlite import SqliteConnector, admin

BOUND = 0.5  # close_timeout_seconds
DEADLINE = 15.0  # well below the busy timeout (30 s): a close that waits for it fails the test


async def wait_until(condition: object, seconds: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + seconds
    while not condition():  # type: ignore[operator]
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.02)


def held(path: Path) -> int:
    return admin.stats(path)["jobs"]["held"]


async def test_a_consumer_closes_within_its_bound_while_the_write_lock_is_held_elsewhere(
    tmp_path: Path, caplog: pytest.LogCaptureFixture,
) -> None:
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 5), partitions=1)
    consumer = await open_consumer(path, partitions=1, close_timeout_seconds=BOUND, vt=60)
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        taken = await consumer.consume(5, 1.0)
        assert len(taken) == 5
        locker.execute("BEGIN IMMEDIATE")  # another process writes (or sits in a transaction)
        with caplog.at_level(logging.WARNING, logger="volley_sqlite"):
            await asyncio.wait_for(consumer.close(), DEADLINE)
        assert "were not given back within close_timeout_seconds" in caplog.text, caplog.text
        locker.execute("COMMIT")
        # What could not be done in time is still done once the lock comes free (within the busy timeout):
        # the messages are given back now, not after vt.
        await wait_until(lambda: held(path) == 0, DEADLINE, "the held messages to be given back")
        assert admin.stats(path)["jobs"]["ready"] == 5
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()


async def test_a_producer_closes_within_its_bound_while_the_write_lock_is_held_elsewhere(tmp_path: Path) -> None:
    path = tmp_path / "q.sqlite3"
    await produce(path, records("jobs", 1), partitions=1)  # the file and the queue exist
    producer = SqliteConnector().create_producer(spec(path, role="output", close_timeout_seconds=BOUND))
    await producer.start()
    locker = sqlite3.connect(path, isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        recorder = DeliveryRecorder()
        messages = records("jobs", 3, start=1)
        producer.produce(messages, recorder)
        with pytest.raises(TimeoutError, match="not committed"):
            await asyncio.wait_for(producer.close(), DEADLINE)
        locker.execute("COMMIT")
        await wait_until(lambda: recorder.delivered or recorder.failed, DEADLINE, "the write's delivery report")
        recorder.assert_all_delivered(messages)  # committed once the lock came free, and reported
    finally:
        if locker.in_transaction:
            locker.execute("ROLLBACK")
        locker.close()


def test_a_close_timeout_of_zero_is_refused_at_construction(tmp_path: Path) -> None:
    """0 was accepted: every close then gave up at once, logged that the write lock was held elsewhere when
    nothing held it, and left the give-back to a daemon thread that an exiting process cut short."""
    with pytest.raises(ConfigurationError, match="close_timeout_seconds must be positive"):
        SqliteConnector().create_consumer(spec(tmp_path / "q.sqlite3", close_timeout_seconds=0))
