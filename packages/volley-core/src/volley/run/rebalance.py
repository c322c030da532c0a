"""Rebalance: before partitions are taken away, abandon their queued work, finish theirs under way, flush outputs.

The consumer awaits ``on_revoke`` before it commits and forgets the partitions (``RebalanceAware``). While the
partitions are being revoked, lanes, the handler thread and the processor skip their queued messages
(``revoked``); what is still queued when the revoke ends is dropped too. The revoke waits only for the revoked
partitions' work under way (``Run.wait_revoked``: a call in progress, records to produce again), then flushes
the producers and acks: work of the partitions kept goes on meanwhile and does not hold the rebalance up. In a
transaction it waits for all work, which the transaction it commits holds.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence

from volley.message import Envelope
from volley.ports import PartitionId
from volley.run.settlement import Settlement
from volley.run.tokens import is_revoked

logger = logging.getLogger("volley")


def drop_revoked(batch: list[Envelope], revoked: set[PartitionId], settlement: Settlement) -> list[Envelope]:
    kept = [e for e in batch if not is_revoked(e, revoked)]
    settlement.abandon(len(batch) - len(kept))
    return kept


class Rebalance:
    def __init__(self, settlement: Settlement, inbox: deque[list[Envelope]], *, timeout_seconds: float,
                 wait_released: Callable[[set[PartitionId], float], Awaitable[None]]) -> None:
        self.drop_queued: Callable[[set[PartitionId]], None] = lambda _revoked: None  # the executor's, once built
        self.settlement = settlement
        self.inbox = inbox
        self.timeout_seconds = timeout_seconds
        self.wait_released = wait_released
        self.revoked: set[PartitionId] = set()

    async def on_revoke(self, partitions: Sequence[PartitionId]) -> None:
        settlement = self.settlement
        self.revoked.update(partitions)
        try:
            kept = [batch for batch in (drop_revoked(b, self.revoked, settlement) for b in self.inbox) if batch]
            self.inbox.clear()
            self.inbox.extend(kept)
            deadline = time.monotonic() + self.timeout_seconds
            while True:
                settlement.flush_outputs()
                await self.wait_released(self.revoked, deadline)
                for producer in settlement.producers:
                    try:
                        await producer.flush(max(0.1, deadline - time.monotonic()))
                    except Exception as exc:  # what was confirmed is still acked below
                        logger.warning("%s: flushing a producer for a rebalance failed: %s", settlement.app_name,
                                       exc)
                settlement.drain_reports()
                # A delivery failure reported by the flush schedules a retry or a dead letter: wait for it too.
                if not settlement.unsent_for(self.revoked) or time.monotonic() >= deadline:
                    break
            await settlement.acker.flush()
        finally:
            # Past the deadline, work queued in lanes for these partitions would otherwise run after they were
            # given up: drop it (the new owner reads it again).
            self.drop_queued(self.revoked)
            self.revoked.difference_update(partitions)
