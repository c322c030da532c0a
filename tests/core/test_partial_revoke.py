"""A revoke of some partitions (an incremental rebalance: KIP-848, cooperative-sticky) waits only for the work of
the partitions it takes away, not for the work of those the worker keeps.

Before, it waited until nothing at all was in flight and the inbox was empty: with a slow handler, every
incremental rebalance held the revoked partitions for the whole of the other partitions' queued work, up to the
revoke deadline (the engine's ``shutdown_timeout_seconds``, 60 s for Kafka by default), and their new owner
waited that long.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
from engine_fakes import Connector, Item, RevocableConsumer, make_engine, outputs

from volley import MemoryBroker
from volley.run import sync_executor

DEADLINE = 5.0  # the revoke's (shutdown_timeout_seconds): the old code waited all of it


def two_partitions(kept: int, revoked: int) -> MemoryBroker:
    """``revoked`` messages on partition 0 (taken away), ``kept`` on partition 1; n counts from 0 on partition 0."""
    broker = MemoryBroker(partitions=2)
    for n in range(revoked):
        broker.publish("in", json.dumps({"n": n}).encode(), partition=0)
    for n in range(revoked, revoked + kept):
        broker.publish("in", json.dumps({"n": n}).encode(), partition=1)
    return broker


async def until(check: Any, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {within} s"
        await asyncio.sleep(0.005)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_revoke_does_not_wait_for_the_work_of_the_partitions_kept(kind: str) -> None:
    """Partition 1's handler calls block; partition 0 (fast) is revoked meanwhile. The revoke must end at once,
    with partition 0's finished message acked and its others dropped, while partition 1's work goes on."""
    broker = two_partitions(kept=3, revoked=3)  # a batch, round-robin: 0, 3, 1, 4, 2, 5
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=6,
                         shutdown_timeout_seconds=DEADLINE, sync_handler_mode="thread")
    calls: list[int] = []
    before: list[int] = []  # calls made when the revoke began (async lanes finish partition 0 first)
    blocked = threading.Event()
    go = threading.Event()
    go_async = asyncio.Event()

    if kind == "sync":
        @engine.stream_app
        def handler(item: Item) -> list[tuple[str, Item]]:
            calls.append(item.n)
            if item.n >= 3:
                blocked.set()
                assert go.wait(30), "the test never let partition 1's calls through"
            return [("out", item)]
    else:
        @engine.stream_app
        async def handler(item: Item) -> list[tuple[str, Item]]:
            calls.append(item.n)
            if item.n >= 3:
                blocked.set()
                await go_async.wait()
            return [("out", item)]

    async def main() -> tuple[float, int, Any]:
        task = asyncio.ensure_future(handler.run_async())
        await until(lambda: blocked.is_set() and 0 in calls, "a call on partition 1 under way, message 0 handled")
        consumer = RevocableConsumer.latest
        assert consumer is not None
        before.extend(calls)
        began = time.monotonic()
        await asyncio.wait_for(consumer.revoke([("in", 0)]), 2 * DEADLINE)
        took = time.monotonic() - began
        acked_by_then = broker.acked("in")
        go.set()
        go_async.set()
        await until(lambda: handler.report is not None and handler.report.settled == 6, "every input settled")
        handler.stop()
        return took, acked_by_then, await asyncio.wait_for(task, 10)

    took, acked_by_then, report = asyncio.run(main())
    assert took < DEADLINE / 2, f"the revoke waited {took:.1f} s for the partition it does not take away"
    finished = [n for n in before if n < 3]
    assert acked_by_then >= len(finished), "partition 0's finished messages were not acked before it went"
    assert [n for n in calls[len(before):] if n < 3] == [], f"partition 0 handled after its revoke: {calls}"
    assert outputs(broker) == sorted(calls) and {3, 4, 5} <= set(calls)
    assert report.acked == len(calls) and report.abandoned == 6 - len(calls), report


def test_messages_of_a_partition_given_up_mid_batch_are_not_handled_inline_after_the_revoke(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Inline slices: a revoke that ends while a batch is still being handled (it no longer waits for the batch)
    must leave the rest of that batch's messages of the revoked partition unhandled: they belong to the new owner.
    """
    monkeypatch.setattr(sync_executor, "CALIBRATION_BATCHES", 0)  # inline from the first batch
    broker = two_partitions(kept=20, revoked=20)  # one batch, round-robin: 0, 20, 1, 21, ...
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=40,
                         shutdown_timeout_seconds=DEADLINE)
    calls: list[int] = []
    revoke: list[asyncio.Task[None]] = []
    revoked_after: list[int] = []  # how many calls had been made when the revoke began

    async def revoke_partition_0() -> None:
        revoked_after.append(len(calls))
        consumer = RevocableConsumer.latest
        assert consumer is not None
        await consumer.revoke([("in", 0)])

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        calls.append(item.n)
        if item.n == 21:  # partition 1, early in the batch: revoke partition 0 at the next pause of the loop
            revoke.append(asyncio.get_running_loop().create_task(revoke_partition_0()))
            time.sleep(sync_executor.INLINE_SLICE_SECONDS * 1.5)  # ends this slice: the loop runs the revoke
        return [("out", item)]

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await until(lambda: bool(revoke) and revoke[0].done(), "the revoke ended")
        revoke[0].result()
        await until(lambda: handler.report is not None and handler.report.settled == 40, "every input settled")
        handler.stop()
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(main())
    after = calls[revoked_after[0]:]
    assert after, "the batch was over before the revoke began: nothing tested"
    assert [n for n in after if n < 20] == [], f"partition 0 handled after it was revoked: {after}"
    assert len(calls) < 40 and report.abandoned == 40 - len(calls), report
    assert report.acked == len(calls)
