"""The ``sqlite`` connector: settings checked up front, a consumer and a producer that
never block the loop.

Every SQLite call runs on a single worker thread per consumer or producer
(one connection each, used only by that thread); the event loop only awaits
results. Nothing here imports or inherits from the engine beyond the data
types of ``volley.message`` and ``volley.ports``: Volley's ports are
protocols, satisfied by shape.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from volley.errors import ConfigurationError
from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryCallback, QueueSpec
from volley_sqlite.store import Store

T = TypeVar("T")

KNOWN_KEYS = (
    "path",
    "lease_seconds",
    "poll_interval_seconds",
    "delay",
    "busy_timeout_seconds",
)


@dataclass(frozen=True)
class SqliteSettings:
    path: str
    # how long a received message stays hidden before another consumer may take it
    lease_seconds: float = 60.0
    poll_interval_seconds: float = (
        0.05  # pause between receives while the queue is empty
    )
    delay: float = 0.0  # default delay of produced messages
    busy_timeout_seconds: float = (
        5.0  # how long a statement waits for another connection's write lock
    )

    @classmethod
    def parse(cls, queue: QueueSpec) -> SqliteSettings:
        """Check a queue's ``config``; every mistake says what to change."""
        config: Mapping[str, Any] = queue.config
        unknown = sorted(set(config) - set(KNOWN_KEYS))
        if unknown:
            raise ConfigurationError(
                f"sqlite queue {queue.name!r}: unknown config key(s) {unknown}; "
                f"known: {list(KNOWN_KEYS)}"
            )
        path = config.get("path")
        if not isinstance(path, str) or not path:
            raise ConfigurationError(
                f"sqlite queue {queue.name!r} needs config 'path': the database file "
                "(e.g. '/var/lib/app/queues.db')"
            )
        numbers: dict[str, float] = {}
        for key in KNOWN_KEYS[1:]:
            if key not in config:
                continue
            try:
                numbers[key] = float(config[key])
            except (TypeError, ValueError):
                raise ConfigurationError(
                    f"sqlite queue {queue.name!r}: {key} must be a number of seconds, "
                    f"got {config[key]!r}"
                ) from None
            if numbers[key] < 0 or (numbers[key] == 0 and key != "delay"):
                raise ConfigurationError(
                    f"sqlite queue {queue.name!r}: {key} must be positive, "
                    f"got {config[key]!r}"
                )
        return cls(path=path, **numbers)


class _Worker:
    """One thread that owns one SQLite connection; the loop awaits what it runs."""

    def __init__(self, name: str) -> None:
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name
        )

    async def run(self, call: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(
            self._executor, functools.partial(call, *args)
        )

    def submit(
        self, call: Callable[..., Any], *args: Any
    ) -> concurrent.futures.Future[Any]:
        return self._executor.submit(call, *args)

    def shutdown(self) -> None:
        self._executor.shutdown(wait=True)


class SqliteConsumer:
    """Consumes one queue. Satisfies ``volley.ports.Consumer`` (and ``DepthReporter``,
    for the depth metric)."""

    def __init__(self, queue: QueueSpec, settings: SqliteSettings) -> None:
        self._queue = queue.value
        self._settings = settings
        self._worker: _Worker | None = None
        self._store: Store | None = None
        self._held: dict[int, str] = {}  # message id -> receipt of our delivery

    async def start(self) -> None:
        self._worker = _Worker(f"volley-sqlite-consume-{self._queue}")
        try:
            self._store = await self._worker.run(
                Store, self._settings.path, self._settings.busy_timeout_seconds
            )
        except Exception as exc:
            self._worker.shutdown()
            raise ConfigurationError(
                f"cannot open sqlite database {self._settings.path!r}: {exc}"
            ) from exc

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        worker, store = self._require()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + max(0.0, timeout)
        while True:
            received = await worker.run(
                store.receive,
                self._queue,
                max(1, max_messages),
                self._settings.lease_seconds,
            )
            if received:
                break
            remaining = deadline - loop.time()
            if remaining <= 0:
                return []
            await asyncio.sleep(min(self._settings.poll_interval_seconds, remaining))
        envelopes = []
        for r in received:
            self._held[r.id] = r.receipt
            envelopes.append(
                Envelope(
                    r.value,
                    r.key,
                    r.headers,
                    self._queue,
                    None,
                    r.id,
                    r.created_at,
                    r.attempt,
                    r.receipt,
                )
            )
        return envelopes

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        worker, store = self._require()
        deliveries = [(e.position, e.handle) for e in envelopes]
        await worker.run(store.delete, deliveries)
        for message_id, _ in deliveries:
            self._held.pop(message_id, None)

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        worker, store = self._require()
        deliveries = [(e.position, e.handle) for e in envelopes]
        await worker.run(store.release, deliveries, delay)
        for message_id, _ in deliveries:
            self._held.pop(message_id, None)

    async def close(self) -> None:
        worker, store = self._worker, self._store
        self._worker = self._store = None
        if worker is None:
            return
        try:
            if store is not None:
                # not finished by the engine: let another consumer have them now, not
                # after the lease
                if self._held:
                    await worker.run(store.release, list(self._held.items()), 0.0)
                    self._held.clear()
                await worker.run(store.close)
        finally:
            worker.shutdown()

    async def depth(self) -> int:
        worker, store = self._require()
        return await worker.run(store.depth, self._queue)

    def _require(self) -> tuple[_Worker, Store]:
        if self._worker is None or self._store is None:
            raise RuntimeError(f"the sqlite consumer of {self._queue!r} is not started")
        return self._worker, self._store


class SqliteProducer:
    """Writes to any queue of one database file. Satisfies ``volley.ports.Producer``."""

    def __init__(self, settings: SqliteSettings) -> None:
        self._settings = settings
        self._worker: _Worker | None = None
        self._store: Store | None = None
        self._lock = threading.Lock()
        self._pending: set[concurrent.futures.Future[Any]] = set()

    async def start(self) -> None:
        self._worker = _Worker("volley-sqlite-produce")
        try:
            self._store = await self._worker.run(
                Store, self._settings.path, self._settings.busy_timeout_seconds
            )
        except Exception as exc:
            self._worker.shutdown()
            raise ConfigurationError(
                f"cannot open sqlite database {self._settings.path!r}: {exc}"
            ) from exc

    def produce(
        self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback
    ) -> None:
        """Called on the event loop: hand the batch to the writer thread and return at
        once."""
        if self._worker is None:
            raise RuntimeError("the sqlite producer is not started")
        future = self._worker.submit(self._write, list(messages), on_delivery)
        with self._lock:
            self._pending.add(future)
        future.add_done_callback(self._forget)

    def _write(
        self, messages: list[OutgoingMessage], on_delivery: DeliveryCallback
    ) -> None:
        """On the writer thread. Every record is reported exactly once, delivered or
        failed."""
        assert self._store is not None
        try:
            self._store.insert(messages, self._settings.delay)
        except Exception as exc:
            on_delivery((), [(m, exc) for m in messages])
        else:
            on_delivery(messages, ())

    def _forget(self, future: concurrent.futures.Future[Any]) -> None:
        with self._lock:
            self._pending.discard(future)

    async def flush(self, timeout: float) -> None:
        with self._lock:
            pending = list(self._pending)
        if not pending:
            return
        _, not_done = await asyncio.wait(
            [asyncio.wrap_future(f) for f in pending], timeout=timeout
        )
        if not_done:
            raise TimeoutError(
                f"{len(not_done)} sqlite write(s) still running after {timeout} s"
            )

    async def close(self) -> None:
        worker, store = self._worker, self._store
        if worker is None:
            return
        try:
            await self.flush(30.0)
            if store is not None:
                await worker.run(store.close)
        finally:
            self._worker = self._store = None
            worker.shutdown()


class SqliteConnector:
    """What the plugin registers: builds consumers and producers
    (``volley.ports.Connector``)."""

    def check(self, queue: QueueSpec) -> None:
        """Optional: the Engine calls it when it is built, so a bad setting fails before
        anything starts."""
        SqliteSettings.parse(queue)

    def create_consumer(self, queue: QueueSpec) -> SqliteConsumer:
        return SqliteConsumer(queue, SqliteSettings.parse(queue))

    def create_producer(self, queue: QueueSpec) -> SqliteProducer:
        return SqliteProducer(SqliteSettings.parse(queue))


if (
    TYPE_CHECKING
):  # mypy proves, without running anything, that the classes fit Volley's ports
    from volley.ports import Connector, Consumer, DepthReporter, Producer

    def _fits_the_ports(
        connector: SqliteConnector, consumer: SqliteConsumer, producer: SqliteProducer
    ) -> tuple[Connector, Consumer, DepthReporter, Producer]:
        return connector, consumer, consumer, producer
