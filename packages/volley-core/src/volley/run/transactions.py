"""The transactional barrier (exactly-once): inputs and outputs of one transaction committed atomically.

A transaction is sized by time and count: it opens with the first batch after the last commit (``add``, before
the batch's outputs are produced), takes every batch fetched within ``interval_seconds`` up to ``max_messages``
inputs, and then closes (``finish``): nothing more is fetched, its inputs settle, and it commits with their
acks, or aborts when anything failed to deliver (the consumer rewinds to the last commit: all of it is
processed again). Nothing of an aborted transaction may settle later: late reports and dead letters would leak
into the next one. The interval is what a read_committed reader waits for outputs, at most; one transaction per
consumed batch would pay the broker's commit (tens of milliseconds) every few hundred messages.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable

from volley.errors import DeliveryError
from volley.message import Envelope
from volley.ports import Transactional
from volley.run.settlement import Settlement

logger = logging.getLogger("volley")


class TransactionBarrier:
    def __init__(self, consumer: Transactional, settlement: Settlement, *, app_name: str, timeout_seconds: float,
                 interval_seconds: float, max_messages: int, wait_settled: Callable[[float], Awaitable[None]],
                 queued: Callable[[], int], drop_queued: Callable[[], None],
                 on_abort: Callable[[], Awaitable[None]]) -> None:
        self.consumer = consumer
        self.settlement = settlement
        self.app_name = app_name
        self.timeout_seconds = timeout_seconds
        self.interval_seconds = interval_seconds
        self.max_messages = max_messages
        self.wait_settled = wait_settled
        self.queued = queued  # inputs fetched, not begun: they belong to the next transaction
        self.drop_queued = drop_queued  # forgets them: a rewind gives them back too
        self.on_abort = on_abort  # stops the aborted transaction's work still running
        self.open = False  # begun, not yet committed or aborted
        self.closing = False  # its commit (or abort) is under way: nothing more joins it, nothing is fetched
        self.count = 0  # inputs in the open transaction
        self._started = 0.0
        self._batch: list[Envelope] = []
        self._counts_at_begin = settlement.report.settled_counts()

    async def add(self, batch: list[Envelope]) -> None:
        """``batch`` joins the open transaction (opened now if none is): before its outputs are produced."""
        if not self.open:
            self.open = True
            self._started = time.monotonic()
            self._counts_at_begin = self.settlement.report.settled_counts()
            await self.consumer.begin()
        self._batch.extend(batch)
        self.count += len(batch)

    def due(self) -> bool:
        """Whether the open transaction is full or old enough to commit."""
        return self.count >= self.max_messages or time.monotonic() - self._started >= self.interval_seconds

    def remaining(self) -> float:
        """Seconds until the open transaction is due by time."""
        return max(0.0, self._started + self.interval_seconds - time.monotonic())

    def room(self, queued: int) -> int:
        """How many more inputs may be fetched for the open (or next) transaction, ``queued`` fetched already."""
        return 0 if self.closing else self.max_messages - self.count - queued

    async def finish(self) -> None:
        """Close the transaction: wait for its inputs to settle, then commit them and their outputs atomically
        (or abort)."""
        settlement = self.settlement
        self.closing = True
        deadline = time.monotonic() + self.timeout_seconds
        settlement.flush_outputs()
        await self.wait_settled(deadline)
        # The transaction stays open until its commit or abort has returned: no next batch is fetched, and
        # run_until_drained does not take the app for drained, while the broker is still committing.
        try:
            failed, settlement.transaction_failed = settlement.transaction_failed, False
            acker = settlement.acker
            acks, acker.acks = acker.acks, []
            unsettled = settlement.in_flight - self.queued()
            if unsettled or failed:
                logger.error("%s: aborting the transaction (%d unsettled); its inputs will be processed again",
                             self.app_name, unsettled)
                await self.on_abort()
                await self.consumer.abort()
                self._forget()
                return
            try:
                await self.consumer.commit(acks)
            except DeliveryError as exc:  # the consumer aborted and rewound: the batch comes again
                logger.error("%s: committing the transaction failed (%s); its inputs will be processed again",
                             self.app_name, exc)
                self._forget()
                return
            self._batch = []
            settlement.open_letters.clear()
            await acker.flush()
            settlement.notify()  # wakes the fetcher for the next transaction
        finally:
            self.open = self.closing = False
            self.count = 0

    def _forget(self) -> None:
        """After the consumer rewound: nothing of the transaction settles, and what was fetched for the next one
        is dropped, a fetch that returned during the abort or the failed commit included (its records come again
        from the rewind; no await between the rewind and this, so nothing fetched after it is dropped)."""
        self.drop_queued()
        settlement = self.settlement
        for env in self._batch:
            env.pending = -1
        for letter in settlement.open_letters:
            letter.pending = -1
        settlement.open_letters.clear()
        self._batch = []
        settlement.cancel_retries()
        settlement.report.void_since(self._counts_at_begin)  # what settled in it is given back with it
        settlement.abandon(settlement.in_flight)
        settlement.acker.acks.clear()
        settlement.acker.nacks.clear()
