"""The transactional barrier (exactly-once): inputs and outputs of one transaction committed atomically.

A transaction is sized by time and count: it opens with the first batch after the last one closed (``add``,
before the batch's outputs are produced), takes every batch fetched within ``interval_seconds`` up to
``max_messages`` inputs, and then closes (``finish``): the work of its inputs finishes and its outputs are
handed to the producers. Waiting for their delivery and committing (``_end``) take the broker a few round
trips; they run in the background while the next transaction's inputs are fetched and handled. Until the
ending one has committed, the next one cannot begin (a producer has one transaction at a time), so what its
handling produces waits (settlement stages the outcomes) and is applied, in order, once it has begun.

A transaction whose outputs failed, or whose inputs did not settle in time, aborts (the consumer rewinds to
its last commit): it is processed again, with everything the next one took meanwhile. Nothing of either may
settle later: late reports and dead letters would leak into a later transaction, so settlement moves its
generation on and work still running is given up. The interval is what a read_committed reader waits for
outputs, at most; one transaction per consumed batch would pay the broker's commit (tens of milliseconds)
every few hundred messages.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable

from volley.errors import DeliveryError
from volley.message import Envelope
from volley.ports import Transactional
from volley.run.settlement import Settlement
from volley.run.tokens import DeadLetter

logger = logging.getLogger("volley")

Counts = tuple[int, int]  # RunReport.settled_counts


class TransactionBarrier:
    def __init__(self, consumer: Transactional, settlement: Settlement, *, app_name: str, timeout_seconds: float,
                 interval_seconds: float, max_messages: int,
                 wait_until: Callable[[Callable[[], bool], float], Awaitable[None]],
                 quiesce: Callable[[], Awaitable[None]], queued: Callable[[], int], drop_queued: Callable[[], None],
                 on_abort: Callable[[], Awaitable[None]], wake: Callable[[], None],
                 crash: Callable[[BaseException], None]) -> None:
        self.consumer = consumer
        self.settlement = settlement
        self.app_name = app_name
        self.timeout_seconds = timeout_seconds
        self.interval_seconds = interval_seconds
        self.max_messages = max_messages
        self.wait_until = wait_until  # (still unsettled?, deadline): waits while it says so, until the deadline
        self.quiesce = quiesce  # until the work of every input begun so far is done (async handlers)
        self.queued = queued  # inputs fetched, not begun: they belong to the next transaction
        self.drop_queued = drop_queued  # forgets them: a rewind gives them back too
        self.on_abort = on_abort  # stops the aborted transactions' work still running
        self.wake = wake  # the process loop: a transaction ended (the next one may be due)
        self.crash = crash  # ends the run with a fatal error of the consumer's
        self.open = False  # taking inputs: begun, or to begin once the ending one committed
        self.closing = False  # its work is finishing (``finish``): nothing more joins it, nothing is fetched
        self.count = 0  # inputs in the open transaction
        self._started = 0.0
        self._batch: list[Envelope] = []
        self._counts_at_begin = settlement.report.settled_counts()
        self._ending: asyncio.Task[None] | None = None  # the closed transaction settling and committing
        self._aborting = False  # the ending one aborts: what was fetched until the rewind is dropped
        self._broken = False  # a fatal error ended transactions for this run

    @property
    def busy(self) -> bool:
        """A transaction is open, or one is still settling or committing."""
        return self.open or self._ending is not None

    async def add(self, batch: list[Envelope]) -> bool:
        """``batch`` joins the open transaction (opened now if none is): before its outputs are produced.
        False when it was given up instead (fetched before an abort's rewind: it comes again)."""
        generation = self.settlement.generation
        if self._aborting:
            await self.ended()
        if self.settlement.generation != generation:
            return False  # in flight when the abort gave up its work: counted as abandoned there
        if self._broken:  # fetched after a fatal error gave up the work in flight: it comes again
            self.settlement.abandon(len(batch))
            return False
        if not self.open:
            self.open = True
            self._started = time.monotonic()
            if self._ending is None:  # else the ending one begins it once committed
                self._counts_at_begin = self.settlement.report.settled_counts()
                await self.consumer.begin()
        self._batch.extend(batch)
        self.count += len(batch)
        return True

    def due(self) -> bool:
        """Whether the open transaction is full or old enough to commit, or must abort (no use filling it)."""
        return (self.count >= self.max_messages or time.monotonic() - self._started >= self.interval_seconds
                or bool(self.settlement.abort_reason))

    def remaining(self) -> float:
        """Seconds until the open transaction is due by time."""
        return max(0.0, self._started + self.interval_seconds - time.monotonic())

    def room(self, queued: int) -> int:
        """How many more inputs may be fetched for the open (or next) transaction, ``queued`` fetched already."""
        return 0 if self.closing else self.max_messages - self.count - queued

    async def ended(self) -> None:
        """Until the transaction that closed last has committed or aborted."""
        ending = self._ending
        if ending is not None:
            await asyncio.wait({ending})

    async def close(self, timeout: float) -> None:
        """Shutdown: let the ending transaction finish within ``timeout``, then give up on it."""
        ending = self._ending
        if ending is None:
            return
        done, _ = await asyncio.wait({ending}, timeout=max(0.0, timeout))
        if not done:
            ending.cancel()
            await asyncio.wait({ending})

    async def finish(self) -> None:
        """Close the open transaction: the work of its inputs finishes and its outputs go to the producers; their
        delivery and the commit (or abort) follow in the background (``_end``)."""
        await self.ended()  # one at a time: this one may not even have begun before the last one committed
        if not self.open:
            return  # the last one aborted, and this one's inputs were given back with it
        settlement = self.settlement
        self.closing = True
        deadline = time.monotonic() + self.timeout_seconds
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.quiesce(), max(0.0, deadline - time.monotonic()))
            settlement.flush_outputs()
            # From here on, what is handled belongs to the next transaction: it waits until that one begins.
            settlement.stage()
            batch, self._batch = self._batch, []
            letters, settlement.open_letters = settlement.open_letters, []
        finally:
            self.open = self.closing = False
            self.count = 0
        self._ending = asyncio.ensure_future(self._end(batch, letters, self._counts_at_begin, deadline))

    def _unsettled(self) -> int:
        """Inputs of the ending transaction not settled yet: all in flight but those fetched or taken since."""
        return self.settlement.in_flight - self.queued() - self.count

    async def _end(self, batch: list[Envelope], letters: list[DeadLetter], counts: Counts, deadline: float) -> None:
        """Wait for the closed transaction's inputs to settle, then commit them and their outputs atomically (or
        abort); then begin the next one, if it took inputs meanwhile, and apply what their handling produced."""
        settlement, consumer = self.settlement, self.consumer
        try:
            await self.wait_until(lambda: self._unsettled() > 0, deadline)
            reason, settlement.abort_reason = settlement.abort_reason, ""
            acker = settlement.acker
            acks, acker.acks = acker.acks, []
            unsettled = self._unsettled()
            if unsettled or reason:
                if reason:
                    logger.warning("%s: aborting the transaction: %s; its inputs will be processed again",
                                   self.app_name, reason)
                else:
                    logger.error("%s: aborting the transaction: %d input(s) did not settle within %g s; its inputs "
                                 "will be processed again", self.app_name, unsettled, self.timeout_seconds)
                self._aborting = True
                await acker.flush()  # the give-backs first: their attempts and delays outlive the rewind
                await consumer.abort()
                await self._forget(batch, letters, counts)
                return
            try:
                await consumer.commit(acks)
            except DeliveryError as exc:  # the consumer aborted and rewound: the inputs come again
                logger.error("%s: committing the transaction failed (%s); its inputs will be processed again",
                             self.app_name, exc)
                self._aborting = True
                await self._forget(batch, letters, counts)
                return
            settlement.letters_committed(letters)
            await acker.flush()
            if self.open:  # the next transaction took inputs meanwhile: it begins before their outputs go out
                # Counted from here: what this one settled (its reports came in after the next one opened) is
                # committed, and an abort of the next one must not take it back.
                self._counts_at_begin = settlement.report.settled_counts()
                await consumer.begin()
            settlement.unstage()
            settlement.notify()  # wakes the fetcher for the next transaction
        except Exception as exc:  # a fatal error of the consumer's: no transaction can follow
            self._broken = True
            # Nothing in flight can settle any more (the next one's outcomes wait staged, and would never be
            # applied): give it all up now, or shutdown waits its whole deadline for it. It comes again.
            with contextlib.suppress(Exception):
                await self._forget(batch, letters, counts)
            self.crash(exc)
        finally:
            self._aborting = False
            self._ending = None
            self.wake()

    async def _forget(self, batch: list[Envelope], letters: list[DeadLetter], counts: Counts) -> None:
        """After the consumer rewound to its last commit: nothing of the ending transaction settles, nor of what the
        next one took, nor of what was fetched for it; a fetch that returned during the abort or the failed commit
        included (its records come again from the rewind). No await between the rewind and the drops, so nothing
        fetched after it is dropped; then the work still running is stopped (async lanes)."""
        self.drop_queued()
        settlement = self.settlement
        settlement.give_up_work()
        settlement.abort_reason = ""  # set meanwhile by reports of the aborted records: the next one owes it nothing
        for group in (batch, self._batch):
            for env in group:
                env.pending = -1
        for letter in (*letters, *settlement.open_letters):
            letter.pending = -1
        settlement.open_letters.clear()
        self._batch = []
        self.open = False
        self.count = 0
        settlement.cancel_retries()
        settlement.report.void_since(counts)  # what settled in it is given back with it
        settlement.abandon(settlement.in_flight)
        settlement.acker.acks.clear()
        settlement.acker.nacks.clear()
        await self.on_abort()
