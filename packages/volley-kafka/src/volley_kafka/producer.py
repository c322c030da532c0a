"""The Kafka producer: one librdkafka client per distinct configuration, shared by every output that uses it.

``produce`` is called on the event loop and only hands records to librdkafka
(a C call each, no I/O). Delivery reports are collected by a per-record
callback and passed to the engine in batches. While the loop is producing, the
loop serves them itself (``poll(0)`` right after producing, then every
``LOOP_SERVE_INTERVAL`` while records are in flight and it produced or served a
report within ``LOOP_HOLD``); a poller thread serves them otherwise (records
stuck on a broker that does not answer wait for it inside librdkafka, not in a
loop polling every millisecond), and takes over when librdkafka's local queue
is full, so that the loop never blocks on a slow broker. Why the loop:
librdkafka takes the GIL for each record's callback on its own, so a poller
thread serving reports while the loop runs Python contends with the loop for
the GIL once per record (measured on a real broker: 1.1-1.8 µs of the poller
thread's CPU per message, none once the loop serves them). A client whose
config carries a callback of the user's (``clients.USER_CALLBACKS``) is polled by
its poller thread only: librdkafka runs those inside ``poll()`` too, and one may
block. A record is reported exactly once: delivered, failed, or purged at close.

Threads and the backlog (records waiting for room in librdkafka's queue):

* Only the event loop appends to the backlog, at its tail, under ``_backlog_lock``.
* Only the thread holding ``_drain_lock`` reads the backlog's head, produces it and removes it:
  the poller thread, or a thread in ``flush_blocking`` (rebalance, shutdown, abort, ``release``),
  or one discarding it (abort, close). The poller holds it for about one poll slice at a time.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from functools import partial
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException

from volley.errors import DeliveryError, InvalidRecordError, TransactionAbortedError
from volley.message import OutgoingMessage
from volley.ports import DeliveryCallback, DeliveryFailure, QueueSpec
from volley_kafka.clients import USER_CALLBACKS, is_fatal, make_client, with_callbacks
from volley_kafka.producer_checks import BATCH_MARGIN, check_batch_limit, check_reachable
from volley_kafka.settings import ProducerSettings, brokers_of

logger = logging.getLogger("volley_kafka")

POLL_SLICE = 0.05
"""How long the poller thread waits in librdkafka for delivery reports before checking its backlog again."""
LOOP_SERVE_INTERVAL = 0.001
"""While records are in flight, how often the event loop serves delivery reports itself."""
LOOP_HOLD = 0.02
"""The poller thread leaves delivery reports to the event loop while the loop produced or served one within this
long; the loop stops polling once this long has passed without either (records stuck: the poller waits for
them inside librdkafka instead)."""


class _Bucket:
    """Delivery reports waiting to be handed to one engine callback."""

    __slots__ = ("callback", "failed", "ok", "report")

    def __init__(self, callback: DeliveryCallback) -> None:
        self.callback = callback
        self.ok: list[OutgoingMessage] = []
        self.failed: list[DeliveryFailure] = []
        self.report = _reporter(self.ok.append, self.failed.append)  # each record's is partial(report, record)


def _reporter(delivered: Callable[[OutgoingMessage], None],
              failed: Callable[[DeliveryFailure], None]) -> Callable[[OutgoingMessage, Any, Any], None]:
    """A bucket's delivery callback, bound once: a function of its own lists' ``append`` (the lists are emptied in
    place, never replaced), so a report costs no bound-method call and no attribute look-up."""

    def report(message: OutgoingMessage, err: Any, _msg: Any) -> None:
        if err is None:
            delivered(message)
        else:
            failed(_failure(message, err))

    return report


PURGED = frozenset({KafkaError._PURGE_QUEUE, KafkaError._PURGE_INFLIGHT})
INVALID = frozenset({KafkaError.MSG_SIZE_TOO_LARGE, KafkaError._UNKNOWN_PARTITION})
"""What ``produce`` refuses a record for (larger than the client's ``message.max.bytes``, a partition its topic
lacks): producing it again cannot help (``InvalidRecordError``). The same code in a delivery report is not the
record's own: the broker refuses a whole batch when one record of it is above the topic's ``max.message.bytes``,
so there it stays a failure that is retried (the record is sent again, most likely in another batch)."""


def _failure(message: OutgoingMessage, error: Any) -> DeliveryFailure:
    """A delivery report's error, or what ``produce`` raised, as the engine's failure for ``message``."""
    if isinstance(error, KafkaException) and error.args and isinstance(error.args[0], KafkaError) \
            and error.args[0].code() in INVALID:
        return (message, InvalidRecordError(
            f"Kafka refused the record for {message.topic!r} ({len(message.value or b'')} bytes of value): "
            f"{error.args[0].str()}; producing it again cannot help"))
    if isinstance(error, (TypeError, ValueError, OverflowError)):  # produce() refused an argument (a partition
        # past 2**31, a header of the wrong type): the record is malformed
        return (message, InvalidRecordError(f"the record for {message.topic!r} is malformed: {error}"))
    if isinstance(error, BaseException):
        return (message, error)
    if isinstance(error, KafkaError) and error.code() in PURGED:
        return (message, TransactionAbortedError(f"the record for {message.topic!r} was purged before it was sent "
                                                 f"(transaction aborted, or producer closed): {error.str()}"))
    if isinstance(error, KafkaError) and error.code() == KafkaError.MSG_SIZE_TOO_LARGE:
        return (message, DeliveryError(
            f"Kafka refused the record for {message.topic!r}: {error.str()} (it, or a record sent in the same batch, "
            "is above the topic's max.message.bytes; set the producer's message.max.bytes to at most the topic's less "
            f"{BATCH_MARGIN}, and a record too large is refused on its own and its input dead-lettered)"))
    return (message, DeliveryError(f"Kafka refused the record for {message.topic!r}: {error}"))


def _report(bucket: _Bucket, message: OutgoingMessage) -> Callable[[Any, Any], None]:
    """The delivery callback of one record: a partial of its bucket's bound ``report``, not a closure.

    A closure costs three garbage-collected objects per record (function, defaults, cells), and with hundreds
    of thousands of records alive inside librdkafka the collector's passes over them cost more than the produce
    call itself. One partial per record (built and called in C) is what correlating reports needs.
    """
    return partial(bucket.report, message)


class ProducerClient:
    """A librdkafka producer with its poller thread, shared (reference-counted) by producer ports."""

    def __init__(self, config: dict[str, Any], name: str) -> None:
        self.config = dict(config)
        self.name = name
        self.brokers = brokers_of(config)
        self.transactional = "transactional.id" in config
        self.loop_serves = not any(config.get(name) is not None for name in USER_CALLBACKS)
        self.producer: Any = make_client(with_callbacks(config, error_cb=self._on_error), name,
                                         confluent_kafka.Producer)
        self._buckets: dict[DeliveryCallback, _Bucket] = {}
        self._backlog: deque[tuple[OutgoingMessage, _Bucket]] = deque()
        self._backlog_lock = threading.Lock()  # appending (loop) against removing (the drainer)
        self._drain_lock = threading.Lock()  # one thread at a time sends (or discards) the backlog
        self._dispatch_lock = threading.Lock()
        self._wake = threading.Event()
        self._refs = 0
        self._ref_lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._running = False
        self.closed = False
        self.fatal: KafkaError | None = None
        self.transactions_ready = False
        self.in_transaction = False  # set by the exactly-once consumer around begin / commit / abort
        self._delay_warned = False
        self._loop_served = 0.0  # when the event loop last produced or served a report (time.monotonic())
        self._loop_serve: asyncio.Handle | asyncio.TimerHandle | None = None  # the loop's next serve, if due
        self._serve_loop: asyncio.AbstractEventLoop | None = None  # the loop that _loop_serve belongs to
        self._loop_poll_lock = threading.Lock()  # a poll on the loop against the close of the client

    # ------------------------------------------------------------------ lifecycle

    def acquire(self) -> bool:
        """Take a reference; start the poller on the first. False if the client was already closed."""
        with self._ref_lock:
            if self.closed:
                return False
            self._refs += 1
            if self._thread is None:
                self._running = True
                self._thread = threading.Thread(target=self._poll_loop, name=f"volley-kafka-poll-{self.name}",
                                                daemon=True)
                self._thread.start()
            return True

    def release(self, timeout: float) -> bool:
        """Drop a reference; the last one flushes and closes. Returns True if this call closed the client."""
        with self._ref_lock:
            self._refs -= 1
            if self._refs > 0 or self.closed:
                return False
            self.closed = True
        try:
            self.flush_blocking(timeout)
        except (TimeoutError, KafkaException, RuntimeError) as exc:  # whatever it was, the close goes on
            logger.error("%s: %s; purging what is left", self.name, exc)
        self._running = False
        self._wake.set()
        if self._thread is not None:
            self._thread.join(max(1.0, POLL_SLICE * 4))
        with self._loop_poll_lock:  # a poll on the loop has returned; later ones see ``closed`` and do nothing
            pass
        self.discard_backlog(DeliveryError("the producer was closed before sending it"))
        try:
            self.producer.purge()
            self.producer.flush(0)  # serves the purge reports
        except (KafkaException, RuntimeError) as exc:
            logger.debug("%s: purge at close: %s", self.name, exc)
        self.dispatch()
        close = getattr(self.producer, "close", None)  # confluent-kafka >= 2.13: release threads and sockets now
        if close is not None:
            try:
                if self.fatal is None:
                    close()
                else:  # past a fatal error (fenced), close warns that its abort failed: known and logged already
                    with warnings.catch_warnings(record=True) as warned:
                        warnings.simplefilter("always")
                        close()
                    for warning in warned:
                        logger.debug("%s: close: %s", self.name, warning.message)
            except (KafkaException, RuntimeError) as exc:
                logger.debug("%s: close: %s", self.name, exc)
        return True

    # ------------------------------------------------------------------ producing (event loop)

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        bucket = self._buckets.get(on_delivery)
        if bucket is None:
            bucket = self._buckets.setdefault(on_delivery, _Bucket(on_delivery))
        if self.loop_serves:
            if self._loop_serve is None or self._serve_loop is None or self._serve_loop.is_closed():
                self._serve_on_loop_soon()
            else:
                self._loop_served = time.monotonic()
        if self.closed and self._thread is not None and not self._running:
            error = DeliveryError("the Kafka producer is closed")
            bucket.failed.extend((m, error) for m in messages)
            self.dispatch()
            return
        if self.fatal is not None:
            error = DeliveryError(f"the Kafka producer hit a fatal error and must be restarted: {self.fatal.str()}")
            bucket.failed.extend((m, error) for m in messages)
            self._wake.set()
            return
        if self.transactional and not self.in_transaction:
            error = TransactionAbortedError("the transaction of this record's batch is over (aborted, or never "
                                            "begun); its input is consumed again")
            bucket.failed.extend((m, error) for m in messages)
            self._wake.set()
            return
        if not self._delay_warned:
            # Any message of the batch, not only the first; a plain loop is the cheapest scan (about 20 ns a
            # message, against over a microsecond for the produce call), and it stops once the warning is out.
            for m in messages:
                if m.delay:
                    self._delay_warned = True
                    logger.warning("%s: Kafka cannot delay a message; the 'delay' output option is ignored",
                                   self.name)
                    break
        if self._backlog:
            self._to_backlog(messages, 0, bucket)
            return
        produce = self.producer.produce
        report = bucket.report
        sent = 0
        try:
            for m in messages:  # the fast path: no checks that a C call makes anyway
                partition = m.partition
                produce(m.topic, m.value, m.key, -1 if partition is None else partition, partial(report, m), None, 0,
                        m.headers)
                sent += 1
        except BufferError:
            self._produce_carefully(messages, sent, bucket)
        except (KafkaException, TypeError, ValueError, OverflowError) as exc:
            bucket.failed.append(_failure(messages[sent], exc))
            self._wake.set()
            self._produce_carefully(messages, sent + 1, bucket)

    def _produce_carefully(self, messages: Sequence[OutgoingMessage], start: int, bucket: _Bucket) -> None:
        """The rest of a batch after a refusal: one record at a time, handing over to the poller when full."""
        produce = self.producer.produce
        refused = False
        index = start
        count = len(messages)
        while index < count:
            m = messages[index]
            partition = m.partition
            try:
                produce(m.topic, m.value, m.key, -1 if partition is None else partition, _report(bucket, m), None, 0,
                        m.headers)
            except BufferError:
                # librdkafka's queue is full: serve delivery reports to make room, once (unless the user's
                # callbacks keep polls off the loop); then let the poller thread, which may block, send the rest
                # in order.
                if not refused and self.loop_serves:
                    refused = True
                    try:
                        self.producer.poll(0)
                    except Exception as exc:  # kept (a fatal error), not raised: records before it are handed over
                        self._poll_failed(exc, dispatch=False)
                        self._wake.set()  # the poller hands over what the poll collected
                    continue
                self._to_backlog(messages, index, bucket)
                return
            except (KafkaException, TypeError, ValueError, OverflowError) as exc:
                bucket.failed.append(_failure(m, exc))
                self._wake.set()
            index += 1

    def _to_backlog(self, messages: Sequence[OutgoingMessage], start: int, bucket: _Bucket) -> None:
        with self._backlog_lock:
            self._backlog.extend((messages[i], bucket) for i in range(start, len(messages)))
        self._wake.set()

    def _send_backlog(self, deadline: float) -> bool:
        """Produce the backlog in order (poller or flushing thread). False if the deadline passed first.

        One thread at a time: two drainers would both read the head, send it twice and remove the next
        record unsent.
        """
        if not self._drain_lock.acquire(timeout=max(0.0, deadline - time.monotonic())):
            return not self._backlog
        try:
            backlog = self._backlog
            while backlog:
                message, bucket = backlog[0]
                partition = message.partition
                try:
                    self.producer.produce(message.topic, message.value, message.key,
                                          -1 if partition is None else partition, _report(bucket, message), None, 0,
                                          message.headers)
                except BufferError:
                    if time.monotonic() >= deadline:
                        return False
                    self.producer.poll(POLL_SLICE)
                    self.dispatch()
                    continue
                except (KafkaException, TypeError, ValueError, OverflowError) as exc:
                    bucket.failed.append(_failure(message, exc))
                with self._backlog_lock:
                    backlog.popleft()
            return True
        finally:
            self._drain_lock.release()

    def discard_backlog(self, error: BaseException) -> int:
        """Fail every record still waiting for room (an aborted transaction, a closed producer); how many."""
        with self._drain_lock, self._backlog_lock:
            left = list(self._backlog)
            self._backlog.clear()
        for message, bucket in left:
            bucket.failed.append(_failure(message, error))
        if left:
            self._wake.set()  # the poller hands the failures to the engine
        return len(left)

    # ------------------------------------------------------------------ delivery reports on the loop

    def _serve_on_loop_soon(self) -> None:
        """After producing, on the event loop: serve delivery reports on the loop, from its next iteration."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # not called on a loop (a tool producing from a thread): the poller serves them
            return
        self._loop_served = time.monotonic()
        self._serve_loop = loop
        self._loop_serve = loop.call_soon(self._serve_on_loop, loop)

    def _serve_on_loop(self, loop: asyncio.AbstractEventLoop) -> None:
        """Serve the delivery reports that are in, on the loop, and again shortly while records are in flight and
        reports keep coming (LOOP_HOLD)."""
        self._loop_serve = None
        with self._loop_poll_lock:
            if self.closed:
                return
            try:
                served = self.producer.poll(0)
            except Exception as exc:
                self._loop_served = 0.0  # the poller thread serves from now on
                self._poll_failed(exc)
                self._wake.set()
                return
            in_flight = len(self.producer)
        now = time.monotonic()
        if served:
            self._loop_served = now
        self.dispatch()
        if in_flight and self._loop_serve is None and now - self._loop_served < LOOP_HOLD:
            self._loop_serve = loop.call_later(LOOP_SERVE_INTERVAL, self._serve_on_loop, loop)

    # ------------------------------------------------------------------ delivery reports (any thread)

    def dispatch(self) -> None:
        """Hand collected delivery reports to the engine callbacks, each report exactly once."""
        for bucket in list(self._buckets.values()):
            ok = bucket.ok
            failed = bucket.failed
            if not ok and not failed:
                continue
            with self._dispatch_lock:
                n, f = len(ok), len(failed)
                delivered = ok[:n]
                del ok[:n]
                failures = failed[:f]
                del failed[:f]
            if delivered or failures:
                try:
                    bucket.callback(delivered, failures)
                except Exception:
                    logger.exception("%s: the delivery callback failed", self.name)

    def _poll_loop(self) -> None:
        producer = self.producer
        while self._running:
            try:
                if self._backlog:
                    self._send_backlog(time.monotonic() + POLL_SLICE)  # lets a flushing thread take over
                held = self._loop_served + LOOP_HOLD - time.monotonic()
                if held > 0 and not self._backlog:
                    self._wake.wait(held)  # the loop serves the reports: keep out of its way (and off its GIL)
                else:
                    producer.poll(POLL_SLICE)
                self.dispatch()
                if self._wake.is_set():
                    self._wake.clear()
                    self.dispatch()
            except Exception as exc:
                self._poll_failed(exc)
                time.sleep(POLL_SLICE)

    def _poll_failed(self, exc: Exception, *, dispatch: bool = True) -> None:
        """A poll raised (the poller's, the loop's, or the one making room inside ``produce``, which must not hand
        reports to the engine while the engine is producing: ``dispatch=False``)."""
        error = exc.args[0] if isinstance(exc, KafkaException) and exc.args else None
        if isinstance(error, KafkaError) and is_fatal(error):
            # librdkafka raises its fatal error (a fenced transactional producer, an idempotent producer's broken
            # sequence) from the one poll that serves it instead of calling the error callback: one clear line,
            # and the reports still flow (as failures).
            if self.fatal is None:
                self._on_error(error)
            if dispatch:
                self.dispatch()
        else:
            logger.error("%s: polling for delivery reports failed", self.name, exc_info=exc)

    def _on_error(self, error: KafkaError) -> None:
        if is_fatal(error):
            self.fatal = error
            logger.error("%s: fatal Kafka producer error: %s", self.name, error.str())
        elif error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            logger.warning("%s: %s", self.name, error.str())
        else:
            logger.info("%s: %s", self.name, error.str())

    # ------------------------------------------------------------------ flushing (worker thread)

    def flush_blocking(self, timeout: float) -> None:
        deadline = time.monotonic() + max(0.0, timeout)
        if self._backlog and not self._send_backlog(deadline):
            raise TimeoutError(f"{self.name}: {len(self._backlog)} record(s) still waiting for room after "
                               f"{timeout:.1f} s")
        left = self.producer.flush(max(0.0, deadline - time.monotonic()))
        self.dispatch()
        if left:
            raise TimeoutError(f"{self.name}: {left} record(s) not confirmed by Kafka within {timeout:.1f} s")

    def pending(self) -> int:
        return len(self.producer) + len(self._backlog)


class KafkaProducer:
    """The producer port of one output queue; the librdkafka client underneath is shared (see KafkaConnector)."""

    def __init__(self, queue: QueueSpec, settings: ProducerSettings, resolve: Callable[[], ProducerClient]) -> None:
        self._queue = queue
        self._settings = settings
        self._resolve = resolve
        self._client: ProducerClient | None = None

    @property
    def client(self) -> ProducerClient:
        if self._client is None:
            raise RuntimeError(f"the Kafka producer of queue {self._queue.name!r} is not started")
        return self._client

    async def start(self) -> None:
        client = self._resolve()
        self._client = client
        timeout = self._settings.startup_timeout
        if timeout > 0:
            await asyncio.to_thread(check_reachable, client.producer, client.brokers, timeout, self._queue)
            owner = "the input queue (exactly-once: its producer writes every output)" if client.transactional \
                else f"queue {self._queue.name!r}"
            await asyncio.to_thread(check_batch_limit, client.config, self._queue, timeout, owner=owner)

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        client = self._client
        if client is None:
            raise RuntimeError(f"the Kafka producer of queue {self._queue.name!r} is not started")
        client.produce(messages, on_delivery)

    async def flush(self, timeout: float) -> None:
        client = self.client
        if client.pending() or client.transactional:
            await asyncio.to_thread(client.flush_blocking, timeout)
        else:
            client.dispatch()

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            await asyncio.to_thread(client.release, 30.0)

    def __repr__(self) -> str:
        return f"KafkaProducer({self._queue.name!r} -> {self._queue.value!r})"

