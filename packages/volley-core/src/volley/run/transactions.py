"""The transactional barrier (exactly-once): one batch at a time, its inputs and outputs committed atomically.

``begin`` before a batch's outputs are produced; once every input of the batch settled, ``commit`` with the
acks, or ``abort`` when anything failed to deliver (the consumer rewinds: the batch is processed again). Nothing
of an aborted batch may settle later: late reports and dead letters would leak into the next transaction.
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
                 wait_settled: Callable[[float], Awaitable[None]],
                 on_abort: Callable[[], Awaitable[None]]) -> None:
        self.consumer = consumer
        self.settlement = settlement
        self.app_name = app_name
        self.timeout_seconds = timeout_seconds
        self.wait_settled = wait_settled
        self.on_abort = on_abort
        self.open = False
        self._batch: list[Envelope] = []
        self._counts_at_begin = settlement.report.settled_counts()

    async def begin(self, batch: list[Envelope]) -> None:
        self.open = True
        self._batch = batch
        self._counts_at_begin = self.settlement.report.settled_counts()
        await self.consumer.begin()

    async def finish(self) -> None:
        """Wait for the batch to settle, then commit inputs and outputs atomically (or abort)."""
        settlement = self.settlement
        deadline = time.monotonic() + self.timeout_seconds
        settlement.flush_outputs()
        await self.wait_settled(deadline)
        # The transaction stays open until its commit or abort has returned: no next batch is fetched, and
        # run_until_drained does not take the app for drained, while the broker is still committing.
        try:
            failed, settlement.transaction_failed = settlement.transaction_failed, False
            acker = settlement.acker
            acks, acker.acks = acker.acks, []
            if settlement.in_flight or failed:
                logger.error("%s: aborting the transaction (%d unsettled); the batch will be processed again",
                             self.app_name, settlement.in_flight)
                await self.on_abort()
                await self.consumer.abort()
                self._forget()
                return
            try:
                await self.consumer.commit(acks)
            except DeliveryError as exc:  # the consumer aborted and rewound: the batch comes again
                logger.error("%s: committing the transaction failed (%s); the batch will be processed again",
                             self.app_name, exc)
                self._forget()
                return
            self._batch = []
            settlement.open_letters.clear()
            await acker.flush()
            settlement.notify()  # wakes the fetcher for the next transaction
        finally:
            self.open = False

    def _forget(self) -> None:
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
