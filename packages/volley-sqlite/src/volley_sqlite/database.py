"""One SQLite connection, owned by one thread, shared by every consumer and producer of a file in this process.

The event loop never touches SQLite. Consumers and producers queue operations;
the thread takes everything queued at once and runs it in a single write
transaction (one savepoint per operation, so one bad operation does not undo
the others), commits, and only then reports the results: a producer's delivery
report therefore means the rows are committed (fsynced, with
``synchronous=full``). Operations that only read with one statement (a queue's
depth, whether it is drained) run after that transaction, outside any, taking
no write lock. Grouping the operations of a burst into one commit is
what makes a durable broker on one disk fast (group commit).

Between operations the thread renews the leases of the messages its consumers
hold (the heartbeat) and compacts acknowledged rows past their retention.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import struct
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeVar

from volley.errors import ConfigurationError
from volley_sqlite import schema

if TYPE_CHECKING:
    from volley_sqlite.settings import SqliteSettings

T = TypeVar("T")

OWN_FAULTS = (ValueError, TypeError, OverflowError, struct.error, sqlite3.IntegrityError, sqlite3.InterfaceError,
              sqlite3.DataError)
"""What an operation raises on its own account (a partition out of range, a value SQLite cannot store, a header too
long to encode): only that operation is undone. Anything else (I/O, a full disk, a lock) fails its whole group."""
logger = logging.getLogger("volley_sqlite")

Done = Callable[[Any, BaseException | None], None]
"""Called on the database thread with an operation's result (or error), after its transaction committed."""


@dataclass(slots=True)
class Operation:
    run: Callable[[sqlite3.Connection], Any]
    done: Done
    probe: Callable[[sqlite3.Connection], bool] | None = None
    """A cheap read outside any transaction: False means there is nothing to write (an empty queue)."""
    empty: Any = None
    """The result when the probe says there is nothing to do."""
    wakes: str | None = None
    """A queue whose waiting consumers should look again once this operation committed."""
    read_only: bool = False
    """Only reads (one statement: a consistent snapshot): run outside any transaction, so no write lock."""


@dataclass(slots=True)
class Lessee:
    """A consumer whose leases the thread renews while it lives."""

    queue: str
    owner: str
    visibility_timeout: float
    heartbeat: bool
    retention: float
    compaction_interval: float
    next_beat: float = 0.0
    next_compaction: float = field(default_factory=time.monotonic)


def _resolve_future(future: asyncio.Future[Any], result: Any, error: BaseException | None,
                    abandoned: Callable[[Any], None] | None = None) -> None:
    if future.done():
        if future.cancelled() and abandoned is not None and error is None:
            abandoned(result)  # nobody awaits the result any more (a cancelled consume): undo it
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)


class Database:
    """A connection and the thread that owns it. Get one with :func:`acquire`, give it back with :meth:`release`."""

    def __init__(self, key: tuple[str, str, float]) -> None:
        self.key = key
        self.path, self.synchronous, self.busy_timeout = key
        self._cv = threading.Condition()
        self._ops: deque[Operation] = deque()
        self._stopping = False
        self._lessees: dict[str, Lessee] = {}
        self._waiters: dict[str, set[tuple[asyncio.AbstractEventLoop, asyncio.Event]]] = {}
        self._partitions: dict[str, int] = {}  # queue -> partition count, as stored
        self._round_robin: dict[str, int] = {}
        self.refs = 0
        self._opened = threading.Event()
        self._open_error: BaseException | None = None
        self._thread = threading.Thread(target=self._main, name=f"volley-sqlite:{self.path}", daemon=True)
        self._thread.start()
        self._opened.wait()
        if self._open_error is not None:
            raise self._open_error

    # ------------------------------------------------------------------ submitting work

    def submit(self, operation: Operation) -> None:
        with self._cv:
            if self._stopping:
                raise RuntimeError(f"the sqlite database {self.path!r} is closed")
            self._ops.append(operation)
            self._cv.notify()

    def call(self, run: Callable[[sqlite3.Connection], T], *, probe: Callable[[sqlite3.Connection], bool] | None = None,
             empty: Any = None, wakes: str | None = None, abandoned: Callable[[T], None] | None = None,
             read_only: bool = False) -> asyncio.Future[T]:
        """Queue ``run``; the returned future (of the running loop) resolves once its transaction committed.

        ``abandoned(result)`` is called on the loop when the future was cancelled before the result arrived.
        ``read_only``: ``run`` only reads, with one statement; it runs outside any transaction (no write lock).
        """
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()

        def done(result: Any, error: BaseException | None) -> None:
            with contextlib.suppress(RuntimeError):  # that loop is closed
                loop.call_soon_threadsafe(_resolve_future, future, result, error, abandoned)

        self.submit(Operation(run, done, probe, empty, wakes, read_only))
        return future

    def call_blocking(self, run: Callable[[sqlite3.Connection], T], timeout: float | None = None, *,
                      read_only: bool = False) -> T:
        """Run ``run`` on the database thread and wait for it: for callers off the event loop."""
        finished = threading.Event()
        box: list[Any] = [None, None]

        def done(result: Any, error: BaseException | None) -> None:
            box[0], box[1] = result, error
            finished.set()

        self.submit(Operation(run, done, read_only=read_only))
        if not finished.wait(timeout):
            raise TimeoutError(f"the sqlite database {self.path!r} did not answer within {timeout} s")
        if box[1] is not None:
            raise box[1]
        return box[0]  # type: ignore[no-any-return]

    # ------------------------------------------------------------------ consumers

    def add_lessee(self, lessee: Lessee) -> None:
        with self._cv:
            lessee.next_beat = time.monotonic() + lessee.visibility_timeout / 3
            self._lessees[lessee.owner] = lessee
            self._cv.notify()

    def remove_lessee(self, owner: str) -> None:
        with self._cv:
            self._lessees.pop(owner, None)

    def add_waiter(self, queue: str, event: asyncio.Event) -> None:
        with self._cv:
            self._waiters.setdefault(queue, set()).add((asyncio.get_running_loop(), event))

    def remove_waiter(self, queue: str, event: asyncio.Event) -> None:
        with self._cv:
            waiters = self._waiters.get(queue)
            if waiters is not None:
                waiters.discard((asyncio.get_running_loop(), event))

    def _wake(self, queues: Iterable[str]) -> None:
        with self._cv:
            targets = [w for q in set(queues) for w in self._waiters.get(q, ())]
        for loop, event in targets:
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(event.set)

    # ------------------------------------------------------------------ queues (database thread only)

    def partitions_of(self, db: sqlite3.Connection, queue: str, create_with: int) -> int:
        """The queue's partition count, creating the queue with ``create_with`` partitions if it is new."""
        count = self._partitions.get(queue)
        if count is None:
            count = schema.ensure_queue(db, queue, create_with)
            self._partitions[queue] = count
        return count

    def next_partition(self, queue: str, count: int) -> int:
        """Round-robin for messages without a key or partition, per queue and process."""
        current = self._round_robin.get(queue, 0)
        self._round_robin[queue] = (current + 1) % count
        return current % count

    # ------------------------------------------------------------------ the thread

    def _main(self) -> None:
        try:
            db = schema.connect(self.path, self.synchronous, self.busy_timeout)
        except BaseException as exc:
            self._open_error = exc
            self._opened.set()
            return
        self._opened.set()
        try:
            self._serve(db)
        finally:
            with contextlib.suppress(sqlite3.Error):
                db.close()

    def _serve(self, db: sqlite3.Connection) -> None:
        while True:
            with self._cv:
                while not self._ops and not self._stopping:
                    due = self._next_chore()
                    # At most an hour: a chore set "practically never" (an interval of 1e10 s) made the wait longer
                    # than the condition takes, and the OverflowError killed this thread (every operation hung).
                    wait = None if due is None else min(max(0.0, due - time.monotonic()), 3600.0)
                    if wait is not None and wait <= 0:
                        break
                    self._cv.wait(wait)
                ops = list(self._ops)
                self._ops.clear()
                stopping = self._stopping
                lessees = list(self._lessees.values())
            if ops:
                self._run(db, ops, lessees)
            self._chores(db, lessees)
            if stopping and not ops:
                with self._cv:
                    if not self._ops:
                        return

    def _next_chore(self) -> float | None:
        times = [lessee.next_beat for lessee in self._lessees.values() if lessee.heartbeat]
        times += [lessee.next_compaction for lessee in self._lessees.values()]
        return min(times) if times else None

    def _run(self, db: sqlite3.Connection, ops: list[Operation], lessees: list[Lessee]) -> None:
        results: list[tuple[Operation, Any, BaseException | None]] = []
        writes: list[Operation] = []
        reads: list[Operation] = []  # read-only: after the group's commit, so that they see what was queued first
        for op in ops:
            if op.read_only:
                reads.append(op)
                continue
            if op.probe is not None:
                try:
                    if not op.probe(db):
                        results.append((op, op.empty, None))
                        continue
                except Exception as exc:
                    results.append((op, None, exc))
                    continue
            writes.append(op)
        woken: list[str] = []
        if writes:
            try:
                results.extend(self._transaction(db, writes, woken))
            except Exception as exc:  # nothing was stored: every operation of the group failed
                if db.in_transaction:
                    with contextlib.suppress(sqlite3.Error):
                        db.execute("ROLLBACK")
                results.extend((op, None, exc) for op in writes)
                woken = []
        for op in reads:
            try:
                results.append((op, op.run(db), None))
            except Exception as exc:
                results.append((op, None, exc))
        if any(error is not None for _op, _result, error in results):
            self._partitions.clear()  # a rolled-back savepoint or group may have created a queue: read them again
        # A heartbeat that fell due while these waited (another process held the write lock past vt) renews first:
        # once the results are out, other consumers act on what they see, and lapsed leases would look dead.
        self._heartbeat(db, lessees)
        for op, result, error in results:
            try:
                op.done(result, error)
            except Exception:
                logger.exception("a sqlite operation's report failed")
        if woken:
            self._wake(woken)

    @staticmethod
    def _transaction(db: sqlite3.Connection, writes: list[Operation],
                     woken: list[str]) -> list[tuple[Operation, Any, BaseException | None]]:
        """Run the operations in one transaction, each in a savepoint; raise if the transaction as a whole failed."""
        done: list[tuple[Operation, Any, BaseException | None]] = []
        db.execute("BEGIN IMMEDIATE")
        for op in writes:
            db.execute("SAVEPOINT op")
            try:
                result = op.run(db)
            except OWN_FAULTS as exc:
                # This operation's own fault (a partition out of range, a value SQLite cannot store): undo it
                # alone. Anything else (I/O, a full disk, a lock) fails the whole group below.
                db.execute("ROLLBACK TO op")
                db.execute("RELEASE op")
                done.append((op, None, exc))
            else:
                db.execute("RELEASE op")
                done.append((op, result, None))
                if op.wakes is not None:
                    woken.append(op.wakes)
        db.execute("COMMIT")
        return done

    def _heartbeat(self, db: sqlite3.Connection, lessees: list[Lessee]) -> None:
        """Renew the leases of the consumers whose heartbeat is due."""
        now = time.monotonic()
        beating = [lessee for lessee in lessees if lessee.heartbeat and lessee.next_beat <= now]
        if not beating:
            return
        try:
            with _transaction(db):
                for lessee in beating:
                    schema.renew(db, lessee.queue, lessee.owner, lessee.visibility_timeout)
        except sqlite3.Error as exc:
            logger.warning("sqlite heartbeat on %s failed (retried): %s", self.path, exc)
        for lessee in beating:
            lessee.next_beat = now + lessee.visibility_timeout / 3

    def _chores(self, db: sqlite3.Connection, lessees: list[Lessee]) -> None:
        self._heartbeat(db, lessees)
        now = time.monotonic()
        compacting = [lessee for lessee in lessees if lessee.next_compaction <= now]
        if compacting:
            unfinished: set[str] = set()  # queues with more to delete than one compaction does: again at once
            try:
                for lessee in compacting:
                    limit = schema.COMPACT_ROWS
                    if schema.compact(db, lessee.queue, lessee.retention, limit=limit) >= limit:
                        unfinished.add(lessee.owner)
            except sqlite3.Error as exc:
                logger.warning("sqlite compaction on %s failed (retried): %s", self.path, exc)
            for lessee in compacting:
                lessee.next_compaction = now if lessee.owner in unfinished else now + lessee.compaction_interval

    def stop(self, timeout: float = 30.0) -> None:
        """Finish the queued operations and close, waiting ``timeout`` seconds at most. A thread still waiting then
        (for a write lock another process holds: up to the busy timeout) finishes behind the caller and closes."""
        with self._cv:
            self._stopping = True
            self._cv.notify()
        if threading.current_thread() is not self._thread:
            self._thread.join(max(0.0, timeout))
            if self._thread.is_alive():
                logger.warning("sqlite database %s: still waiting for the write lock (another process holds it) "
                               "after %.1f s; its last operations finish or fail in the background, within the busy "
                               "timeout (%.1f s)", self.path, timeout, self.busy_timeout)


@contextlib.contextmanager
def _transaction(db: sqlite3.Connection) -> Any:
    db.execute("BEGIN IMMEDIATE")
    try:
        yield
    except BaseException:
        db.execute("ROLLBACK")
        raise
    db.execute("COMMIT")


_registry: dict[tuple[str, str, float], Database] = {}
_registry_lock = threading.Lock()


def acquire(key: tuple[str, str, float]) -> Database:
    """The process's database for ``key`` (path, synchronous, busy timeout), opened on first use."""
    with _registry_lock:
        database = _registry.get(key)
        if database is None:
            database = _registry[key] = Database(key)
        database.refs += 1
        return database


def release(database: Database, timeout: float = 30.0) -> None:
    """Give a database back; the last user closes it (after the operations still queued, waiting ``timeout``
    seconds at most for them)."""
    with _registry_lock:
        database.refs -= 1
        if database.refs > 0:
            return
        if _registry.get(database.key) is database:
            del _registry[database.key]
    database.stop(timeout)


def chunks(items: Sequence[T], size: int = 500) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), size):
        yield items[start:start + size]


async def open_database(settings: SqliteSettings) -> Database:
    """The shared database of a queue's file, opened off the event loop; a file that cannot be opened is a
    configuration error."""
    try:
        return await asyncio.to_thread(acquire, settings.database_key)
    except (sqlite3.Error, OSError) as exc:
        raise ConfigurationError(f"cannot open the sqlite queue database {settings.path!r}: {exc}") from exc
