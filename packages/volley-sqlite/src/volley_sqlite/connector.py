"""The ``sqlite`` connector's consumer and producer. Neither ever calls SQLite on the event loop.

Both hand their work to the :class:`~volley_sqlite.database.Database` of their
file (one connection and one thread per file and process) and await the
result. Volley's ports are protocols: nothing here inherits from the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import operator
import os
import sqlite3
import threading
import time
import uuid
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from volley.errors import InvalidRecordError
from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryCallback, DeliveryFailure, QueueSpec
from volley_sqlite import database as databases
from volley_sqlite import schema
from volley_sqlite.browse import SqliteBrowser
from volley_sqlite.database import Database, Lessee, open_database
from volley_sqlite.settings import SqliteSettings, parse_settings

logger = logging.getLogger("volley_sqlite")
_position = operator.attrgetter("position")
# What a record itself can make SQLite or the row encoding refuse (a partition out of range, a header name or value
# over 64 KiB, a blob over SQLite's limit, text that is not UTF-8, a value of a type it cannot bind): that record
# fails alone. (ProgrammingError is what binding an unsupported type raises; the insert is the only statement here.)
RECORD_ERRORS = (*databases.OWN_FAULTS, sqlite3.ProgrammingError)
GIVE_BACK_RETRY_SECONDS = 1.0  # a give-back that failed (the write lock held elsewhere) is tried again this soon
_NOTHING = schema.Taken([])  # what a take gives when the probe found nothing ready (its list is never handed out)


class SqliteConsumer:
    """Consumes one queue of a database file, with leases renewed while messages are in flight.

    Satisfies ``volley.ports.Consumer``, ``Drainable`` and ``DepthReporter``.
    """

    def __init__(self, queue: str, settings: SqliteSettings) -> None:
        self.queue = queue
        self.settings = settings
        self.owner = uuid.uuid4().hex  # this consumer's deliveries carry it; never reused
        self._db: Database | None = None
        self._partitions = settings.partitions
        self._wakeup: asyncio.Event | None = None
        self._closed = False
        self._suspects = False
        """The last take found suspects (``recovery``): they come one at a time, each once this consumer holds
        nothing else, so its settles wake its waiting consume at once (not at the next poll)."""
        self._next_suspects_log = 0.0  # said at most once a minute
        self._alone: int | None = None
        """The suspect this consumer holds: nothing else is leased to it until that one is settled (the take
        cannot tell: once the last suspect is handed out, there are none left to see)."""
        # Handed to the engine and not settled by it yet (an ack or nack, even one that failed): while suspects are
        # about, a suspect is taken only when this is empty.
        self._outstanding: set[int] = set()
        self._opened = 0  # starts so far: a give-back retried behind a close does not outlive it

    async def start(self) -> None:
        if self._db is not None:
            return
        db = await open_database(self.settings)
        self._db = db
        self._opened += 1
        settings = self.settings
        try:
            def join(conn: sqlite3.Connection) -> int:
                schema.join(conn, self.queue, self.owner, settings.visibility_timeout_seconds)
                return db.partitions_of(conn, self.queue, settings.partitions)

            self._partitions = await db.call(join)
        except BaseException:
            self._db = None
            await asyncio.to_thread(databases.release, db)
            raise
        if settings.partitions_explicit and self._partitions != settings.partitions:
            logger.warning("sqlite queue %r has %d partition(s) in %s; config asks for %d (ignored: a queue keeps "
                           "the partition count it was created with)", self.queue, self._partitions, settings.path,
                           settings.partitions)
        self._wakeup = asyncio.Event()
        db.add_waiter(self.queue, self._wakeup)
        db.add_lessee(Lessee(self.queue, self.owner, settings.visibility_timeout_seconds, settings.heartbeat,
                             settings.retention_seconds, settings.compaction_interval_seconds))

    def _require(self) -> Database:
        if self._db is None:
            raise RuntimeError(f"the sqlite consumer of {self.queue!r} is not started (or closed)")
        return self._db

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        db = self._require()
        assert self._wakeup is not None
        queue, owner, limit = self.queue, self.owner, max(1, max_messages)
        lease, ordered, partitions = self.settings.visibility_timeout_seconds, self.settings.ordered, self._partitions
        heartbeat = self.settings.heartbeat
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)

        outstanding = self._outstanding

        def run(conn: sqlite3.Connection) -> schema.Taken:
            return schema.lease_out(conn, queue, owner, limit, lease, ordered, partitions, heartbeat,
                                    holding=bool(outstanding))

        def probe(conn: sqlite3.Connection) -> bool:
            return schema.anything_ready(conn, queue, partitions, owner if ordered else None)

        def abandoned(taken: schema.Taken) -> None:
            """A consume cancelled while its take ran: those messages are leased to us; give them back now."""
            if taken.envelopes and self._db is db:
                self._give_back_behind(db, [e.position for e in taken.envelopes], 0.0, undelivered=True)

        while True:
            self._wakeup.clear()
            if self._alone is None:
                pending = db.call(run, probe=probe, empty=_NOTHING, abandoned=abandoned)
                try:
                    taken = await pending
                except asyncio.CancelledError:
                    # Cancelled after the take's result arrived and before this task resumed: the future was not
                    # cancelled (so ``abandoned`` did not run), and the messages are leased to us. Give them back.
                    if pending.done() and not pending.cancelled() and pending.exception() is None:
                        abandoned(pending.result())
                    raise
                if taken.suspects and not self._suspects and loop.time() >= self._next_suspects_log:
                    self._next_suspects_log = loop.time() + 60.0
                    logger.warning("sqlite queue %r: a consumer died holding messages; any of them may be what killed "
                                   "it, so they are handed out one at a time, before the others of their partitions",
                                   queue)
                self._suspects = taken.suspects
                if taken.envelopes:
                    if taken.suspects:
                        self._alone = taken.envelopes[0].position
                    outstanding.update(map(_position, taken.envelopes))
                    return taken.envelopes
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            # Writers in this process wake us at once; other processes' writes are seen at the next poll.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wakeup.wait(), min(remaining, self.settings.poll_interval_seconds))

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        if not envelopes:
            return
        db = self._require()
        ids = list(map(_position, envelopes))
        owner, retention = self.owner, self.settings.retention_seconds
        try:
            settled = await db.call(lambda conn: schema.settle(conn, owner, ids, retention))
        except BaseException:
            # The engine takes them as given back ("delivered again"): they must not stay leased to us, renewed by
            # the heartbeat for ever. Given back as soon as the database takes it (it may be what failed).
            self._give_back_behind(db, ids, 0.0)
            raise
        finally:
            self._settled(ids)  # even when it failed: a consumer must not wait for a settle that never comes
        if settled < len(ids):
            logger.warning("sqlite queue %r: %d acknowledged message(s) were no longer held by this consumer (another "
                           "took them after their lease lapsed, or they were deleted); they may be processed twice",
                           self.queue, len(ids) - settled)

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        if not envelopes:
            return
        db = self._require()
        ids = list(map(_position, envelopes))
        owner = self.owner
        try:
            await db.call(lambda conn: schema.give_back(conn, owner, ids, delay),
                          wakes=self.queue if delay <= 0 else None)
        except BaseException:  # tried once more behind (see ack): not leased to us, renewed, for ever
            self._give_back_behind(db, ids, delay)
            raise
        finally:
            self._settled(ids)

    def _give_back_behind(self, db: Database, ids: Sequence[int], delay: float, undelivered: bool = False,
                          failures: int = 0) -> None:
        """On the loop: queue a give-back without waiting for it: of deliveries whose settle failed, or, with
        ``undelivered``, of a take a cancelled consume never handed out. The database may be what failed (its write
        lock held elsewhere): a give-back that fails too is tried again, after GIVE_BACK_RETRY_SECONDS doubling up to
        a minute, until this consumer closes (its heartbeat renews whatever it holds; close gives back all of it)."""
        owner, opened = self.owner, self._opened
        loop = asyncio.get_running_loop()
        wait = min(GIVE_BACK_RETRY_SECONDS * 2 ** min(failures, 6), 60.0)

        def again() -> None:
            if self._db is db and self._opened == opened:  # not closed (and started again) meanwhile
                self._give_back_behind(db, ids, delay, undelivered, failures + 1)

        def done(_result: Any, error: BaseException | None) -> None:
            if error is None:
                return
            logger.warning("sqlite queue %r: giving back %d message(s) failed (%s); trying again in %.0f s",
                           self.queue, len(ids), error, wait)
            with contextlib.suppress(RuntimeError):  # that loop is closed: so is this consumer
                loop.call_soon_threadsafe(loop.call_later, wait, again)

        with contextlib.suppress(RuntimeError):  # closed meanwhile: close gives back everything
            db.submit(databases.Operation(lambda conn: schema.give_back(conn, owner, ids, delay, undelivered),
                                          done, wakes=self.queue))

    def _settled(self, ids: Sequence[int]) -> None:
        """While suspects are about, a settle may let this consumer take the next one: its consume looks again now."""
        self._outstanding.difference_update(ids)
        if self._alone is not None and self._alone in ids:
            self._alone = None
        if self._suspects and self._wakeup is not None:
            self._wakeup.set()

    async def close(self) -> None:
        """Give back whatever is still held, at once (another consumer may take it), and leave the queue.

        Within ``close_timeout_seconds``: past it (another process holds the write lock) the give-back stays
        queued and runs if the lock comes free within the busy timeout; else the leases lapse after ``vt``."""
        db, self._db = self._db, None
        if db is None:
            return
        db.remove_lessee(self.owner)  # no more heartbeats: what is not given back comes back after vt at the latest
        if self._wakeup is not None:
            db.remove_waiter(self.queue, self._wakeup)
        queue, owner, suspect = self.queue, self.owner, self._alone
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.close_timeout_seconds

        def leave(conn: sqlite3.Connection) -> None:
            if suspect is not None:  # its handling did not finish: it stays a suspect (handed out alone again)
                schema.leave_with_suspect(conn, queue, owner, suspect)
                return
            schema.give_back(conn, owner, None, 0.0)
            schema.leave(conn, queue, owner)

        try:
            await asyncio.wait_for(db.call(leave, wakes=queue), self.settings.close_timeout_seconds)
        except TimeoutError:
            logger.warning("sqlite queue %r: the messages this consumer held were not given back within "
                           "close_timeout_seconds (%.1f s; the write lock of %s is held elsewhere); they are given "
                           "back if it comes free within the busy timeout, else delivered again after vt (%.1f s)",
                           queue, self.settings.close_timeout_seconds, self.settings.path,
                           self.settings.visibility_timeout_seconds)
        finally:
            await asyncio.to_thread(databases.release, db, max(0.0, give_up_at - loop.time()))

    async def depth(self) -> int:
        queue = self.queue
        return await self._require().call(lambda conn: schema.depth(conn, queue), read_only=True)

    def is_drained(self) -> bool:
        """Asked off the event loop: nothing ready or delayed, nothing held by this consumer."""
        db = self._db
        if db is None:
            return True
        queue, owner = self.queue, self.owner
        return db.call_blocking(lambda conn: schema.is_drained(conn, queue, owner), timeout=30.0, read_only=True)


class SqliteProducer:
    """Writes to any queue of one database file; a record is reported delivered once its transaction committed.

    Satisfies ``volley.ports.Producer``.
    """

    def __init__(self, settings: SqliteSettings) -> None:
        self.settings = settings
        self._db: Database | None = None
        self._lock = threading.Lock()
        self._pending = 0
        self._idle = threading.Event()
        self._idle.set()

    async def start(self) -> None:
        if self._db is None:
            self._db = await open_database(self.settings)

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        """On the event loop: queue the batch for the database thread and return at once."""
        db = self._db
        if db is None:
            raise RuntimeError("the sqlite producer is not started (or closed)")
        if not messages:
            return
        batch = list(messages)
        create_with, default_delay = self.settings.partitions, self.settings.delay

        def run(conn: sqlite3.Connection) -> tuple[list[OutgoingMessage], list[DeliveryFailure]]:
            """Store the records; one the queue cannot take (a partition it lacks, a header too long, a value
            SQLite refuses) fails alone, as ``InvalidRecordError`` (producing it again cannot help)."""
            now = time.time()
            rows = []
            stored: list[OutgoingMessage] = []
            refused: list[DeliveryFailure] = []
            counts: dict[str, int] = {}
            for message in batch:
                topic = message.topic
                try:
                    count = counts.get(topic)
                    if count is None:
                        count = counts[topic] = db.partitions_of(conn, topic, create_with)
                    if message.partition is not None:
                        if not 0 <= message.partition < count:
                            raise _NoSuchPartitionError(f"it has {count} partition(s), not {message.partition}")
                        partition = message.partition
                    elif message.key is not None:
                        partition = schema.partition_for(message.key, count)
                    else:
                        partition = db.next_partition(topic, count)
                    rows.append(schema.row_for(message, partition, now, default_delay))
                except RECORD_ERRORS as exc:
                    refused.append((message, _refused(topic, exc)))
                    continue
                stored.append(message)
            conn.execute("SAVEPOINT batch")
            try:
                schema.insert(conn, rows)
            except RECORD_ERRORS:  # one of them SQLite refuses (too big, a type it cannot store): find which
                conn.execute("ROLLBACK TO batch")  # the rows before it were inserted already
                stored, refused = _insert_one_by_one(conn, stored, rows, refused)
            # Released only here: any other error goes to the group's rollback as it is (a RELEASE after SQLite
            # rolled the transaction back itself would raise, in its place).
            conn.execute("RELEASE batch")
            return stored, refused

        def done(result: Any, error: BaseException | None) -> None:
            try:
                if error is None:
                    on_delivery(*result)
                else:
                    failures: list[DeliveryFailure] = [(m, error) for m in batch]
                    on_delivery((), failures)
            finally:
                with self._lock:
                    self._pending -= 1
                    if self._pending == 0:
                        self._idle.set()

        topics = {m.topic for m in batch}
        with self._lock:
            self._pending += 1
            self._idle.clear()
        try:
            db.submit(databases.Operation(run, done, wakes=topics.pop() if len(topics) == 1 else None))
        except BaseException:
            done(None, RuntimeError("the sqlite database is closed"))
            raise
        if topics:  # several queues in one call: wake them all once it is committed (rare: only the DLQ path)
            for topic in topics:
                db.submit(databases.Operation(lambda _conn: None, lambda _r, _e: None, wakes=topic))

    async def flush(self, timeout: float) -> None:
        if self._idle.is_set():
            return
        if not await asyncio.to_thread(self._idle.wait, max(0.0, timeout)):
            with self._lock:
                pending = self._pending
            raise TimeoutError(f"{pending} sqlite write(s) not committed after {timeout} s")

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is None:
            return
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.close_timeout_seconds
        try:
            await self.flush(self.settings.close_timeout_seconds)  # raises past it, naming the writes left
        finally:
            await asyncio.to_thread(databases.release, db, max(0.0, give_up_at - loop.time()))


class SqliteConnector:
    """What the plugin registers as ``sqlite``: builds consumers and producers from a queue's ``config``."""

    def check(self, queue: QueueSpec) -> None:
        """Validate a queue's settings when the Engine is built, before anything starts."""
        parse_settings(queue.config, queue.value)

    def create_consumer(self, queue: QueueSpec) -> SqliteConsumer:
        return SqliteConsumer(queue.value, parse_settings(queue.config, queue.value))

    def create_producer(self, queue: QueueSpec) -> SqliteProducer:
        return SqliteProducer(parse_settings(queue.config, queue.value))

    def create_browser(self, queue: QueueSpec) -> SqliteBrowser:
        """For ``volley dlq``: read the queue in place, delete what a replay or purge dealt with."""
        return SqliteBrowser(queue.value, parse_settings(queue.config, queue.value))

    def locate(self, queue: QueueSpec) -> str:
        """The database file (its real path)."""
        return "sqlite:" + os.path.realpath(parse_settings(queue.config, queue.value).path)


if TYPE_CHECKING:  # mypy proves the parts satisfy the ports (structurally: nothing is inherited)

    from volley.ports import (
        BrowsableConnector,
        Connector,
        Consumer,
        DepthReporter,
        Drainable,
        LocatingConnector,
        Producer,
        QueueBrowser,
        SettlingBrowser,
    )

    def _satisfies_ports(
        consumer: SqliteConsumer, producer: SqliteProducer, connector: SqliteConnector, browser: SqliteBrowser
    ) -> tuple[Consumer, Producer, Connector, DepthReporter, Drainable, BrowsableConnector, QueueBrowser,
               SettlingBrowser, LocatingConnector]:
        return consumer, producer, connector, consumer, consumer, connector, browser, browser, connector


def _insert_one_by_one(conn: sqlite3.Connection, messages: list[OutgoingMessage], rows: list[tuple[Any, ...]],
                       refused: list[DeliveryFailure]) -> tuple[list[OutgoingMessage], list[DeliveryFailure]]:
    """The rows of a batch whose insert failed on a record's account, each in a savepoint of its own: those SQLite
    takes are stored, the others fail alone."""
    stored: list[OutgoingMessage] = []
    for message, row in zip(messages, rows, strict=True):
        conn.execute("SAVEPOINT record")
        try:
            schema.insert(conn, [row])
        except RECORD_ERRORS as exc:
            conn.execute("ROLLBACK TO record")
            refused.append((message, _refused(message.topic, exc)))
        else:
            stored.append(message)
        conn.execute("RELEASE record")
    return stored, refused


class _NoSuchPartitionError(ValueError):
    pass


def _refused(queue: str, exc: BaseException) -> InvalidRecordError:
    reason = str(exc) if isinstance(exc, _NoSuchPartitionError) else f"{type(exc).__name__}: {exc}"
    return InvalidRecordError(f"sqlite queue {queue!r} refused a record: {reason}")
