"""A run's shutdown, the only one: stop fetching, let in-flight work finish within ``shutdown_timeout_seconds``,
give up on the rest (no handler call starts after that), flush the producers, acknowledge what is finished, close
the parts. Each step is said where it is done."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from volley.ports import Consumer, Producer
from volley.run.lanes import AsyncLanes
from volley.run.sync_executor import SyncExecutor
from volley.run.tasks import cancel, failed

if TYPE_CHECKING:
    from volley.run.run import Run

logger = logging.getLogger("volley")


async def shut_down(run: Run, tasks: dict[str, asyncio.Task[None]]) -> None:
    """The run's tasks (fetch, process, ack, monitor) stopped and its parts closed, in this order."""
    settlement = run.settlement
    deadline = time.monotonic() + run.engine.shutdown_timeout_seconds
    run.observer.on_ready(run.name, False)
    # 1. Stop consuming. Cancelling a poll is safe: what it would have returned was never acknowledged.
    await cancel(tasks["fetch"])
    # 2. Finish in-flight work within the deadline.
    await _finish_in_flight(run, tasks["process"], deadline)
    # 3. Give up on what is left: no handler call starts after this, no record is produced again.
    run.stop.abandon()
    await cancel(tasks["process"])
    _raise_late_crash(run, tasks["process"])
    if run.barrier is not None:  # a transaction still committing: its commit must not be cut
        await run.barrier.close(deadline - time.monotonic())
    if isinstance(run.executor, AsyncLanes):
        await run.executor.close(1.0)
    settlement.cancel_retries()
    # 4. Flush the producers so that outputs in flight are confirmed (and their inputs acked).
    await _flush_outputs(run, deadline)
    if settlement.in_flight:
        logger.warning("%s: shutting down with %d input(s) unfinished; they stay unacknowledged and will be "
                       "delivered again", run.name, settlement.in_flight)
        settlement.abandon(settlement.in_flight)
    settlement.closed = True  # late results of a hung handler call and late reports change nothing now
    if run.tracing is not None:
        run.tracing.close()
    # 5. Acknowledge what is finished (an ack in progress completes).
    await run.acker.close(tasks["ack"], max(1.0, deadline - time.monotonic()))
    await run.drain.close(tasks["monitor"])
    # 6. Close the parts.
    parts: list[Consumer | Producer] = [run.consumer, *run.producers]
    for part in parts:
        try:
            await part.close()
        except Exception as exc:
            logger.error("%s: closing %r failed: %s", run.name, part, exc)
    if isinstance(run.executor, SyncExecutor):
        if run.executor.thread_call_since:
            run.still_running = getattr(run.app.func, "__qualname__", repr(run.app.func))
            logger.error("%s: the handler %s is still running a call past the shutdown deadline (%.1f s); "
                         "its message was not acknowledged and will be delivered again", run.name,
                         run.still_running, run.engine.shutdown_timeout_seconds)
        run.executor.close()
    run.observer.on_ready(run.name, False)  # again: a consumer may have reported ready while it closed
    run.observer.on_stop(run.name)
    run.report.elapsed_seconds = time.monotonic() - run.started_at
    logger.info("%s: stopped (%s)", run.name, run.report)


async def _finish_in_flight(run: Run, process: asyncio.Task[None], deadline: float) -> None:
    """Step 2: until nothing is in flight, nor buffered, nor in a transaction, or ``deadline``. Once the process
    task has failed (before the shutdown or during it) nothing leaves the inbox any more: then only the calls the
    executor runs on its own (an async handler's lanes) are waited for."""
    settlement, barrier, inbox, executor = run.settlement, run.barrier, run.inbox, run.executor

    def unsettled() -> bool:
        if failed(process):
            return executor is not None and executor.working()
        return bool(settlement.in_flight or inbox or (barrier is not None and barrier.busy))

    await run.wait_until(unsettled, deadline)


def _raise_late_crash(run: Run, process: asyncio.Task[None]) -> None:
    """A process task that failed once the shutdown had begun: said, and the run ends by raising it."""
    error = None if process.cancelled() else process.exception()
    if error is not None and error is not run.crashed:
        logger.error("%s: the process task failed while shutting down: %s: %s", run.name,
                     type(error).__qualname__, error, exc_info=error)
        if run.stop_error is None:
            run.stop_error = error


async def _flush_outputs(run: Run, deadline: float) -> None:
    """Step 4: outputs in flight confirmed, their reports taken (their inputs can then be acked)."""
    run.settlement.flush_outputs()
    for producer in run.producers:
        try:
            await producer.flush(max(0.1, deadline - time.monotonic()))
        except Exception as exc:
            logger.error("%s: flushing a producer at shutdown failed: %s", run.name, exc)
    run.settlement.drain_reports()
