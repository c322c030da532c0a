"""A revoke while an aborted transaction resets the async lanes: the lanes still held the aborted inputs (the reset
waits up to a second for the cancelled lanes before emptying its queues), the revoke dropped those of its partition
and counted them abandoned a second time, and ``in_flight`` went below zero (the next transaction's count of
unsettled inputs was wrong). Found by a review of session 31 (which first saw it with a wider, since reverted,
change); the reset now empties its queues before it waits. (Before: "aborting the transaction (-4 unsettled)", and the
run did not stop.)"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from typing import Any

import pytest
from engine_fakes import Connector, Item, TxConsumer, make_engine, publish

from volley import MemoryBroker
from volley.errors import DeliveryError
from volley.message import Envelope
from volley.run import settlement as settlement_module


class AbortingRevocable(TxConsumer):
    """Transactional and rebalance-aware: its first commit fails (the consumer aborted and rewound)."""

    latest: AbortingRevocable | None = None

    def __init__(self, broker: MemoryBroker, queue: str, log: list[Any]) -> None:
        super().__init__(broker, queue, log, commit_delay=0.3)
        self.failed = False
        self.revoke_handler: Any = None
        AbortingRevocable.latest = self

    def set_revoke_handler(self, handler: Any) -> None:
        self.revoke_handler = handler

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        if self.failed:
            await super().commit(envelopes)
            return
        self.failed = True
        await asyncio.sleep(self.commit_delay)
        await self.abort()
        raise DeliveryError("the transaction was aborted: its inputs will be consumed again")


def test_a_revoke_during_an_aborts_lane_reset_does_not_count_the_aborted_inputs_twice(
        monkeypatch: pytest.MonkeyPatch) -> None:
    lowest = [0]
    abandon, acked = settlement_module.Settlement.abandon, settlement_module.Settlement._acked

    def watched_abandon(self: Any, count: int) -> None:
        abandon(self, count)
        lowest[0] = min(lowest[0], self.in_flight)

    def watched_acked(self: Any, envelopes: list[Envelope]) -> None:
        acked(self, envelopes)
        lowest[0] = min(lowest[0], self.in_flight)

    monkeypatch.setattr(settlement_module.Settlement, "abandon", watched_abandon)
    monkeypatch.setattr(settlement_module.Settlement, "_acked", watched_acked)
    broker = MemoryBroker()
    publish(broker, 10)
    engine = make_engine(broker, Connector(broker, lambda b, q: AbortingRevocable(b, q, [])),
                         consume_batch_size=5, transaction_max_messages=5, transaction_interval_seconds=30.0,
                         shutdown_timeout_seconds=0.3, ordering="key")
    slow_once = [True]
    unwinding = asyncio.Event()
    cleaned_up = asyncio.Event()

    @engine.stream_app
    async def handler(item: Item) -> list[tuple[str, Item]]:
        if item.n == 5 and slow_once[0]:
            slow_once[0] = False
            try:
                await asyncio.sleep(60)  # still running when the first commit fails; 6..9 queued behind it
            finally:
                unwinding.set()
                await asyncio.sleep(1.5)  # its cleanup outlasts the reset's wait (a second)
                cleaned_up.set()
        return [("out", item)]

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await asyncio.wait_for(unwinding.wait(), 10)  # the abort is resetting the lanes
        consumer = AbortingRevocable.latest
        assert consumer is not None
        await consumer.revoke_handler([("in", 0)])  # the partition of the queued inputs; ends within 0.3 s
        await asyncio.wait_for(cleaned_up.wait(), 10)
        deadline = time.monotonic() + 10
        while broker.acked("in") < 5 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        handler.stop()
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(main())
    assert lowest[0] >= 0, f"in_flight went down to {lowest[0]}: inputs counted abandoned twice ({report})"
