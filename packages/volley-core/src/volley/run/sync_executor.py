"""Where a sync handler runs: inline slices on the event loop while it is fast, else the handler thread.

In "auto" mode (the default) the first ``CALIBRATION_BATCHES`` batches run on the thread with every call
timed; if calls proved fast, later batches run inline, in slices of at most ``INLINE_SLICE_SECONDS`` between
which the loop serves I/O, acks and delivery reports: no thread hop at all, which matters because a hop per
batch makes the loop and the worker fight over the GIL. A call that takes longer than ``SLOW_CALL_SECONDS``
twice within a second (or ``VERY_SLOW_CALL_SECONDS`` once), or that raises with retries left (retries wait),
moves the rest of the batch, and every later batch, to the thread. "thread" mode skips the inline stage.

On the thread, finished messages are handed to the loop every ``THREAD_REPORT_SECONDS`` (so a slow handler's
outputs and acks flow steadily), and the thread checks between messages whether the run gave up on its work:
after a hung call finally returns at shutdown, nothing more is handled.

A call's time is its wall time less the time the OS kept the thread waiting for a CPU (``preemption.py``): on a
loaded machine a descheduled process makes fast calls look slow, and moving a fast handler to the thread then
costs every batch a thread hop and a fight over the GIL.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Callable, Sequence

from volley.message import Envelope
from volley.run.handling import Handling, Moved
from volley.run.preemption import RunQueueWait
from volley.run.settlement import Settlement
from volley.run.stopping import StopSignal
from volley.run.tokens import Outcome, any_revoked, is_revoked
from volley.threads import SerialThread

logger = logging.getLogger("volley")

INLINE_SLICE_SECONDS = 0.005
FAST_CALL_SECONDS = 0.002
SLOW_CALL_SECONDS = 0.02
VERY_SLOW_CALL_SECONDS = 0.2
THREAD_REPORT_SECONDS = 0.01
SWITCH_WAKE_SECONDS = 0.005  # an outcome parked at a partition switch wakes the loop at most this often
CALIBRATION_BATCHES = 2


class SyncExecutor:
    def __init__(self, handling: Handling, settlement: Settlement, stop: StopSignal, app_name: str, *,
                 auto: bool, revoked: set[tuple[str, int]]) -> None:
        self.handling = handling
        self.settlement = settlement
        self.stop = stop
        self.app_name = app_name
        self.slots = len(settlement.producers)
        self.revoked = revoked  # partitions being taken away: their messages not yet begun are dropped
        self.inline = auto
        self.calibrating = CALIBRATION_BATCHES if auto else 0
        self.inline_since = 0.0  # while an inline slice runs: when it began (the watchdog reads it), else 0
        self.thread_call_since = 0.0  # while the thread is inside a handler call: when it began, else 0
        self._thread_batch: Sequence[Envelope] = ()  # what the thread is working through (drop_queued marks it)
        # Its messages before this index are begun (finished, or in the call): drop_queued leaves them alone. The
        # thread takes each next message, and drop_queued marks what is left, under this lock.
        self._thread_begun = 0
        # Its messages before this index were handed to the loop; those from here to ``_thread_begun`` are its work
        # under way (a revoke waits for it: ``holds``). Both move under the lock; a batch stays until it is applied.
        self._thread_reported = 0
        self._parked: list[tuple[Outcome, int]] = []  # the thread's finished outcomes (and where each ends), in order
        self._group_batch: Sequence[Envelope] = ()  # a batch handler's batch while its call runs, until applied
        # Partitions given up while a batch was being handled inline: the rest of that batch skips their messages
        # (the revoke that gave them up may end before the batch does). Cleared when the next batch begins.
        self._dropped: set[tuple[str, int]] = set()
        self._claim = threading.Lock()
        self._last_slow = -1e9
        self._loop_waited: RunQueueWait | None = None  # opened on the loop thread, by its first slice
        self.worker = SerialThread(f"volley-{app_name}-handler")

    def working(self) -> bool:
        """Whether work would still finish without the process task: no, since the task awaiting the handler
        thread's batch is what hands the end of it over (what the thread parked meanwhile is collected anyway)."""
        return False

    def close(self) -> None:
        self.worker.stop()
        if self._loop_waited is not None:
            self._loop_waited.close()

    async def run(self, batch: Sequence[Envelope]) -> None:
        settlement = self.settlement
        apply = settlement.apply
        generation = settlement.generation  # moved on by an aborted transaction: this work is then given up
        self._dropped.clear()  # the inbox lost their messages when they were revoked
        if self.handling.batch_size:
            self._group_batch = batch
            try:
                apply(await self.worker.submit(lambda: self._batches(batch, generation)))
            finally:
                self._group_batch = ()
            return
        if self.calibrating:
            # Only a handler that proved fast runs inline: one that blocks from the start never touches the loop.
            self.calibrating -= 1
            out = await self._thread_applied(batch, lambda: self._on_thread(batch, None, generation, measure=True))
            # A few slow calls are expected (the first call warms caches, a GC pause lands in one).
            if out.slow_calls > max(1, len(batch) // 50):
                self.calibrating = 0
                self._go_threaded(f"{out.slow_calls} of {len(batch)} handler calls took over {FAST_CALL_SECONDS} s "
                                  f"(slowest {out.slowest:.4f} s)")
            elif not self.calibrating and self.inline:
                logger.debug("%s: sync handler calls are fast (%.6f s at most): running them inline", self.app_name,
                             out.slowest)
            return
        start = 0
        moved: Moved | None = None
        abandoned = self.stop.abandoned.is_set
        while start < len(batch) and self.inline and moved is None and not abandoned():
            out = Outcome(self.slots, 0, generation)
            start, moved = self._slice(batch, start, out)
            apply(out)
            if start < len(batch):
                await asyncio.sleep(0)  # let I/O, acks and delivery reports through between slices
                if settlement.generation != generation:
                    return  # its transaction aborted meanwhile: the rest is consumed again
        if start < len(batch) and not abandoned():
            rest = batch[start:] if start else batch
            first_failure = moved
            await self._thread_applied(rest, lambda: self._on_thread(rest, first_failure, generation, measure=False))

    async def _thread_applied(self, batch: Sequence[Envelope], work: Callable[[], Outcome]) -> Outcome:
        """Run ``work`` (``batch``) on the handler thread and apply what it returns at the end. The batch is the
        thread's from now on (a revoke marks what it has not begun, ``drop_queued``), and none of it is under way
        any more (``holds``) only once applied."""
        self._collect()  # (only a batch cancelled at shutdown can leave something parked)
        with self._claim:
            self._thread_batch, self._thread_begun, self._thread_reported = batch, 0, 0
        try:
            out = await self.worker.submit(work)
            self._collect()  # what it parked comes first
            self.settlement.apply(out)
            return out
        finally:
            self._collect()
            with self._claim:
                self._thread_batch, self._thread_begun, self._thread_reported = (), 0, 0

    def _slice(self, batch: Sequence[Envelope], start: int, out: Outcome) -> tuple[int, Moved | None]:
        """On the loop: handle from ``start`` until the slice ends; return where to resume and, when a call
        failed and must be retried on the thread, its first failure."""
        handle = self.handling.handle
        revoked = self.revoked | self._dropped if self._dropped else self.revoked
        perf = time.perf_counter
        waited = self._loop_waited
        if waited is None:
            waited = self._loop_waited = RunQueueWait()
        waited_before = waited()  # once per slice: a slice has at most one slow message, and it ends the slice
        previous = self.inline_since = perf()
        deadline = previous + INLINE_SLICE_SECONDS
        try:
            for index in range(start, len(batch)):
                now = perf()  # one clock read per message: the slice deadline, and the previous message's time
                if now > deadline:
                    # A message slower than SLOW_CALL_SECONDS is past the deadline too (it began at or after the
                    # slice did, and the slice is shorter), so only an ending slice asks whether its last message
                    # was slow. Only _slow_inline can move the handler to the thread while this loop runs, so it
                    # sees every slow message. The OS's part of the slice is not the handler's (at most a slice's
                    # worth too much is taken off).
                    if now - previous > SLOW_CALL_SECONDS:
                        took = now - previous - (waited() - waited_before)
                        if took > SLOW_CALL_SECONDS:
                            self._slow_inline(now, took)
                    out.handled = index - start
                    return index, None
                previous = now
                if revoked and is_revoked(batch[index], revoked):
                    out.abandoned += 1
                    continue
                moved = handle(batch[index], out, False)
                if moved is not None:
                    self._go_threaded(f"the handler raised {type(moved.error).__name__}")
                    out.handled = index - start
                    return index, moved
        finally:
            self.inline_since = 0.0
        out.handled = len(batch) - start
        return len(batch), None

    def _slow_inline(self, now: float, took: float) -> bool:
        """One slow message may be a garbage-collection pause; a handler slow again, or very slow, is not.
        Returns whether the handler still runs inline."""
        if took > VERY_SLOW_CALL_SECONDS or now - self._last_slow < 1.0:
            self._go_threaded(f"handling one message took {took:.3f} s")
        self._last_slow = now
        return self.inline

    def _go_threaded(self, why: str) -> None:
        if self.inline:
            self.inline = False
            logger.info("%s: %s: sync handler calls now run on their own thread, off the event loop",
                        self.app_name, why)

    def _on_thread(self, batch: Sequence[Envelope], first_failure: Moved | None, generation: int, *,
                   measure: bool) -> Outcome:
        """On the handler thread: handle a batch; hand over what is finished every THREAD_REPORT_SECONDS.
        ``measure``: time every call (calibration)."""
        waited = RunQueueWait() if measure else None  # opened here: it measures the thread that opens it
        try:
            return self._handle_on_thread(batch, first_failure, generation, waited)
        finally:
            if waited is not None:
                waited.close()

    def _handle_on_thread(self, batch: Sequence[Envelope], first_failure: Moved | None, generation: int,
                          waited: RunQueueWait | None) -> Outcome:
        settlement = self.settlement
        handle, resume = self.handling.handle, self.handling.resume
        abandoned = self.stop.abandoned.is_set
        revoked, given_up = self.revoked, self._dropped
        monotonic, perf = time.monotonic, time.perf_counter
        waited_before = waited() if waited is not None else 0.0
        out = Outcome(self.slots, 0, generation)
        reported = 0  # messages of the batch already handed to the loop (registered by _thread_applied)
        posted = monotonic()
        index = 0
        source, partition = None, None  # of the previous message
        for index, env in enumerate(batch):
            if abandoned():  # shutdown gave up on this work: the rest is delivered again
                out.handled = index - reported
                return out
            now = settlement.last_activity = monotonic()  # progress for the health probe, even mid-batch
            # What finished is parked before a call on another partition (the loop applies it when it collects:
            # a revoke does, so it never waits for a call on a partition it leaves alone; the loop is woken to
            # collect at most every SWITCH_WAKE_SECONDS for it), every THREAD_REPORT_SECONDS and before every call
            # while partitions are revoked (the loop woken).
            switched = env.partition != partition or env.source != source
            source, partition = env.source, env.partition
            since = now - posted
            wake = bool(revoked) or since >= THREAD_REPORT_SECONDS or (switched and since >= SWITCH_WAKE_SECONDS)
            if (wake or switched) and index > reported:
                out.handled = index - reported
                reported = index
                if wake:
                    posted = now
                out = self._park(out, index, generation, wake=wake)
            with self._claim:  # its partition is being, or was, given up (the batch's rest may come from inline)
                dropped = env.pending == -1 or (revoked and is_revoked(env, revoked)) \
                    or (given_up and is_revoked(env, given_up))
                self._thread_begun = index + 1
            if dropped:
                out.abandoned += 1
                continue
            called = self.thread_call_since = perf()
            try:
                if index == 0 and first_failure is not None:
                    resume(env, out, first_failure)  # its first call failed inline: its retries, here
                else:
                    handle(env, out)
            finally:  # a BaseException escaping the call ends the run: the thread is not in a call any more
                self.thread_call_since = 0.0
            if waited is not None:
                took = perf() - called
                waited_now = waited()
                took -= waited_now - waited_before  # the OS's part is not the handler's
                waited_before = waited_now
                out.slowest = max(out.slowest, took)
                if took > FAST_CALL_SECONDS:
                    out.slow_calls += 1
        out.handled = len(batch) - reported
        return out

    def _park(self, out: Outcome, index: int, generation: int, *, wake: bool) -> Outcome:
        """On the thread: ``out`` (the batch's messages before ``index``) is finished; the loop applies it when it
        next collects (woken to do so now if ``wake``). Returns the outcome to fill next."""
        with self._claim:
            self._parked.append((out, index))
        if wake:
            self.settlement.call_threadsafe(self._collect)
        following = Outcome(self.slots, 0, generation)
        following.slowest, following.slow_calls = out.slowest, out.slow_calls
        return following

    def _collect(self) -> None:
        """On the loop: apply what the thread parked, in order; those messages are no longer under way (a revoke
        waiting on them looks again)."""
        with self._claim:
            parked, self._parked = self._parked, []
            if parked:
                self._thread_reported = parked[-1][1]
        if parked:
            out = parked[0][0]
            for later, _ in parked[1:]:
                if later.generation == out.generation:
                    out.absorb(later)  # one settlement for them all (parked per partition run: often many)
                else:
                    self.settlement.apply(out)
                    out = later
            self.settlement.apply(out)
            self.settlement.settled.set()

    def holds(self, revoked: set[tuple[str, int]]) -> bool:
        """On the loop: whether work of these partitions is under way on the handler thread: in its call, or
        finished and not handed over yet (a batch handler's whole batch). Inline slices never are while the loop
        runs something else."""
        self._collect()
        with self._claim:
            under_way = self._thread_batch[self._thread_reported:self._thread_begun]
            group = self._group_batch
        return any(is_revoked(e, revoked) for e in under_way) or any(any_revoked(e, revoked) for e in group)

    def drop_queued(self, revoked: set[tuple[str, int]]) -> None:
        """On the loop, when a revoke ends: messages of those partitions that the thread has not begun are
        dropped (marked; the thread skips and abandons them), as their partitions now belong to another member.
        Those it finished but has not handed over yet, and the one in its call, settle as usual. The rest of a
        batch being handled inline skips them too."""
        with self._claim:
            self._dropped.update(revoked)
            for env in self._thread_batch[self._thread_begun:]:
                if is_revoked(env, revoked):
                    env.pending = -1

    def _batches(self, batch: Sequence[Envelope], generation: int) -> Outcome:
        out = Outcome(self.slots, len(batch), generation)
        self.thread_call_since = time.perf_counter()
        try:
            self.handling.handle_batch(batch, out, self.stop.abandoned.is_set)
        finally:
            self.thread_call_since = 0.0
        return out
