"""One run of a stream app: start the parts, fetch with backpressure, hand batches to the executor, shut down.

The run owns every task and thread it starts, and its shutdown is the only one: stop fetching, let in-flight
work finish within ``shutdown_timeout_seconds``, then give up on the rest (no handler call starts after that),
flush the producers, acknowledge what is finished, close the parts. A run cancelled from outside
(``asyncio.wait_for``, ``asyncio.timeout``) shuts down the same way and then raises ``CancelledError``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable

from volley import gctune
from volley.errors import VolleyError
from volley.message import Envelope
from volley.ports import (
    Consumer,
    Instrumented,
    PartitionId,
    Pausable,
    Producer,
    ReadinessReporter,
    RebalanceAware,
    Transactional,
)
from volley.queues import ResolvedQueue
from volley.run.acking import Acker
from volley.run.app import RunnableApp
from volley.run.drain import DrainMonitor
from volley.run.handling import Handling
from volley.run.lanes import AsyncLanes
from volley.run.parts import output_slots, run_tracing, slot_topics
from volley.run.rebalance import Rebalance, drop_revoked
from volley.run.report import RunReport
from volley.run.retry import RetryPolicy
from volley.run.routing import Router
from volley.run.settlement import Settlement
from volley.run.shutdown import shut_down
from volley.run.stopping import StopSignal
from volley.run.sync_executor import SyncExecutor
from volley.run.tasks import unexpected_end
from volley.run.transactions import TransactionBarrier

logger = logging.getLogger("volley")

BLOCKED_EXIT_CODE = 70  # app() / volley run: a handler call blocked the loop past the shutdown deadline


class Run:
    def __init__(self, app: RunnableApp, *, stop_when_drained: bool, drain_idle_seconds: float,
                 max_messages: int | None, hard_deadline: bool = False) -> None:
        engine = app.engine
        self.app = app
        self.engine = engine
        self.name = engine.app_name
        self.max_messages = max_messages
        self.hard_deadline = hard_deadline
        self.stop = StopSignal()
        self.report = RunReport()
        self.input: ResolvedQueue = engine.input
        self.observer = engine.observer
        timed = engine.observer.enabled

        producers, routes, dlq = output_slots(engine)
        self.producers = producers
        self.consumer: Consumer = self.input.make_consumer()
        self.transactional = isinstance(self.consumer, Transactional) and bool(self.consumer.transactional)
        self.acker = Acker(self.consumer, self.name, self.report,
                           redelivery_delay_seconds=engine.redelivery_delay_seconds,
                           backoff_max_seconds=engine.retry_backoff_max_seconds, transactional=self.transactional)
        retry = RetryPolicy(self.name, engine.max_retries, engine.retry_backoff_seconds,
                            engine.retry_backoff_max_seconds, self.stop)
        self.tracing = run_tracing(engine, dlq, self.report)
        if self.tracing is not None:
            retry.on_retry = self.tracing.retried
        self.settlement = Settlement(
            app_name=self.name, source=self.input.value, producers=producers, dlq=dlq, acker=self.acker,
            observer=self.observer, timed=timed, max_retries=engine.max_retries, backoff=retry.delay,
            on_failure=engine.on_failure, transactional=self.transactional, stop=self.stop,
            request_stop=self.request_stop, tracing=self.tracing, slot_topics=slot_topics(routes, len(producers)))
        self.handling = Handling(app, self.input, Router(routes), retry, max_deliveries=engine.max_deliveries,
                                 timed=timed, tracing=self.tracing, poisoned=self.settlement.poisoned)
        self.inbox: deque[list[Envelope]] = deque()
        self.rebalance = Rebalance(self.settlement, self.inbox, timeout_seconds=engine.shutdown_timeout_seconds,
                                   wait_released=self.wait_revoked)
        self.barrier: TransactionBarrier | None = None
        if self.transactional:
            assert isinstance(self.consumer, Transactional)
            self.barrier = TransactionBarrier(
                self.consumer, self.settlement, app_name=self.name,
                timeout_seconds=engine.shutdown_timeout_seconds,
                interval_seconds=engine.transaction_interval_seconds,
                max_messages=engine.transaction_max_messages, wait_until=self.wait_until,
                quiesce=self._quiesce, queued=self._queued, drop_queued=self.inbox.clear,
                on_abort=self._stop_transaction_work, wake=self._wake_processing, crash=self.request_stop)
        self.drain = DrainMonitor(self, self.consumer, self.observer, app_name=self.name, source=self.input.value,
                                  stop_when_drained=stop_when_drained, drain_idle_seconds=drain_idle_seconds,
                                  observed=timed)
        self.executor: SyncExecutor | AsyncLanes | None = None
        self.last_received = 0.0
        self.last_empty_poll = -1.0
        self.last_poll = 0.0
        self.still_running: str | None = None  # a handler call that outlived shutdown, named for app()
        self.stop_error: BaseException | None = None
        self.crashed: BaseException | None = None  # the first task failure seen before the shutdown
        self._loop: asyncio.AbstractEventLoop | None = None
        self._wake: asyncio.Event | None = None
        self._stopped: asyncio.Event | None = None
        self._finished = threading.Event()
        self._poll_failures = 0
        self.started_at = 0.0

    # ------------------------------------------------------------------ what drain detection reads

    @property
    def in_flight(self) -> int:
        return self.settlement.in_flight

    @property
    def last_activity(self) -> float:
        return self.settlement.last_activity

    @property
    def idle(self) -> bool:
        return (not self.stop.is_stopping and self.settlement.in_flight == 0 and not self.inbox
                and not self.acker.pending() and not (self.barrier is not None and self.barrier.busy))

    # ------------------------------------------------------------------ lifecycle

    async def run(self) -> RunReport:
        started = self.started_at = time.monotonic()
        loop = self._loop = asyncio.get_running_loop()
        self.stop.bind(loop)
        self.settlement.bind(loop)
        self._wake = asyncio.Event()
        self._stopped = asyncio.Event()
        if self.stop.is_stopping:
            self._stopped.set()
        await self._start_parts()
        self.executor = self._executor()
        self.rebalance.drop_queued = self.executor.drop_queued
        if self.hard_deadline:
            threading.Thread(target=self._watchdog, name=f"volley-{self.name}-watchdog", daemon=True).start()
        logger.info("%s: consuming %s (%s)", self.name, self.input.name, self.input.value)
        tune_gc = self.engine.tune_gc
        if tune_gc:
            gctune.acquire()
        tasks = {
            "fetch": asyncio.create_task(self._fetch_loop(), name=f"volley-{self.name}-fetch"),
            "process": asyncio.create_task(self._process_loop(), name=f"volley-{self.name}-process"),
            "ack": asyncio.create_task(self.acker.run(self.drain.after_ack), name=f"volley-{self.name}-ack"),
            "monitor": asyncio.create_task(self.drain.run(), name=f"volley-{self.name}-monitor"),
        }
        crashed: BaseException | None = None
        cancelled: asyncio.CancelledError | None = None
        try:
            crashed = await self._until_stopped(tasks)
        except asyncio.CancelledError as exc:  # cancelled from outside: shut down, then say so
            cancelled = exc
        finally:
            self.stop.stop()
            try:
                await shut_down(self, tasks)
            finally:
                if tune_gc:
                    gctune.release()
                if not self.report.elapsed_seconds:  # set at the end of _shutdown, unless that raised
                    self.report.elapsed_seconds = time.monotonic() - started
                self._finished.set()
        if cancelled is not None:
            raise cancelled
        error = crashed or self.stop_error
        if error is not None:
            raise error
        return self.report

    async def _until_stopped(self, tasks: dict[str, asyncio.Task[None]]) -> BaseException | None:
        """Wait for a stop request or for a task of the run to end; why a task ended early, if one did."""
        assert self._stopped is not None
        waiter = asyncio.create_task(self._stopped.wait())
        watched = {waiter, *tasks.values()}
        try:
            done, _ = await asyncio.wait(watched, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()
        crashed: BaseException | None = None
        for name, task in tasks.items():
            if task in done:
                error = unexpected_end(self.name, name, task)
                if error is not None:  # said now, not only when the shutdown is over
                    self.crashed = self.crashed or error
                    logger.error("%s: the %s task failed: %s: %s; stopping", self.name, name,
                                 type(error).__qualname__, error, exc_info=error)
                crashed = crashed or error
        return crashed

    async def _stop_transaction_work(self) -> None:
        """A transaction aborts: work of its inputs still running (async lanes) must not settle later."""
        if isinstance(self.executor, AsyncLanes):
            await self.executor.reset(1.0)

    async def _quiesce(self) -> None:
        """A transaction closes: the work of its inputs (async lanes run on their own) must be done first."""
        if isinstance(self.executor, AsyncLanes):
            await self.executor.quiesce()

    def _wake_processing(self) -> None:
        if self._wake is not None:
            self._wake.set()

    def _executor(self) -> SyncExecutor | AsyncLanes:
        if self.app.is_async:
            return AsyncLanes(self.handling, self.settlement, ordering=self.input.ordering,
                              max_in_flight=self.engine.max_in_flight, revoked=self.rebalance.revoked,
                              crash=self.request_stop)
        return SyncExecutor(self.handling, self.settlement, self.stop, self.name,
                            auto=self.engine.sync_handler_mode == "auto", revoked=self.rebalance.revoked)

    async def _start_parts(self) -> None:
        for part in (self.consumer, *self.producers):
            if isinstance(part, Instrumented) and self.observer.enabled:
                part.instrument(self.observer, self.name)
        if isinstance(self.consumer, RebalanceAware):
            self.consumer.set_revoke_handler(self.rebalance.on_revoke)
        started: list[Consumer | Producer] = []
        try:
            for producer in self.producers:
                await producer.start()
                started.append(producer)
            await self.consumer.start()
            started.append(self.consumer)
            self.observer.on_start(self.name)  # may refuse to start (a taken metrics port)
        except BaseException:
            for part in reversed(started):
                with contextlib.suppress(Exception):
                    await part.close()
            self._finished.set()
            raise
        if not (isinstance(self.consumer, ReadinessReporter) and self.consumer.reports_readiness):
            self.observer.on_ready(self.name, True)  # else the consumer says when (Kafka: once assigned)

    def request_stop(self, error: BaseException | None = None) -> None:
        """On the loop. ``error``: the run ends by raising it (the first one wins)."""
        if error is not None and self.stop_error is None:
            self.stop_error = error
        self.stop.stop()
        if self._stopped is not None:
            self._stopped.set()
        if self._wake is not None:
            self._wake.set()

    def request_stop_threadsafe(self) -> None:
        """From any thread, or a signal handler: threads see the stop at once, the loop when it next runs."""
        self.stop.stopping.set()
        loop = self._loop
        if loop is None:
            self.request_stop()
            return
        with contextlib.suppress(RuntimeError):  # the loop is closed: the run is over
            loop.call_soon_threadsafe(self.request_stop)

    def _watchdog(self) -> None:
        """app() / volley run: once stop was requested, a handler call that blocks the event loop past the
        shutdown deadline ends the process, so that a deadline holds even for a handler that never returns.
        Nothing unfinished is acknowledged: the process ends before any ack of it."""
        self.stop.stopping.wait()
        grace = self.engine.shutdown_timeout_seconds + 1.0
        if self._finished.wait(grace):
            return
        executor = self.executor
        if isinstance(executor, SyncExecutor) and executor.inline_since:
            name = getattr(self.app.func, "__qualname__", repr(self.app.func))
            logger.critical("%s: the handler %s has blocked the event loop for %.1f s, past the shutdown deadline "
                            "(%.1f s); exiting with code %d without acknowledging unfinished messages", self.name,
                            name, time.perf_counter() - executor.inline_since, self.engine.shutdown_timeout_seconds,
                            BLOCKED_EXIT_CODE)
            logging.shutdown()
            os._exit(BLOCKED_EXIT_CODE)

    def _queued(self) -> int:
        """Inputs fetched and not yet begun (buffered in the inbox)."""
        return sum(len(batch) for batch in self.inbox)

    async def wait_settled(self, deadline: float) -> None:
        """Until nothing is in flight, nor buffered, nor in a transaction (its commit must not be cut), or
        ``deadline``."""
        settlement, barrier, inbox = self.settlement, self.barrier, self.inbox
        await self.wait_until(lambda: bool(settlement.in_flight or inbox or (barrier is not None and barrier.busy)),
                              deadline)

    async def wait_revoked(self, revoked: set[PartitionId], deadline: float) -> None:
        """A revoke: until no work of those partitions is under way (a call, a result not handed over, a record
        buffered or waiting to be produced again), or ``deadline``; work of other partitions goes on meanwhile.
        In a transaction, until nothing is (``wait_settled``): the revoke commits it, with all the work it holds."""
        executor, settlement = self.executor, self.settlement
        if self.barrier is not None or executor is None:
            await self.wait_settled(deadline)
            return
        await self.wait_until(lambda: executor.holds(revoked) or settlement.unsent_for(revoked), deadline)

    async def wait_until(self, unsettled: Callable[[], bool], deadline: float) -> None:
        """While ``unsettled()`` says so, until ``deadline``: woken by every settlement, reports handled meanwhile."""
        settlement = self.settlement
        while unsettled() and time.monotonic() < deadline:
            settlement.settled.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(settlement.settled.wait(), max(0.0, min(0.5, deadline - time.monotonic())))
            settlement.drain_reports()

    # ------------------------------------------------------------------ fetching

    def _room(self, bound: int) -> int:
        """How many more inputs may be fetched now (0: wait), under backpressure and the barrier."""
        settlement = self.settlement
        room = bound - settlement.in_flight
        if self.barrier is not None:  # a transaction takes what it can until it is due; the next one waits
            room = min(room, self.barrier.room(self._queued()))
        if self.max_messages is not None:
            remaining = self.max_messages - self.report.consumed
            if remaining <= 0 and settlement.in_flight == 0 and not self.inbox \
                    and not (self.barrier is not None and self.barrier.busy):
                self.request_stop()
            room = min(room, remaining)
        return room

    async def _fetch_loop(self) -> None:
        consumer = self.consumer
        pausable = consumer if isinstance(consumer, Pausable) else None
        paused = False
        engine = self.engine
        settlement = self.settlement
        batch_size = engine.consume_batch_size
        bound = engine.max_buffered
        if self.transactional:
            # What is handled while a transaction commits stays unsettled until the next one begins, so the
            # default bound would stall the worker at every commit: by default, a whole transaction's inputs.
            bound = min(bound, engine.transaction_max_messages) if engine.max_buffered_given \
                else engine.transaction_max_messages
        poll = engine.poll_interval_seconds
        assert self._wake is not None
        while not self.stop.is_stopping:
            room = self._room(bound)
            if room <= 0:
                if self.stop.stopping.is_set():  # _room found max_messages reached
                    return
                if pausable is not None and not paused:
                    pausable.pause()
                    paused = True
                settlement.settled.clear()
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(settlement.settled.wait(), max(poll, 0.05))
                if not paused:
                    continue
                room = 0  # keep a group member alive: librdkafka needs polls to serve the group protocol
            elif paused and pausable is not None:
                pausable.resume()
                paused = False
            batch = await self._poll(min(batch_size, room) if room > 0 else 1, poll)
            if batch is None:
                continue
            if not batch:
                self.last_empty_poll = self.last_poll
                await asyncio.sleep(0)  # a consumer that returns at once (timeout 0) must not starve the loop
                continue
            settlement.in_flight += len(batch)
            self.report.consumed += len(batch)
            settlement.last_activity = self.last_received = time.monotonic()
            self.inbox.append(batch)
            self._wake.set()

    async def _poll(self, count: int, timeout: float) -> list[Envelope] | None:
        """One consume call; None after a failure (a broker outage is retried with backoff, and reported; a
        VolleyError stops the run)."""
        engine = self.engine
        try:
            batch = await self.consumer.consume(count, timeout)
        except VolleyError as exc:
            self.request_stop(exc)
            return None
        except Exception as exc:
            self._poll_failures += 1
            delay = min(engine.retry_backoff_max_seconds,
                        engine.retry_backoff_seconds * 2 ** min(self._poll_failures, 10))
            logger.error("%s: consuming from %s failed (%s: %s); retrying in %.1f s", self.name,
                         self.input.value, type(exc).__name__, exc, delay)
            self.report.add_error(f"consume: {type(exc).__name__}: {exc}")
            await self.stop.wait(delay)
            return None
        self.last_poll = time.monotonic()
        self._poll_failures = 0
        return batch if isinstance(batch, list) else list(batch)

    # ------------------------------------------------------------------ processing

    async def _process_loop(self) -> None:
        assert self._wake is not None and self.executor is not None
        inbox, executor, barrier = self.inbox, self.executor, self.barrier
        settlement, revoked = self.settlement, self.rebalance.revoked
        batch_size = self.engine.consume_batch_size
        while True:
            if not inbox:
                if not await self._idle():
                    return
                continue
            batch = inbox.popleft()
            # Merge small batches so that a slow consumer does not cost one thread hop per message.
            while inbox and len(batch) < batch_size:
                batch = batch + inbox.popleft()
            if revoked:
                batch = drop_revoked(batch, revoked, settlement)
                if not batch:
                    continue
            if barrier is not None and not await barrier.add(batch):
                continue  # fetched before an abort's rewind: it comes again
            await executor.run(batch)
            if barrier is not None and (barrier.due() or revoked):
                await barrier.finish()

    async def _idle(self) -> bool:
        """Nothing is buffered: close the open transaction once it is due (or the run stops, or partitions are
        revoked), else wait for work or for its interval. False once the run is over."""
        wake, barrier = self._wake, self.barrier
        assert wake is not None
        if barrier is not None and barrier.open:
            if barrier.due() or self.rebalance.revoked or self.stop.is_stopping:
                await barrier.finish()
                return True
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(wake.wait(), barrier.remaining())
            return True
        if self.stop.is_stopping and self.settlement.in_flight == 0:
            return False
        wake.clear()
        await wake.wait()
        return True
