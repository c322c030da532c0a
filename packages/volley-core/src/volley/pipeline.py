"""One run of a stream app: fetch, decode, handle, produce, settle, shut down.

How the work is split, and why:

* A fetch task pulls batches from the consumer while earlier batches are being
  processed, and stops pulling (pausing the consumer when it can) once
  ``max_buffered`` inputs are unsettled: memory stays bounded whatever the
  input rate.
* Sync handlers run batch-wise on one dedicated thread: a single thread hop per
  batch, the event loop stays free for I/O, and inputs are handled in the
  order they were consumed. A failing message is retried in place (with
  backoff) so nothing behind it in the same partition can overtake it.
* Async handlers run as lanes: one lane per ordering key (partition, message
  key, or each message when ordering is "none"), each handling its messages in
  order, at most ``max_in_flight`` lanes at a time.
* An input is settled (acked) only once every output it produced is confirmed
  by its broker. Producers report deliveries in batches, from any thread.
* Inputs that cannot be decoded or validated, and handler failures that
  exhausted their retries, go to the dead-letter queue raw with the reason in
  headers; without one, they are given back to the broker and the app stops
  (or goes on, per ``on_failure``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from volley import gctune
from volley.errors import DeliveryError, HandlerFailedError, MessageError, VolleyError
from volley.message import Envelope, Headers, MessageContext, OutgoingMessage, to_bytes
from volley.ports import (
    Consumer,
    DeliveryFailure,
    Instrumented,
    PartitionId,
    Pausable,
    Producer,
    ReasonedNack,
    RebalanceAware,
    Transactional,
)
from volley.queues import ResolvedQueue, classify
from volley.threads import SerialThread

if TYPE_CHECKING:
    from volley.engine import StreamApp

logger = logging.getLogger("volley")

INLINE_SLICE_SECONDS = 0.005  # longest stretch the loop spends in sync handler calls before it serves I/O
FAST_CALL_SECONDS = 0.002  # slowest call, during calibration, that still lets handlers run inline
SLOW_CALL_SECONDS = 0.02  # two inline messages this slow within a second move the handler to the thread
VERY_SLOW_CALL_SECONDS = 0.2  # one inline message this slow does it at once (longer than a GC pause)
THREAD_REPORT_SECONDS = 0.01  # the handler thread hands what it finished to the loop at least this often
CALIBRATION_BATCHES = 2
OUTPUT_KWARGS = frozenset({"key", "headers", "partition", "delay"})
HEADER_PREFIX = "volley-"


@dataclass
class RunReport:
    """What a run did. Every consumed input ends in exactly one of acked, nacked, dead_lettered, failed, abandoned."""

    consumed: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    failed: int = 0
    abandoned: int = 0
    retries: int = 0
    produced: int = 0
    elapsed_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)

    @property
    def settled(self) -> int:
        return self.acked + self.nacked + self.dead_lettered + self.failed + self.abandoned


class _Group:
    """The token of a batch handled as one (batch profiles): settles all its members together."""

    __slots__ = ("members", "pending")

    def __init__(self, members: list[Envelope]) -> None:
        self.members = members
        self.pending = 0


Token = Envelope | _Group
_FAILED = object()


class _Outcome:
    """What handling a batch produced, to be applied on the loop."""

    __slots__ = ("acks", "nacks", "failures", "outs", "retries", "component", "cycle", "construct", "deconstruct",
                 "handled", "slowest", "slow_calls")

    def __init__(self, slots: int, handled: int = 1) -> None:
        self.handled = handled
        self.slowest = 0.0
        self.slow_calls = 0
        self.acks: list[Token] = []
        self.nacks: list[Token] = []
        self.failures: list[tuple[Token, str, BaseException]] = []
        self.outs: list[list[OutgoingMessage]] = [[] for _ in range(slots)]
        self.retries = 0
        self.component: list[float] = []
        self.cycle: list[float] = []
        self.construct = 0.0
        self.deconstruct = 0.0

    def failure(self, token: Token, stage: str, exc: BaseException) -> None:
        self.failures.append((token, stage, exc))


class Pipeline:
    def __init__(self, app: StreamApp, *, stop_when_drained: bool, drain_idle_seconds: float,
                 max_messages: int | None) -> None:
        engine = app.engine
        self.app = app
        self.engine = engine
        self.name = engine.app_name
        self.report = RunReport()
        self.observer = engine.observer
        self.timed = engine.observer.enabled
        self.stop_when_drained = stop_when_drained
        self.drain_idle_seconds = drain_idle_seconds
        self.max_messages = max_messages
        self.input: ResolvedQueue = engine.input
        self.batch_size = self.input.batch_size
        self.ordering = self.input.ordering

        # Output routes: handler queue name -> (queue, producer slot).
        self.producers: list[Producer] = []
        self.routes: dict[str, tuple[ResolvedQueue, int]] = {}
        self.dlq: tuple[ResolvedQueue, int] | None = None
        route_names = list(engine.output_queues)
        if engine.dead_letter_queue is not None:
            route_names.append(engine.dead_letter_queue)
        by_identity: dict[int, int] = {}
        for name in route_names:
            queue = engine.queues[name]
            producer = queue.make_producer()
            slot = by_identity.get(id(producer))
            if slot is None:
                slot = len(self.producers)
                by_identity[id(producer)] = slot
                self.producers.append(producer)
            self.routes[name] = (queue, slot)
        # The same, pre-bound for the common single-output case: name -> (encode, topic, producer slot).
        self._single_outputs: dict[str, tuple[Callable[[Any], bytes], str, int]] = {
            name: (queue.encode, queue.value, slot) for name, (queue, slot) in self.routes.items()
        }
        if engine.dead_letter_queue is not None:
            self.dlq = self.routes[engine.dead_letter_queue]
        self.consumer: Consumer = self.input.make_consumer()
        self.transactional = isinstance(self.consumer, Transactional) and bool(self.consumer.transactional)

        self.in_flight = 0
        self.inbox: deque[list[Envelope]] = deque()
        self._acks: list[Envelope] = []
        self._nacks: list[tuple[Envelope, str]] = []
        self._out_buffer: list[list[OutgoingMessage]] = [[] for _ in self.producers]
        self._out_scheduled = False
        self._reports: deque[tuple[Sequence[OutgoingMessage], Sequence[DeliveryFailure]]] = deque()
        self._reports_scheduled = False
        self._delivery_attempts: dict[int, int] = {}
        self._revoked: set[PartitionId] = set()
        self._lanes: dict[Any, deque[tuple[Token, Any]]] = {}
        self._waiting_lanes: deque[Any] = deque()
        self._active_lanes = 0
        self._lane_tasks: set[asyncio.Task[None]] = set()
        self._stopping = False
        self._transaction_failed = False
        self._transaction_open = False
        self._transaction_batch: list[Envelope] = []
        self._stop_error: BaseException | None = None
        self._thread_stop = threading.Event()
        self._last_activity = time.monotonic()
        self._last_poll = 0.0
        # For stop_when_drained: the input is only drained once a poll came back empty after the last batch
        # (between two batches, with everything settled, an app merely looks idle).
        self._last_received = 0.0
        self._last_empty_poll = -1.0
        self._next_drain_check = 0.0
        # A consumer whose is_drained() is exact and instant (memory) is asked on the loop, as soon as the last
        # ack is through, and no empty poll is needed: see Drainable.instant_drain_check.
        self._instant_drain = bool(getattr(self.consumer, "instant_drain_check", False)) and callable(
            getattr(self.consumer, "is_drained", None))
        self._drain_check_idle = threading.Event()  # clear while is_drained() runs on a worker thread
        self._drain_check_idle.set()
        self._worker: SerialThread | None = None
        self._inline = engine.sync_handler_mode == "auto"
        self._calibrating = CALIBRATION_BATCHES if self._inline else 0
        self._inline_failed = False
        self._last_slow_inline = -1e9
        self._started = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._parts_closing = False  # shutdown is past its last flush: results from the handler thread are late
        self._loop_thread = 0
        self._wake: asyncio.Event | None = None
        self._settled: asyncio.Event | None = None
        self._acked_event: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None

    # ================================================================== lifecycle

    async def run(self) -> RunReport:
        started = self._started = time.monotonic()
        self._loop = asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._wake = asyncio.Event()
        self._settled = asyncio.Event()
        self._acked_event = asyncio.Event()
        self._stopped = asyncio.Event()
        if self._stopping:
            self._stopped.set()
        if not self.app.is_async or (self.batch_size and not self.app.is_async):
            self._worker = SerialThread(f"volley-{self.name}-handler")
        for part in (self.consumer, *self.producers):
            if isinstance(part, Instrumented) and self.observer.enabled:
                part.instrument(self.observer, self.name)
        if isinstance(self.consumer, RebalanceAware):
            self.consumer.set_revoke_handler(self._on_revoke)
        started_parts: list[Any] = []
        try:
            for producer in self.producers:
                await producer.start()
                started_parts.append(producer)
            await self.consumer.start()
            started_parts.append(self.consumer)
            self.observer.on_start(self.name)  # may refuse to start (a taken metrics port)
        except BaseException:
            for part in reversed(started_parts):
                with contextlib.suppress(Exception):
                    await part.close()
            if self._worker is not None:
                self._worker.stop()
            raise
        if not getattr(self.consumer, "reports_readiness", False):
            self.observer.on_ready(self.name, True)  # else the consumer says when (Kafka: once assigned)
        logger.info("%s: consuming %s (%s)", self.name, self.input.name, self.input.value)
        tune_gc = self.engine.tune_gc
        if tune_gc:
            gctune.acquire()
        fetcher = asyncio.create_task(self._fetch_loop(), name=f"volley-{self.name}-fetch")
        processor = asyncio.create_task(self._process_loop(), name=f"volley-{self.name}-process")
        acker = asyncio.create_task(self._ack_loop(), name=f"volley-{self.name}-ack")
        monitor = asyncio.create_task(self._monitor_loop(), name=f"volley-{self.name}-monitor")
        crashed: BaseException | None = None
        try:
            waiter = asyncio.create_task(self._stopped.wait())
            done, _ = await asyncio.wait({waiter, fetcher, processor, acker}, return_when=asyncio.FIRST_COMPLETED)
            for task in done:
                if task is not waiter and not task.cancelled() and task.exception() is not None:
                    crashed = task.exception()
            waiter.cancel()
        except asyncio.CancelledError:
            crashed = None
            self._stopping = True
        finally:
            self._stopping = True
            self._thread_stop.set()
            try:
                await self._shutdown(fetcher, processor, acker, monitor)
            finally:
                if tune_gc:
                    gctune.release()
            self.report.elapsed_seconds = time.monotonic() - started
        error = crashed or self._stop_error
        if error is not None:
            raise error
        return self.report

    async def _shutdown(self, *tasks: asyncio.Task[None]) -> None:
        fetcher, processor, acker, monitor = tasks
        deadline = time.monotonic() + self.engine.shutdown_timeout_seconds
        self.observer.on_ready(self.name, False)
        # 1. Stop consuming. Cancelling a poll is safe: what it would have returned was never
        #    acknowledged, so the broker delivers it again.
        await _wait_task(fetcher, 0.0)
        # 2. Finish in-flight work within the deadline.
        await self._wait_settled(deadline)
        processor.cancel()
        for task in list(self._lane_tasks):
            task.cancel()
        await _wait_task(processor, 1.0)
        if self._lane_tasks:
            await asyncio.wait(self._lane_tasks, timeout=1.0)
        # 3. Flush producers so that outputs in flight are confirmed (and their inputs acked).
        self._flush_outputs()
        for producer in self.producers:
            try:
                await producer.flush(max(0.1, deadline - time.monotonic()))
            except Exception as exc:
                logger.error("%s: flushing a producer at shutdown failed: %s", self.name, exc)
        self._drain_reports()
        if self.in_flight:
            logger.warning("%s: shutting down with %d input(s) unfinished; they stay unacknowledged and will be "
                           "delivered again", self.name, self.in_flight)
            self.report.abandoned += self.in_flight
        # 4. Commit what is finished.
        self._parts_closing = True
        acker.cancel()
        await _wait_task(acker, 1.0)
        await self._flush_acks()
        monitor.cancel()
        await _wait_task(monitor, 1.0)
        if not self._drain_check_idle.is_set():  # a cancelled is_drained() may still be querying the broker
            await asyncio.to_thread(self._drain_check_idle.wait, 15.0)
        parts: list[Consumer | Producer] = [self.consumer, *self.producers]
        for part in parts:
            try:
                await part.close()
            except Exception as exc:
                logger.error("%s: closing %r failed: %s", self.name, part, exc)
        if self._worker is not None:
            self._worker.stop()
        self.observer.on_ready(self.name, False)  # again: a consumer may have reported ready while it closed
        self.observer.on_stop(self.name)
        self.report.elapsed_seconds = time.monotonic() - self._started
        logger.info("%s: stopped (%s)", self.name, self.report)

    def request_stop(self, error: BaseException | None = None) -> None:
        if error is not None and self._stop_error is None:
            self._stop_error = error
        self._stopping = True
        self._thread_stop.set()
        if self._stopped is not None:
            self._stopped.set()
        if self._wake is not None:
            self._wake.set()

    def request_stop_threadsafe(self) -> None:
        loop = self._loop
        if loop is None or threading.get_ident() == self._loop_thread:
            self.request_stop()
            return
        self._stopping = True
        with contextlib.suppress(RuntimeError):
            loop.call_soon_threadsafe(self.request_stop)

    async def _wait_settled(self, deadline: float, *, include_inbox: bool = True) -> None:
        assert self._settled is not None
        while (self.in_flight or (include_inbox and self.inbox)) and time.monotonic() < deadline:
            self._settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._settled.wait(), max(0.0, min(0.5, deadline - time.monotonic())))
            self._drain_reports()

    # ================================================================== fetching

    async def _fetch_loop(self) -> None:
        consumer = self.consumer
        pausable = isinstance(consumer, Pausable)
        paused = False
        engine = self.engine
        batch_size = engine.consume_batch_size
        bound = engine.max_buffered
        if self.transactional:
            bound = batch_size  # barrier mode: one batch at a time
        failures = 0
        assert self._settled is not None and self._wake is not None
        while not self._stopping:
            room = bound - self.in_flight
            if self.transactional and (self.in_flight or self._transaction_open):
                room = 0  # barrier mode: the next batch waits for this one's commit
            if self.max_messages is not None:
                room = min(room, self.max_messages - self.report.consumed)
                if room <= 0 and self.in_flight == 0 and not self.inbox:
                    self.request_stop()
                    return
            if room <= 0:
                if pausable and not paused:
                    consumer.pause()  # type: ignore[attr-defined]
                    paused = True
                self._settled.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._settled.wait(), max(engine.poll_interval_seconds, 0.05))
                if paused:  # keep a group member alive: librdkafka needs polls to serve the group protocol
                    room = 0
                else:
                    continue
            elif paused:
                consumer.resume()  # type: ignore[attr-defined]
                paused = False
            try:
                batch = await consumer.consume(min(batch_size, room) if room > 0 else 1,
                                               engine.poll_interval_seconds)
                self._last_poll = time.monotonic()
                failures = 0
            except VolleyError as exc:
                self.request_stop(exc)
                return
            except Exception as exc:
                failures += 1
                delay = min(engine.retry_backoff_max_seconds, engine.retry_backoff_seconds * 2 ** min(failures, 10))
                logger.error("%s: consuming from %s failed (%s: %s); retrying in %.1f s", self.name,
                             self.input.value, type(exc).__name__, exc, delay)
                self.report.errors.append(f"consume: {type(exc).__name__}: {exc}")
                await asyncio.sleep(delay)
                continue
            if not batch:
                self._last_empty_poll = self._last_poll
                continue
            if not isinstance(batch, list):
                batch = list(batch)
            self.in_flight += len(batch)
            self.report.consumed += len(batch)
            self._last_activity = self._last_received = time.monotonic()
            self.inbox.append(batch)
            self._wake.set()

    # ================================================================== processing

    async def _process_loop(self) -> None:
        assert self._wake is not None and self._settled is not None
        wake = self._wake
        while True:
            if not self.inbox:
                if self._stopping and self.in_flight == 0:
                    return
                wake.clear()
                await wake.wait()
                continue
            batch = self.inbox.popleft()
            # Merge small batches so that a slow consumer does not cost one thread hop per message.
            while self.inbox and len(batch) < self.engine.consume_batch_size:
                batch = batch + self.inbox.popleft()
            if self._revoked:
                batch = self._drop_revoked(batch)
                if not batch:
                    continue
            if self.transactional:
                self._transaction_open = True
                self._transaction_batch = batch
                await self.consumer.begin()  # type: ignore[attr-defined]
            if self.app.is_async:
                self._dispatch_async(batch)
            else:
                await self._run_sync(batch)
            if self.transactional:
                await self._finish_transaction()

    def _drop_revoked(self, batch: list[Envelope]) -> list[Envelope]:
        kept = [e for e in batch if (e.source, e.partition) not in self._revoked]
        dropped = len(batch) - len(kept)
        if dropped:
            self.in_flight -= dropped
            self.report.abandoned += dropped
            self._notify_settled()
        return kept

    # ------------------------------------------------------------------ sync handlers

    async def _run_sync(self, batch: list[Envelope]) -> None:
        """Run a batch through a sync handler: inline in short slices while the handler is fast, else on the thread.

        In "auto" mode (the default) the first ``CALIBRATION_BATCHES`` batches run on
        the thread with every call timed; if no call was slower than
        ``FAST_CALL_SECONDS``, later batches run inline. Inline slices of at most
        ``INLINE_SLICE_SECONDS`` keep the loop responsive
        and cost no thread hop at all, which matters because a thread hop per
        batch still makes the loop and the worker fight over the GIL. The first
        handler call that takes longer than ``SLOW_CALL_SECONDS``, or that
        raises (retries sleep), moves the rest of the batch, and every later
        batch, to the dedicated thread, where a slow or blocking handler cannot
        stall the loop's I/O.
        """
        assert self._worker is not None
        if self.batch_size:
            outcome = await self._worker.submit(lambda: self._handle_batches_sync(batch))
            self._apply(outcome)
            return
        if self._calibrating:
            # The first batches run on the thread, timing every call: only a handler that proved
            # fast is run inline, so a handler that blocks from the start never touches the loop.
            self._calibrating -= 1
            outcome = await self._worker.submit(lambda: self._handle_sync(batch, measure=True))
            self._apply(outcome)
            # A few slow calls are expected (the first call warms caches, a GC pause lands in one);
            # a handler that is often slow, or blocks, stays on the thread.
            if outcome.slow_calls > max(1, len(batch) // 50):
                self._calibrating = 0
                self._go_threaded(f"{outcome.slow_calls} of {len(batch)} handler calls took over "
                                  f"{FAST_CALL_SECONDS} s (slowest {outcome.slowest:.4f} s)")
            elif not self._calibrating and self._inline:
                logger.debug("%s: sync handler calls are fast (%.6f s at most): running them inline",
                             self.name, outcome.slowest)
            return
        start = 0
        while start < len(batch) and self._inline:
            out = _Outcome(len(self.producers), 0)
            start = self._handle_inline(batch, out, start, time.perf_counter() + INLINE_SLICE_SECONDS)
            self._apply(out)
            if start < len(batch):
                await asyncio.sleep(0)  # let I/O, acks and delivery reports through between slices
        if start < len(batch):
            rest = batch[start:] if start else batch
            # The first message of the rest may have spent its first attempt inline (it raised).
            spent = 1 if self._inline_failed else 0
            self._inline_failed = False
            outcome = await self._worker.submit(lambda: self._handle_sync(rest, spent))
            self._apply(outcome)

    def _handle_sync(self, batch: list[Envelope], spent: int = 0, measure: bool = False) -> _Outcome:
        """On the handler thread: decode, handle (with retries) and encode a batch. Touches no loop state.

        ``spent``: the first message's first attempt already failed inline. ``measure``: time every handler
        call (the calibration batches).
        """
        out = _Outcome(len(self.producers), 0)
        deserialize = self.input.fast_deserialize
        validate = self.input.validate
        func = self.app.call
        wants_context = self.app.wants_context
        max_deliveries = self.engine.max_deliveries
        max_retries = self.engine.max_retries
        timed = self.timed
        perf = time.perf_counter
        queue_name = self.input.name
        failures = out.failures
        acks = out.acks
        route = self._route
        t0 = t1 = t2 = 0.0
        called = 0.0
        monotonic = time.monotonic
        reported = 0  # messages of the batch already handed to the loop
        posted = monotonic()
        for index, env in enumerate(batch):
            now = self._last_activity = monotonic()  # progress for the health probe, even mid-batch
            if now - posted >= THREAD_REPORT_SECONDS and index > reported:
                # Hand over what is finished so far: its outputs go out and its inputs are acked while this
                # batch goes on, so a slow handler's results flow steadily and a handler that blocks (until
                # shutdown gives up on it) holds back only its own message and those after it.
                out.handled = index - reported
                reported, posted = index, now
                out = self._post_partial(out)
                failures, acks = out.failures, out.acks
            if timed:
                t0 = perf()
            message = _decode(env, deserialize, validate, max_deliveries, out.failure)
            if message is _FAILED:
                continue
            if timed:
                t1 = perf()
                out.construct += t1 - t0
            attempt = 0
            if spent and index == 0:  # its first attempt failed inline: this call is retry 1
                attempt = spent
                out.retries += 1
                self._thread_stop.wait(self._backoff(attempt))
            while True:
                try:
                    if measure:
                        called = perf()
                    if wants_context:
                        result = func(message, MessageContext(env, queue_name, self.name))
                    else:
                        result = func(message)
                    if measure:
                        took = perf() - called
                        out.slowest = max(out.slowest, took)
                        if took > FAST_CALL_SECONDS:
                            out.slow_calls += 1
                    break
                except Exception as exc:
                    if attempt < max_retries and not self._thread_stop.is_set():
                        attempt += 1
                        out.retries += 1
                        self._log_retry(env, attempt, exc)
                        self._thread_stop.wait(self._backoff(attempt))
                        continue
                    failures.append((env, "handler", exc))
                    result = _FAILED
                    break
            if result is _FAILED:
                continue
            if timed:
                t2 = perf()
                out.component.append(t2 - t1)
            if result is True or result is None:
                acks.append(env)
            elif result is False:
                out.nacks.append(env)
            else:
                route(env, result, out)
            if timed:
                t3 = perf()
                out.deconstruct += t3 - t2
                out.cycle.append(t3 - t0)
        out.handled = len(batch) - reported
        return out

    def _post_partial(self, out: _Outcome) -> _Outcome:
        """From the handler thread: have the loop apply ``out`` (before the batch's final outcome: the loop runs
        callbacks in order); return a fresh outcome that carries on the calibration figures."""
        loop = self._loop
        assert loop is not None
        following = _Outcome(len(self.producers), 0)
        following.slowest, following.slow_calls = out.slowest, out.slow_calls
        with contextlib.suppress(RuntimeError):  # the loop is closed: nothing can be acked, all comes again
            loop.call_soon_threadsafe(self._apply_partial, out)
        return following

    def _handle_inline(self, batch: list[Envelope], out: _Outcome, start: int, slice_deadline: float) -> int:
        """On the loop: handle messages from ``start`` until ``slice_deadline``; return the index to resume at.

        It stops early at a handler call that raised with retries configured (retries sleep) or after a slow
        one: both move the rest to the thread (``_handle_sync``). A single ``(queue, message)`` output is
        encoded right here, anything else goes through ``_route``. With metrics (``timed``), the clock read that
        bounds the slice doubles as the start of the message's cycle.
        """
        deserialize = self.input.fast_deserialize
        validate = self.input.validate
        fast_validate = self.input.fast_validate
        func = self.app.call
        wants_context = self.app.wants_context
        queue_name = self.input.name
        max_deliveries = self.engine.max_deliveries
        max_retries = self.engine.max_retries
        failures, acks, nacks, outs = out.failures, out.acks, out.nacks, out.outs
        single = self._single_outputs.get
        route = self._route
        timed = self.timed
        component, cycle = out.component, out.cycle
        t1 = t2 = 0.0
        perf = time.perf_counter
        slow = SLOW_CALL_SECONDS
        previous = perf()
        for index in range(start, len(batch)):
            env = batch[index]
            now = perf()  # one clock read: the slice deadline, and (bounding it) the previous message's time
            # Only _slow_inline can move the handler to the thread while this loop runs. It must see every slow
            # message, so it comes first: a message slower than SLOW_CALL_SECONDS is always past the deadline too.
            if (now - previous > slow and not self._slow_inline(now, now - previous)) or now > slice_deadline:
                out.handled = index - start
                return index
            previous = now
            if env.attempt > max_deliveries:
                failures.append((env, "redelivery", _redelivered(env, max_deliveries)))
                continue
            try:
                data = deserialize(env.value)
            except Exception as exc:
                failures.append((env, "deserialize", exc))
                continue
            try:
                message = fast_validate(data)
            except Exception:
                try:  # the checked validation says what is wrong
                    if fast_validate is validate:
                        raise
                    message = validate(data)
                except Exception as exc:
                    failures.append((env, "validate", exc))
                    continue
            if timed:
                t1 = perf()
            try:
                result = func(message, MessageContext(env, queue_name, self.name)) if wants_context else func(message)
            except Exception as exc:
                if max_retries:  # retries sleep: hand it to the thread, its first attempt spent
                    self._go_threaded(f"the handler raised {type(exc).__name__}")
                    self._inline_failed = True
                    self._log_retry(env, 1, exc)
                    out.handled = index - start
                    return index
                failures.append((env, "handler", exc))
                continue
            if timed:
                t2 = perf()
            if result is True or result is None:
                acks.append(env)
            elif result is False:
                nacks.append(env)
            elif type(result) is list and len(result) == 1 and type(item := result[0]) is tuple and len(item) == 2 \
                    and (bound := single(item[0])) is not None:
                encode, topic, slot = bound
                try:
                    value = encode(item[1])
                except Exception as exc:
                    failures.append((env, "output", exc))
                else:
                    env.pending = 1
                    outs[slot].append(OutgoingMessage(topic, value, None, None, None, None, env))
            else:
                route(env, result, out)
            if timed:
                t3 = perf()
                out.construct += t1 - now
                component.append(t2 - t1)
                out.deconstruct += t3 - t2
                cycle.append(t3 - now)
        out.handled = len(batch) - start
        return len(batch)

    def _slow_inline(self, now: float, took: float) -> bool:
        """One slow message may be a garbage-collection pause; a handler that is slow again, or very slow, is not.

        Returns whether the handler still runs inline."""
        if took > VERY_SLOW_CALL_SECONDS or now - self._last_slow_inline < 1.0:
            self._go_threaded(f"handling one message took {took:.3f} s")
        self._last_slow_inline = now
        return self._inline

    def _go_threaded(self, why: str) -> None:
        if self._inline:
            self._inline = False
            logger.info("%s: %s: sync handler calls now run on their own thread, off the event loop",
                        self.name, why)

    def _handle_batches_sync(self, batch: list[Envelope]) -> _Outcome:
        """Batch profiles: decode every record (bad ones fail alone), then call the handler per chunk."""
        out = _Outcome(len(self.producers), len(batch))
        good: list[Envelope] = []
        messages: list[Any] = []
        deserialize, validate = self.input.fast_deserialize, self.input.validate
        for env in batch:
            message = _decode(env, deserialize, validate, self.engine.max_deliveries, out.failure)
            if message is not _FAILED:
                messages.append(message)
                good.append(env)
        size = self.batch_size or len(good)
        for start in range(0, len(good), size):
            group = _Group(good[start:start + size])
            chunk = messages[start:start + size]
            result = self._call_with_retries_sync(group, chunk, out)
            if result is _FAILED:
                continue
            self._interpret(group, result, out)
        return out

    def _call_with_retries_sync(self, token: Token, message: Any, out: _Outcome) -> Any:
        attempt = 0
        while True:
            try:
                started = time.perf_counter()
                if self.app.wants_context:
                    first = token.members[0] if isinstance(token, _Group) else token
                    result = self.app.call(message, MessageContext(first, self.input.name, self.name))
                else:
                    result = self.app.call(message)
                if self.timed:
                    out.component.append(time.perf_counter() - started)
                return result
            except Exception as exc:
                if attempt < self.engine.max_retries and not self._thread_stop.is_set():
                    attempt += 1
                    out.retries += 1
                    self._log_retry(token, attempt, exc)
                    self._thread_stop.wait(self._backoff(attempt))
                    continue
                out.failures.append((token, "handler", exc))
                return _FAILED

    def _interpret(self, token: Token, result: Any, out: _Outcome) -> None:
        if result is True or result is None:
            out.acks.append(token)
        elif result is False:
            out.nacks.append(token)
        else:
            self._route(token, result, out)

    def _route(self, token: Token, result: Any, out: _Outcome) -> None:
        """Encode a handler's list of outputs; all or nothing, so a bad second output never sends the first."""
        if type(result) is list and len(result) == 1:
            # The common case, one (queue, message) output, without the general path's checks.
            item = result[0]
            if type(item) is tuple and len(item) == 2:
                bound = self._single_outputs.get(item[0])
                if bound is not None:
                    encode, topic, slot = bound
                    try:
                        value = encode(item[1])
                    except Exception as exc:
                        out.failures.append((token, "output", exc))
                        return
                    token.pending = 1
                    out.outs[slot].append(OutgoingMessage(topic, value, None, None, None, None, token))
                    return
        if not isinstance(result, (list, tuple)):
            out.failures.append((token, "output", TypeError(
                f"handler returned {type(result).__qualname__}; it must return True, False, or a list of "
                "(queue_name, message) / (queue_name, message, kwargs) tuples")))
            return
        staged: list[tuple[int, OutgoingMessage]] = []
        routes = self.routes
        for item in result:
            try:
                if not isinstance(item, tuple) or len(item) not in (2, 3):
                    raise TypeError(
                        f"each output must be a (queue_name, message) or (queue_name, message, kwargs) tuple, "
                        f"got {item!r:.200}")
                name = item[0]
                target = routes.get(name)
                if target is None:
                    raise TypeError(
                        f"output queue {name!r} is not one of this app's output_queues {list(self.routes)}; "
                        "add it to Engine(output_queues=[...])")
                queue, slot = target
                value = queue.encode(item[1])
                if len(item) == 3 and item[2]:
                    kwargs = item[2]
                    unknown = set(kwargs) - OUTPUT_KWARGS
                    if unknown:
                        raise TypeError(f"unknown output option(s) {sorted(unknown)} for queue {name!r}; "
                                        f"allowed: {sorted(OUTPUT_KWARGS)}")
                    headers = kwargs.get("headers")
                    if headers is not None:
                        headers = {str(k): to_bytes(v) or b"" for k, v in dict(headers).items()}
                    staged.append((slot, OutgoingMessage(queue.value, value, to_bytes(kwargs.get("key")), headers,
                                                         kwargs.get("partition"), kwargs.get("delay"), token)))
                else:
                    staged.append((slot, OutgoingMessage(queue.value, value, None, None, None, None, token)))
            except Exception as exc:
                out.failures.append((token, "output", exc))
                return
        if not staged:
            out.acks.append(token)
            return
        token.pending = len(staged)
        outs = out.outs
        for slot, message in staged:
            outs[slot].append(message)

    # ------------------------------------------------------------------ async handlers (event loop)

    def _dispatch_async(self, batch: list[Envelope]) -> None:
        deserialize = self.input.fast_deserialize
        validate = self.input.validate
        ordering = self.ordering
        max_deliveries = self.engine.max_deliveries
        lanes = self._lanes
        if self.batch_size:
            good: list[Envelope] = []
            messages: list[Any] = []
            for env in batch:
                message = self._decode_or_fail(env, deserialize, validate, max_deliveries)
                if message is not _FAILED:
                    good.append(env)
                    messages.append(message)
            for start in range(0, len(good), self.batch_size):
                self._enqueue_lane("batch", _Group(good[start:start + self.batch_size]),
                                   messages[start:start + self.batch_size])
            return
        for env in batch:
            message = self._decode_or_fail(env, deserialize, validate, max_deliveries)
            if message is _FAILED:
                continue
            if ordering == "partition":
                lane: Any = (env.source, env.partition)
            elif ordering == "key":
                lane = (env.source, env.key)
            else:
                lane = object()
            queue = lanes.get(lane)
            if queue is None:
                self._enqueue_lane(lane, env, message)
            else:
                queue.append((env, message))

    def _decode_or_fail(self, env: Envelope, deserialize: Callable[[bytes], Any], validate: Callable[[Any], Any],
                        max_deliveries: int) -> Any:
        message = _decode(env, deserialize, validate, max_deliveries, self._fail)
        if message is _FAILED and self.timed:
            self.observer.on_consumed(self.name, "fail", 1)
        return message

    def _enqueue_lane(self, lane: Any, token: Token, message: Any) -> None:
        queue = self._lanes.get(lane)
        if queue is not None:
            queue.append((token, message))
            return
        self._lanes[lane] = deque([(token, message)])
        if self._active_lanes < self.engine.max_in_flight:
            self._start_lane(lane)
        else:
            self._waiting_lanes.append(lane)

    def _start_lane(self, lane: Any) -> None:
        self._active_lanes += 1
        task = asyncio.ensure_future(self._run_lane(lane))
        self._lane_tasks.add(task)
        task.add_done_callback(self._lane_tasks.discard)

    async def _run_lane(self, lane: Any) -> None:
        queue = self._lanes[lane]
        try:
            while queue:
                token, message = queue[0]
                if self._revoked and isinstance(token, Envelope) and (token.source, token.partition) in self._revoked:
                    queue.popleft()
                    self.in_flight -= 1
                    self.report.abandoned += 1
                    self._notify_settled()
                    continue
                await self._handle_async(token, message)
                queue.popleft()
        finally:
            if self._lanes.get(lane) is queue and not queue:
                del self._lanes[lane]
            self._active_lanes -= 1
            while self._waiting_lanes and self._active_lanes < self.engine.max_in_flight:
                waiting = self._waiting_lanes.popleft()
                if waiting in self._lanes:
                    self._start_lane(waiting)

    async def _handle_async(self, token: Token, message: Any) -> None:
        func = self.app.call
        attempt = 0
        out = _Outcome(len(self.producers))
        while True:
            started = time.perf_counter()
            try:
                if self.app.wants_context:
                    env = token.members[0] if isinstance(token, _Group) else token
                    result = await func(message, MessageContext(env, self.input.name, self.name))
                else:
                    result = await func(message)
                break
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if attempt < self.engine.max_retries and not self._stopping:
                    attempt += 1
                    out.retries += 1
                    self._log_retry(token, attempt, exc)
                    await asyncio.sleep(self._backoff(attempt))
                    continue
                out.failures.append((token, "handler", exc))
                self._apply(out)
                return
        if self.timed:
            elapsed = time.perf_counter() - started
            out.component.append(elapsed)
            out.cycle.append(elapsed)
        self._interpret(token, result, out)
        self._apply(out)

    # ------------------------------------------------------------------ applying outcomes (event loop)

    def _apply(self, out: _Outcome) -> None:
        if out.retries:
            self.report.retries += out.retries
            self.observer.on_retry(self.name, out.retries)
        for slot, messages in enumerate(out.outs):
            if messages:
                self._out_buffer[slot].extend(messages)
                self._schedule_output_flush()
        if out.acks:
            for token in out.acks:
                self._settle_ok(token)
        if out.nacks:
            for token in out.nacks:
                self._settle_nack(token)
        for token, stage, exc in out.failures:
            self._fail(token, stage, exc)
        if self.timed:
            ok = out.handled - len(out.failures)
            if ok > 0:
                self.observer.on_consumed(self.name, "success", ok)
            if out.failures:
                self.observer.on_consumed(self.name, "fail", len(out.failures))
            if out.component:
                self.observer.on_process_time(self.name, "component", out.component)
            if out.cycle:
                self.observer.on_process_time(self.name, "cycle", out.cycle)
            if out.construct:
                self.observer.on_data_model_time("construct", out.construct, len(out.cycle))
            if out.deconstruct:
                self.observer.on_data_model_time("deconstruct", out.deconstruct, len(out.cycle))
        if self._out_buffer and any(self._out_buffer):
            self._flush_outputs()

    def _apply_partial(self, out: _Outcome) -> None:
        """A part of a batch that the handler thread finished. Once shutdown has flushed the producers and moved
        on to commit and close, it comes too late: it is dropped, and those inputs are delivered again."""
        if not self._parts_closing:
            self._apply(out)

    def _schedule_output_flush(self) -> None:
        if not self._out_scheduled and self._loop is not None:
            self._out_scheduled = True
            self._loop.call_soon(self._flush_outputs)

    def _flush_outputs(self) -> None:
        self._out_scheduled = False
        for slot, messages in enumerate(self._out_buffer):
            if not messages:
                continue
            self._out_buffer[slot] = []
            self._produce(slot, messages)

    def _produce(self, slot: int, messages: list[OutgoingMessage]) -> None:
        producer = self.producers[slot]
        try:
            producer.produce(messages, self._on_delivery)
        except Exception as exc:  # the producer refused the whole call: every record failed
            self._handle_reports((), [(m, exc) for m in messages])
            return
        self.report.produced += len(messages)
        if self.timed:
            counts: dict[str, int] = {}
            for m in messages:
                counts[m.topic] = counts.get(m.topic, 0) + 1
            for topic, count in counts.items():
                self.observer.on_produced(self.name, self.input.value, topic, count)

    def _on_delivery(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        """The producers' callback: any thread, any batching."""
        if threading.get_ident() == self._loop_thread:
            self._handle_reports(delivered, failed)
            return
        self._reports.append((delivered, failed))
        if not self._reports_scheduled and self._loop is not None:
            self._reports_scheduled = True
            with contextlib.suppress(RuntimeError):
                self._loop.call_soon_threadsafe(self._drain_reports)

    def _drain_reports(self) -> None:
        self._reports_scheduled = False
        reports = self._reports
        while reports:
            delivered, failed = reports.popleft()
            self._handle_reports(delivered, failed)

    def _handle_reports(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        acks = self._acks
        settled = 0
        for message in delivered:
            token = message.token
            if token is None:
                continue
            token.pending -= 1
            if token.pending == 0:
                if type(token) is Envelope:
                    acks.append(token)
                    settled += 1
                else:
                    self._settle_ok(token)
        if settled:
            self.in_flight -= settled
            self.report.acked += settled
            self._notify_settled()
        for message, exc in failed:
            self._delivery_failed(message, exc)

    def _delivery_failed(self, message: OutgoingMessage, exc: BaseException) -> None:
        token = message.token
        if token is None or token.pending < 0:
            return
        key = id(message)
        attempts = self._delivery_attempts.get(key, 0) + 1
        # In a transaction a failed record cannot be sent again on its own: the whole batch is aborted
        # (the consumer rewinds) and processed again, so no retry here and no stop.
        if attempts <= self.engine.max_retries and not self._stopping and not self.transactional:
            self._delivery_attempts[key] = attempts
            delay = self._backoff(attempts)
            logger.warning("%s: delivery to %s failed (%s); retrying in %.2f s (attempt %d of %d)", self.name,
                           message.topic, exc, delay, attempts, self.engine.max_retries)
            self.report.retries += 1
            assert self._loop is not None
            self._loop.call_later(delay, self._reproduce, message)
            return
        self._delivery_attempts.pop(key, None)
        token.pending = -1  # later reports of its other outputs must not ack it
        where = _describe(token)
        error = DeliveryError(f"output to {message.topic!r} of input {where} could not be delivered: {exc}")
        logger.error("%s: %s; the input is not acknowledged and will be delivered again", self.name, error)
        self.report.errors.append(str(error))
        self._give_back(token, f"output: DeliveryError: {exc}")
        self.report.failed += _size(token)
        self.report.nacked -= _size(token)
        self._transaction_failed = True
        if self.engine.on_failure == "stop" and not self.transactional:
            self.request_stop(error)

    def _reproduce(self, message: OutgoingMessage) -> None:
        token = message.token
        if token is None or token.pending < 0:
            return
        slot = next(s for q, s in self.routes.values() if q.value == message.topic) if len(self.producers) > 1 else 0
        self._produce(slot, [message])

    # ------------------------------------------------------------------ settling

    def _settle_ok(self, token: Token) -> None:
        if isinstance(token, _Group):
            members = [m for m in token.members if m.pending != -1]  # -1: abandoned with an aborted transaction
            self._acks.extend(members)
            count = len(members)
        else:
            self._acks.append(token)
            count = 1
        self.in_flight -= count
        self.report.acked += count
        self._notify_settled()

    def _settle_nack(self, token: Token) -> None:
        self._give_back(token, "the handler returned False")

    def _give_back(self, token: Token, reason: str) -> None:
        members = token.members if isinstance(token, _Group) else [token]
        self._nacks.extend((env, reason) for env in members)
        self.in_flight -= len(members)
        self.report.nacked += len(members)
        self._notify_settled()

    def _notify_settled(self) -> None:
        self._last_activity = time.monotonic()
        if self._settled is not None:
            self._settled.set()
        if self._acked_event is not None:
            self._acked_event.set()

    def _fail(self, token: Token, stage: str, exc: BaseException) -> None:
        """A message that cannot be processed: to the DLQ, or given back and reported."""
        members = token.members if isinstance(token, _Group) else [token]
        if isinstance(exc, MessageError) or stage in ("deserialize", "validate"):
            exc = classify(stage, exc, members[0].value if len(members) == 1 else b"")
        reason = _reason(exc)
        if self.dlq is not None:
            queue, slot = self.dlq
            for env in members:
                headers: Headers = dict(env.headers) if env.headers else {}
                headers[HEADER_PREFIX + "error-stage"] = stage.encode()
                headers[HEADER_PREFIX + "error-type"] = type(exc).__qualname__.encode()
                headers[HEADER_PREFIX + "error-reason"] = reason.encode(errors="replace")
                headers[HEADER_PREFIX + "source-queue"] = env.source.encode()
                headers[HEADER_PREFIX + "source-position"] = str(env.position).encode()
                if env.partition is not None:
                    headers[HEADER_PREFIX + "source-partition"] = str(env.partition).encode()
                headers[HEADER_PREFIX + "attempts"] = str(env.attempt).encode()
                env.pending = 1
                self._out_buffer[slot].append(OutgoingMessage(queue.value, env.value, env.key, headers, None, None,
                                                              env))
            self.report.dead_lettered += len(members)
            # dead_lettered inputs are settled (acked) once the DLQ confirms them; count them once.
            self.report.acked -= len(members)
            self.observer.on_dead_letter(self.name, stage, len(members))
            log = logger.warning if stage in ("deserialize", "validate", "redelivery") else logger.error
            log("%s: %s to the dead-letter queue %s (%s failed: %s)", self.name, _describe(token), queue.value,
                stage, reason)
            self._schedule_output_flush()
            return
        logger.error("%s: %s failed at %s and there is no dead-letter queue: %s\n%s", self.name, _describe(token),
                     stage, reason, "".join(traceback.format_exception(exc)) if stage == "handler" else "")
        self.report.errors.append(f"{_describe(token)}: {stage}: {reason}")
        self._give_back(token, f"{stage}: {type(exc).__qualname__}: {reason}")
        self.report.nacked -= len(members)
        self.report.failed += len(members)
        if self.engine.on_failure == "stop":
            self.request_stop(HandlerFailedError(
                f"{self.name}: {_describe(token)} failed at {stage} ({reason}) and no dead_letter_queue is "
                "configured; configure one, or pass on_failure='continue' to log and keep going"))

    # ------------------------------------------------------------------ acks, transactions, monitoring

    async def _ack_loop(self) -> None:
        assert self._acked_event is not None
        event = self._acked_event
        while True:
            await event.wait()
            event.clear()
            if not self.transactional:
                await self._flush_acks()
            if self._instant_drain and self.stop_when_drained and not self.in_flight:
                self._stop_if_drained()
            await asyncio.sleep(0)  # let more acks accumulate within this loop iteration

    async def _flush_acks(self) -> None:
        if self._acks and not self.transactional:
            acks, self._acks = self._acks, []
            try:
                await self.consumer.ack(acks)
            except Exception as exc:
                logger.error("%s: acknowledging %d message(s) failed: %s; they will be delivered again",
                             self.name, len(acks), exc)
                self.report.errors.append(f"ack: {exc}")
        if self._nacks:
            nacks, self._nacks = self._nacks, []
            # Redelivery backs off with the delivery count, so a message that keeps failing
            # costs less and less until max_deliveries sends it to the DLQ.
            groups: dict[tuple[float, str], list[Envelope]] = {}
            for env, reason in nacks:
                groups.setdefault((self._redelivery_delay(env), reason), []).append(env)
            reasoned = isinstance(self.consumer, ReasonedNack)
            for (delay, reason), envelopes in groups.items():
                try:
                    if reasoned:
                        await self.consumer.nack_with_reason(envelopes, delay, reason)  # type: ignore[attr-defined]
                    else:
                        await self.consumer.nack(envelopes, delay)
                except Exception as exc:
                    logger.error("%s: giving back %d message(s) failed: %s", self.name, len(envelopes), exc)

    def _redelivery_delay(self, env: Envelope) -> float:
        base = self.engine.redelivery_delay_seconds
        return float(min(self.engine.retry_backoff_max_seconds, base * 2 ** max(0, min(env.attempt - 1, 16))))

    async def _finish_transaction(self) -> None:
        """Barrier mode: wait for the batch to settle, then commit inputs and outputs atomically."""
        deadline = time.monotonic() + self.engine.shutdown_timeout_seconds
        self._flush_outputs()
        await self._wait_settled(deadline, include_inbox=False)
        # The transaction stays open until its commit or abort has returned: no next batch is fetched, and
        # run_until_drained does not take the app for drained, while the broker is still committing.
        try:
            consumer = self.consumer
            failed, self._transaction_failed = self._transaction_failed, False
            acks, self._acks = self._acks, []
            if self.in_flight or failed:
                logger.error("%s: aborting the transaction (%d unsettled); the batch will be processed again",
                             self.name, self.in_flight)
                await consumer.abort()  # type: ignore[attr-defined]
                self._forget_transaction_batch()
                return
            try:
                await consumer.commit(acks)  # type: ignore[attr-defined]
            except DeliveryError as exc:  # the consumer aborted and rewound: the batch comes again
                logger.error("%s: committing the transaction failed (%s); the batch will be processed again",
                             self.name, exc)
                self._forget_transaction_batch()
                return
            self._transaction_batch = []
            await self._flush_acks()
            self._notify_settled()  # wakes the fetcher for the next transaction
        finally:
            self._transaction_open = False

    def _forget_transaction_batch(self) -> None:
        """After an abort, nothing of the batch may settle later: late reports and retries would leak into the
        next transaction."""
        for env in self._transaction_batch:
            env.pending = -1
        self._transaction_batch = []
        self.report.abandoned += self.in_flight
        self.in_flight = 0
        self._acks.clear()
        self._nacks.clear()
        self._notify_settled()

    async def _monitor_loop(self) -> None:
        tick = min(0.05, max(self.drain_idle_seconds / 5, 0.005))
        last_beat = 0.0
        last_beat_progress = -1.0
        depth_reporter = getattr(self.consumer, "depth", None) if self.observer.enabled else None
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            self._drain_reports()
            if now - last_beat >= 1.0:
                last_beat = now
                # A heartbeat means progress, not just a live loop: an idle app that keeps polling, or a
                # busy one that keeps settling. A stuck handler or a hung poll stops the heartbeats.
                if self._last_activity > last_beat_progress or (self.in_flight == 0 and self._last_poll
                                                                 > last_beat_progress):
                    self.observer.on_heartbeat(self.name)
                last_beat_progress = now
                self.observer.on_in_flight(self.name, self.in_flight)
                if depth_reporter is not None:
                    with contextlib.suppress(Exception):
                        self.observer.on_depth(self.name, self.input.value, await depth_reporter())
            if self.stop_when_drained:
                if self._instant_drain:
                    self._stop_if_drained()
                elif self._looks_drained(now) and await self._consumer_drained(now):
                    logger.info("%s: input drained", self.name)
                    self.request_stop()

    def _stop_if_drained(self) -> None:
        """On the loop, for a consumer with an instant, exact ``is_drained()``."""
        if not self._looks_drained(time.monotonic()):
            return
        try:
            drained = self.consumer.is_drained()  # type: ignore[attr-defined]
        except Exception as exc:  # not drained: the monitor asks again on its next tick
            logger.debug("%s: is_drained() failed: %s", self.name, exc)
            return
        if drained:
            logger.info("%s: input drained", self.name)
            self.request_stop()

    def _looks_drained(self, now: float) -> bool:
        """Everything received is settled, a poll came back empty since (unless the consumer's drain check is
        exact), and nothing happened for a while."""
        return (not self._stopping and self.in_flight == 0 and not self.inbox and not self._acks
                and not self._nacks and not self._transaction_open
                and (self._instant_drain or self._last_empty_poll > self._last_received)
                and now - self._last_activity >= self.drain_idle_seconds)

    async def _consumer_drained(self, now: float) -> bool:
        """The consumer's own word, when it can give one (``is_drained()``: e.g. a delayed redelivery is still
        due, or Kafka has not assigned partitions yet). Asked off the loop (it may query the broker), at most
        ten times a second."""
        check = getattr(self.consumer, "is_drained", None)
        if check is None:
            return True
        if now < self._next_drain_check:
            return False
        self._next_drain_check = now + 0.1
        idle = self._drain_check_idle

        def ask() -> bool:
            try:
                return bool(check())
            finally:
                idle.set()

        idle.clear()
        try:
            drained = await asyncio.to_thread(ask)
        except Exception as exc:  # a broker query that failed: not drained, ask again later
            logger.debug("%s: is_drained() failed: %s", self.name, exc)
            return False
        return bool(drained) and self._looks_drained(time.monotonic())

    # ------------------------------------------------------------------ rebalance

    async def _on_revoke(self, partitions: Sequence[PartitionId]) -> None:
        """Before partitions are taken away: abandon their queued work, finish the rest, flush outputs."""
        self._revoked.update(partitions)
        try:
            self.inbox = deque(kept for kept in (self._drop_revoked(b) for b in self.inbox) if kept)
            deadline = time.monotonic() + self.engine.shutdown_timeout_seconds
            self._flush_outputs()
            await self._wait_settled(deadline)
            for producer in self.producers:
                await producer.flush(max(0.1, deadline - time.monotonic()))
            self._drain_reports()
            await self._flush_acks()
        finally:
            self._revoked.difference_update(partitions)

    # ------------------------------------------------------------------ helpers

    def _backoff(self, attempt: int) -> float:
        return float(min(self.engine.retry_backoff_max_seconds, self.engine.retry_backoff_seconds * 2 ** (attempt - 1)))

    def _log_retry(self, token: Token, attempt: int, exc: BaseException) -> None:
        logger.warning("%s: handler failed on %s (%s: %s); retry %d of %d", self.name, _describe(token),
                       type(exc).__name__, exc, attempt, self.engine.max_retries)


def _decode(env: Envelope, deserialize: Callable[[bytes], Any], validate: Callable[[Any], Any], max_deliveries: int,
            fail: Callable[[Envelope, str, BaseException], None]) -> Any:
    """The message of an envelope, or ``_FAILED`` after ``fail(env, stage, exc)`` (redelivery, deserialize or
    validate). The inline loop does the same unrolled, to save this call per message."""
    if env.attempt > max_deliveries:
        fail(env, "redelivery", _redelivered(env, max_deliveries))
        return _FAILED
    try:
        data = deserialize(env.value)
    except Exception as exc:
        fail(env, "deserialize", exc)
        return _FAILED
    try:
        return validate(data)
    except Exception as exc:
        fail(env, "validate", exc)
        return _FAILED


def _redelivered(env: Envelope, limit: int) -> MessageError:
    return MessageError(f"delivered {env.attempt} times (max_deliveries={limit}); giving up on it", env.value)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, MessageError):
        return exc.reason
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _describe(token: Token) -> str:
    if isinstance(token, _Group):
        first, last = token.members[0], token.members[-1]
        return f"batch of {len(token.members)} ({first.describe()} .. {last.describe()})"
    return token.describe()


def _size(token: Token) -> int:
    return len(token.members) if isinstance(token, _Group) else 1


async def _wait_task(task: asyncio.Task[None], timeout: float) -> None:
    if task.done():
        return
    done: set[asyncio.Task[None]] = set()
    if timeout > 0:
        done, _ = await asyncio.wait({task}, timeout=timeout)
    if not done:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
