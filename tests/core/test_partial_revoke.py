"""A revoke of some partitions (an incremental rebalance: KIP-848, cooperative-sticky) waits only for the work of
the partitions it takes away, not for the work of those the worker keeps.

Before, it waited until nothing at all was in flight and the inbox was empty: with a slow handler, every
incremental rebalance held the revoked partitions for the whole of the other partitions' queued work, up to the
revoke deadline (the engine's ``shutdown_timeout_seconds``, 60 s for Kafka by default), and their new owner
waited that long.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import threading
import time
from typing import Any

import pytest
from engine_fakes import Connector, Item, RevocableConsumer, make_engine, outputs

from volley import MemoryBroker
from volley.errors import InvalidRecordError
from volley.memory import MemoryProducer
from volley.run import sync_executor

DEADLINE = 5.0  # the revoke's (shutdown_timeout_seconds): the old code waited all of it


def two_partitions(first: int, second: int) -> MemoryBroker:
    """``first`` messages on partition 0 (n from 0), then ``second`` on partition 1. A batch takes them
    round-robin over the partitions: 0, first, 1, first + 1, ..."""
    broker = MemoryBroker(partitions=2)
    for n in range(first):
        broker.publish("in", json.dumps({"n": n}).encode(), partition=0)
    for n in range(first, first + second):
        broker.publish("in", json.dumps({"n": n}).encode(), partition=1)
    return broker


async def until(check: Any, what: str, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not check():
        assert time.monotonic() < deadline, f"{what} not reached within {within} s"
        await asyncio.sleep(0.005)


async def settled_and_stopped(handler: Any, task: asyncio.Future[Any], inputs: int) -> Any:
    """Once ``inputs`` inputs have settled, stop the app; its run's report."""
    await until(lambda: handler.report is not None and handler.report.settled == inputs, "every input settled")
    handler.stop()
    return await asyncio.wait_for(task, 10)


@pytest.mark.parametrize("kind", ["sync", "async"])
def test_a_revoke_does_not_wait_for_the_work_of_the_partitions_kept(kind: str) -> None:
    """Partition 0's handler calls block (kept); partition 1 is revoked meanwhile. The revoke must end at once:
    partition 1's messages not begun are dropped (async lanes have finished them already), and partition 0's work
    goes on. The old code waited for partition 0's work, until the revoke deadline."""
    broker = two_partitions(3, 3)  # a batch, round-robin: 0, 3, 1, 4, 2, 5
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=6,
                         shutdown_timeout_seconds=DEADLINE, sync_handler_mode="thread")
    calls: list[int] = []
    before: list[int] = []  # calls made when the revoke began (async lanes finish partition 1 first)
    blocked = threading.Event()
    go = threading.Event()
    go_async = asyncio.Event()

    if kind == "sync":
        @engine.stream_app
        def handler(item: Item) -> list[tuple[str, Item]]:
            calls.append(item.n)
            if item.n < 3:
                blocked.set()
                assert go.wait(30), "the test never let partition 0's calls through"
            return [("out", item)]
    else:
        @engine.stream_app
        async def handler(item: Item) -> list[tuple[str, Item]]:
            calls.append(item.n)
            if item.n < 3:
                blocked.set()
                await go_async.wait()
            return [("out", item)]

    async def main() -> tuple[float, int, Any]:
        task = asyncio.ensure_future(handler.run_async())
        await until(blocked.is_set, "a call on partition 0 under way")
        if kind == "async":
            await until(lambda: {3, 4, 5} <= set(calls), "partition 1's lane through")
        consumer = RevocableConsumer.latest
        assert consumer is not None
        before.extend(calls)
        began = time.monotonic()
        await asyncio.wait_for(consumer.revoke([("in", 1)]), 2 * DEADLINE)
        took = time.monotonic() - began
        acked_by_then = broker.acked("in")
        go.set()
        go_async.set()
        return took, acked_by_then, await settled_and_stopped(handler, task, 6)

    took, acked_by_then, report = asyncio.run(main())
    assert took < DEADLINE / 2, f"the revoke waited {took:.1f} s for the partition it does not take away"
    finished = [n for n in before if n >= 3]
    assert acked_by_then >= len(finished), "partition 1's finished messages were not acked before it went"
    assert [n for n in calls[len(before):] if n >= 3] == [], f"partition 1 handled after its revoke: {calls}"
    assert outputs(broker) == sorted(calls) and {0, 1, 2} <= set(calls)
    assert report.acked == len(calls) and report.abandoned == 6 - len(calls), report


def test_messages_of_a_partition_given_up_mid_batch_are_not_handled_inline_after_the_revoke(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Inline slices: a revoke that ends while a batch is still being handled (it no longer waits for the batch)
    must leave the rest of that batch's messages of the revoked partition unhandled: they belong to the new owner.
    """
    monkeypatch.setattr(sync_executor, "CALIBRATION_BATCHES", 0)  # inline from the first batch
    broker = two_partitions(20, 20)  # one batch, round-robin: 0, 20, 1, 21, ...
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
        return await settled_and_stopped(handler, task, 40)

    report = asyncio.run(main())
    after = calls[revoked_after[0]:]
    assert after, "the batch was over before the revoke began: nothing tested"
    assert [n for n in after if n < 20] == [], f"partition 0 handled after it was revoked: {after}"
    assert len(calls) < 40 and report.abandoned == 40 - len(calls), report
    assert report.acked == len(calls)


# ------------------------------------------------------------------ found by review: revoked work after the revoke
# Each failed on the first version of this change (4a9bd07), whose defect its docstring describes; all pass with
# the engine before it, which waited for everything.


def test_the_rest_of_an_inline_batch_moved_to_the_thread_after_a_revoke_skips_the_revoked_partition(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Inline: the revoke ends between slices (_dropped = {p0}); a later call on partition 1 raises once (a retry
    is due), so the rest of the batch goes to the handler thread, which ignores _dropped."""
    monkeypatch.setattr(sync_executor, "CALIBRATION_BATCHES", 0)
    broker = two_partitions(20, 20)  # one batch, round-robin: 0, 20, 1, 21, ...
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=40,
                         shutdown_timeout_seconds=DEADLINE)
    calls: list[tuple[int, bool]] = []  # (n, the revoke had ended)
    revoke: list[asyncio.Task[None]] = []
    raised: list[int] = []

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        ended = bool(revoke) and revoke[0].done()
        calls.append((item.n, ended))
        if item.n == 21:  # end this slice; the loop runs the revoke in between
            consumer = RevocableConsumer.latest
            assert consumer is not None
            revoke.append(asyncio.get_running_loop().create_task(consumer.revoke([("in", 0)])))
            time.sleep(sync_executor.INLINE_SLICE_SECONDS * 1.5)
        elif ended and item.n >= 20 and not raised:  # partition 1, after the revoke: fails once
            raised.append(item.n)
            raise RuntimeError("transient")
        return [("out", item)]

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        return await settled_and_stopped(handler, task, 40)

    asyncio.run(main())
    # (before 4a9bd07 the revoke waited for the whole batch: it never ended mid-batch)
    late = [n for n, ended in calls if ended and n < 20]
    assert late == [], f"partition 0 handled after its revoke returned: {late}"


def test_an_async_batch_group_of_a_revoked_partition_queued_behind_a_kept_group_is_not_handled_after_the_revoke(
) -> None:
    """Async batch handler: the lane's head group is partition 1's; a group of partition 0 waits behind it.
    holds() looks at the head only and drop_queued keeps Groups: partition 0's group is handled after the revoke."""
    broker = two_partitions(2, 2)  # round-robin: 0(p0), 2(p1), 1(p0), 3(p1)
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=4, batch_size=1,
                         shutdown_timeout_seconds=DEADLINE)
    calls: list[tuple[int, bool]] = []
    revoked = asyncio.Event()
    go: asyncio.Event | None = None

    @engine.stream_app
    async def handler(items: list[Item]) -> list[tuple[str, Item]]:
        for item in items:
            calls.append((item.n, revoked.is_set()))
            if item.n == 2:
                assert go is not None
                await go.wait()
        return [("out", item) for item in items]

    async def main() -> tuple[int, Any]:
        nonlocal go
        go = asyncio.Event()
        task = asyncio.ensure_future(handler.run_async())
        await until(lambda: any(n == 2 for n, _ in calls), "partition 1's group under way")
        consumer = RevocableConsumer.latest
        assert consumer is not None
        asyncio.get_running_loop().call_later(0.3, go.set)  # partition 1's call ends soon, revoke or not
        await asyncio.wait_for(consumer.revoke([("in", 0)]), 10)
        revoked.set()
        acked = broker.acked("in")
        return acked, await settled_and_stopped(handler, task, 4)

    _acked, _report = asyncio.run(main())
    late = [n for n, after in calls if after and n < 2]
    assert late == [], f"partition 0 handled after its revoke returned: {late}"


def test_a_thread_batch_submitted_before_a_revoke_but_not_yet_begun_skips_the_revoked_partition(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """Thread mode: the batch is submitted to the handler thread, which has not registered it (_thread_batch)
    yet when the revoke runs (GIL, OS scheduling; modelled by a gate). holds() is false, drop_queued marks
    nothing, and once the thread starts, partition 0's messages are handled after the revoke returned."""
    broker = two_partitions(3, 3)
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=6,
                         shutdown_timeout_seconds=DEADLINE, sync_handler_mode="thread")
    entered, gate = threading.Event(), threading.Event()
    original = sync_executor.SyncExecutor._on_thread

    def late_start(self: Any, *args: Any, **kwargs: Any) -> Any:
        entered.set()
        gate.wait(10)  # the thread is slow to start (the loop holds the GIL, the OS has not scheduled it)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(sync_executor.SyncExecutor, "_on_thread", late_start)
    calls: list[tuple[int, bool]] = []
    ended = threading.Event()

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        calls.append((item.n, ended.is_set()))
        return [("out", item)]

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await until(entered.is_set, "the batch submitted")
        consumer = RevocableConsumer.latest
        assert consumer is not None
        asyncio.get_running_loop().call_later(0.3, gate.set)  # the thread starts soon, revoke or not
        await asyncio.wait_for(consumer.revoke([("in", 0)]), 10)
        ended.set()
        return await settled_and_stopped(handler, task, 6)

    asyncio.run(main())
    late = [n for n, after in calls if after and n < 3]
    assert late == [], f"partition 0 handled after its revoke returned: {late}"


def test_a_revoked_partitions_result_handed_over_before_the_revoke_returned_is_acked_by_it() -> None:
    """The thread hands over partition 0's finished message (call_soon_threadsafe) and then moves
    _thread_reported on; a revoke task whose wakeup was already queued ahead of that callback sees holds()
    false and returns before the result is applied: not acked (committed) by the revoke, and its output is
    produced after the partition was given up."""
    broker = two_partitions(1, 1)  # batch: 0 (p0), 1 (p1)
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=2,
                         shutdown_timeout_seconds=DEADLINE, sync_handler_mode="thread")
    in_call, release0, handed, go = (threading.Event() for _ in range(4))

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        if item.n == 0:
            in_call.set()
            assert release0.wait(10)
        else:
            handed.set()  # the thread handed message 0 over before this call
            assert go.wait(10)
        return [("out", item)]

    seen: list[tuple[int, int]] = []

    async def revoke_and_look(consumer: RevocableConsumer) -> None:
        await consumer.revoke([("in", 0)])
        seen.append((broker.acked("in"), len(broker.produced("out"))))  # as the Kafka consumer commits here

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await until(in_call.is_set, "message 0 in its call")
        consumer = RevocableConsumer.latest
        assert consumer is not None
        settlement = consumer.handler.__self__.settlement
        revoking = asyncio.ensure_future(revoke_and_look(consumer))
        await asyncio.sleep(0.05)  # the revoke waits: message 0 is under way
        assert not revoking.done()
        settlement.settled.set()  # something of another partition settles: the revoke's wait wakes ...
        await asyncio.sleep(0)
        await asyncio.sleep(0)  # ... its wakeup is queued (Python 3.11 wait_for: inner task, then waiter)
        release0.set()
        assert handed.wait(10)  # meanwhile the thread handed message 0 over (queued behind the wakeup)
        threading.Timer(0.3, go.set).start()  # message 1's call ends soon, revoke or not
        await revoking
        return await settled_and_stopped(handler, task, 2)

    asyncio.run(main())
    acked, produced = seen[0]
    assert acked >= 1, f"message 0 finished before the revoke returned, yet acked={acked} produced={produced}"


class LateReportProducer:
    """Stores at once, reports 20 ms later (as a real producer does); the first report of partition 0's output
    (n == 0) is a failure."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker, self.outstanding, self.failed_once = broker, 0, False

    async def start(self) -> None:
        return None

    def produce(self, messages: Any, on_delivery: Any) -> None:
        self.outstanding += len(messages)
        loop = asyncio.get_running_loop()
        for message in messages:
            if json.loads(message.value)["n"] == 0 and not self.failed_once:
                self.failed_once = True
                loop.call_later(0.02, self._report, on_delivery, [], [(message, ConnectionError("broker gone"))])
            else:
                loop.call_later(0.02, self._report, on_delivery, [message], [], True)

    def _report(self, on_delivery: Any, delivered: Any, failed: Any, store: bool = False) -> None:
        if store:
            self.broker.publish_many(delivered)
        self.outstanding -= len(delivered) + len(failed)
        on_delivery(delivered, failed)

    async def flush(self, timeout: float) -> None:
        while self.outstanding:
            await asyncio.sleep(0.001)

    async def close(self) -> None:
        return None


def test_a_revoked_partitions_record_failing_during_the_revokes_flush_is_retried_before_it_ends() -> None:
    """wait_revoked checks retrying_for before the flush only: a delivery failure reported during the flush
    schedules a retry the revoke no longer waits for; the input is acked after the partition was given up."""
    broker = two_partitions(1, 1)  # batch: 0 (p0), 1 (p1)
    engine = make_engine(broker, Connector(broker, RevocableConsumer, LateReportProducer), consume_batch_size=2,
                         shutdown_timeout_seconds=DEADLINE, sync_handler_mode="thread", retry_backoff_seconds=0.05)
    in_call1 = threading.Event()

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        if item.n == 1:
            in_call1.set()
            time.sleep(0.5)  # partition 1 (kept) is slow
        return [("out", item)]

    seen: list[int] = []

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await until(in_call1.is_set, "message 0 handled, message 1 in its call")
        consumer = RevocableConsumer.latest
        assert consumer is not None
        await asyncio.wait_for(consumer.revoke([("in", 0)]), 10)
        seen.append(broker.acked("in"))
        return await settled_and_stopped(handler, task, 2)

    asyncio.run(main())
    assert seen[0] >= 1, "partition 0's input was acked only after its revoke returned (a retried delivery)"


# ------------------------------------------------------------------ found by a second review (of ce1e65d)
# (the docstrings describe the defect as it was in ce1e65d)


class GatedFlushProducer(MemoryProducer):
    """Stores and confirms at once (MemoryProducer); ``flush`` says it began and waits for ``gate`` (as a real
    flush waits for the broker)."""

    latest: GatedFlushProducer | None = None

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.gate = asyncio.Event()
        self.flushing = asyncio.Event()
        GatedFlushProducer.latest = self

    async def flush(self, timeout: float) -> None:
        self.flushing.set()
        await self.gate.wait()


def test_an_async_lane_started_as_the_revoke_ends_does_not_handle_the_revoked_partition() -> None:
    """max_in_flight=1: partition 0's lane (kept) runs, partition 1's lane (revoked) waits. The revoke does not
    wait for it (holds skips waiting lanes) and goes on to flush. The kept call ends in the same loop iteration as
    the flush, just after it: _lane_ended starts partition 1's lane (its task not run yet). The revoke's finally
    then sees that lane as running ("not in waiting"), keeps its head as "in its call", and clears ``revoked``:
    the lane's first step handles partition 1's message after the revoke returned. (Before 4a9bd07 the revoke
    waited for partition 0's call, and partition 1's lane then skipped its message.)"""
    broker = two_partitions(1, 1)  # batch: 0 (p0, kept), 1 (p1, revoked)
    engine = make_engine(broker, Connector(broker, RevocableConsumer, GatedFlushProducer), consume_batch_size=2,
                         shutdown_timeout_seconds=DEADLINE, max_in_flight=1)
    calls: list[tuple[int, bool]] = []
    ended = [False]

    @engine.stream_app
    async def handler(item: Item) -> list[tuple[str, Item]]:
        calls.append((item.n, ended[0]))
        if item.n == 0:
            producer = GatedFlushProducer.latest
            assert producer is not None
            with contextlib.suppress(TimeoutError):  # the revoke's flush began (or the old revoke waits for us)
                await asyncio.wait_for(producer.flushing.wait(), 0.5)
            producer.gate.set()  # the revoke's flush returns (its wakeup is queued first) ...
        return [("out", item)]  # ... and this lane ends, starting the waiting lane of partition 1

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await until(lambda: any(n == 0 for n, _ in calls), "partition 0's call under way")
        consumer = RevocableConsumer.latest
        assert consumer is not None

        async def revoke() -> None:
            await consumer.revoke([("in", 1)])
            ended[0] = True  # in the step the revoke returns in (the Kafka consumer commits and forgets there)

        await asyncio.wait_for(revoke(), 10)
        return await settled_and_stopped(handler, task, 2)

    report = asyncio.run(main())
    late = [n for n, after in calls if after and n == 1]
    assert late == [], f"partition 1 handled after its revoke returned: {calls} ({report})"
    assert report.acked == 1 and report.abandoned == 1, report


def test_a_revoked_partitions_finished_message_does_not_wait_for_a_call_on_a_kept_partition() -> None:
    """Handler thread: partition 0's message (revoked) finishes at once, then a long call on partition 1 (kept)
    begins. When the hand-over before that call was rate-limited, partition 0's result stayed in the thread's
    Outcome; holds() counted it as under way and the revoke waited for partition 1's call, here until the revoke
    deadline, returning with partition 0's input unacked (its output produced and its input acked after the
    revoke, when the partition belonged to another member). The thread now parks its outcome at every switch."""
    broker = two_partitions(1, 1)  # batch: 0 (p0, revoked), 1 (p1, kept)
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=2,
                         shutdown_timeout_seconds=2.0, sync_handler_mode="thread")
    in_call, release = threading.Event(), threading.Event()

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        if item.n == 1:
            in_call.set()
            assert release.wait(30)  # partition 1: a long call (a slow service)
        return [("out", item)]

    seen: list[tuple[float, int, int]] = []

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await until(in_call.is_set, "message 0 finished, message 1 in its call")
        await asyncio.sleep(0.05)
        consumer = RevocableConsumer.latest
        assert consumer is not None
        began = time.monotonic()

        async def revoke() -> None:
            await consumer.revoke([("in", 0)])
            seen.append((time.monotonic() - began, broker.acked("in"), len(broker.produced("out"))))

        await asyncio.wait_for(revoke(), 10)
        release.set()
        return await settled_and_stopped(handler, task, 2)

    asyncio.run(main())
    took, acked, produced = seen[0]
    assert took < 1.0 and acked == 1 and produced == 1, \
        f"the revoke took {took:.2f} s (waiting for partition 1's call); acked={acked} produced={produced} then"


# ------------------------------------------------------------------ found by a third review (of ed66d68)


@pytest.mark.parametrize("first_call", [0.007, 0.02])
def test_a_result_finished_before_a_long_call_on_another_partition_is_acked_during_it(
        monkeypatch: pytest.MonkeyPatch, first_call: float) -> None:
    """Outside a revoke too: an outcome parked at a partition switch wakes the loop (at most every few ms), so a
    finished result's output and ack do not wait for a long call on another partition."""
    if first_call > 0.01:  # only the switch can hand it over
        monkeypatch.setattr(sync_executor, "THREAD_REPORT_SECONDS", 1.0)
    broker = two_partitions(1, 1)
    engine = make_engine(broker, Connector(broker), consume_batch_size=2, sync_handler_mode="thread")
    in_call, release = threading.Event(), threading.Event()

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        if item.n == 0:
            time.sleep(first_call)  # the call's length is the condition under test
        else:
            in_call.set()
            assert release.wait(30)
        return [("out", item)]

    async def main() -> None:
        task = asyncio.ensure_future(handler.run_async())
        try:
            await until(in_call.is_set, "partition 1's call under way")
            await until(lambda: len(broker.produced("out")) == 1 and broker.acked("in") == 1,
                        "partition 0's result produced and acked during partition 1's call", within=5.0)
        finally:
            release.set()
        await settled_and_stopped(handler, task, 2)

    asyncio.run(main())


class FailingFlush(MemoryProducer):
    async def flush(self, timeout: float) -> None:
        raise TimeoutError("1 record(s) not confirmed")


def test_a_failing_flush_during_a_revoke_still_acks_what_finished() -> None:
    """librdkafka's flush raises when its time is up: the revoke logs it and still acks what was confirmed (it
    skipped the acks before, so finished work was not committed and the new owner did it again)."""
    broker = two_partitions(1, 1)
    engine = make_engine(broker, Connector(broker, RevocableConsumer, FailingFlush), consume_batch_size=2,
                         sync_handler_mode="thread", shutdown_timeout_seconds=2.0)

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await until(lambda: handler.report is not None and handler.report.settled == 2, "both inputs handled")
        consumer = RevocableConsumer.latest
        assert consumer is not None
        await consumer.revoke([("in", 0)])
        handler.stop()
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(main())
    assert report.acked == 2 and broker.acked("in") == 2, report


# ------------------------------------------------------------------ left by the reviews of session 30, fixed later


class OneRetryOneInvalidProducer(MemoryProducer):
    """Input 0's outputs: n == 0 fails once as a broker error (a retry is scheduled after the backoff), n == 100 is
    refused for good (InvalidRecordError: the input fails, to the dead-letter queue). Everything else is stored."""

    def produce(self, messages: Any, on_delivery: Any) -> None:
        delivered, failed = [], []
        for message in messages:
            n = json.loads(message.value)["n"]
            if n == 0 and message.topic == "out" and not getattr(self, "failed_once", False):
                self.failed_once = True
                failed.append((message, ConnectionError("broker gone")))
            elif n == 100:
                failed.append((message, InvalidRecordError("partition 7 does not exist")))
            else:
                delivered.append(message)
        self._broker.publish_many(delivered)
        asyncio.get_running_loop().call_soon(on_delivery, delivered, failed)


def test_a_revoke_does_not_wait_for_the_retry_of_a_record_whose_input_was_already_given_up() -> None:
    """A record waiting out its retry backoff whose input had failed meanwhile (another of its records refused for
    good) will never be produced (the retry drops it), yet ``unsent_for`` counted it: the revoke waited for the
    retry timer (the backoff, here 3 s) before giving the partition up."""
    broker = two_partitions(1, 0)
    engine = make_engine(broker, Connector(broker, RevocableConsumer, OneRetryOneInvalidProducer),
                         shutdown_timeout_seconds=DEADLINE, retry_backoff_seconds=3.0)

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        return [("out", item), ("out", Item(100))]

    took: list[float] = []

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        await until(lambda: len(broker.produced("dlq")) == 1, "input 0 dead-lettered")
        consumer = RevocableConsumer.latest
        assert consumer is not None
        started = time.monotonic()
        await asyncio.wait_for(consumer.revoke([("in", 0)]), 10)
        took.append(time.monotonic() - started)
        return await settled_and_stopped(handler, task, 1)

    asyncio.run(main())
    assert took[0] < 1.5, f"the revoke took {took[0]:.1f} s: it waited for a retry that will never be made"


def test_an_async_batch_group_of_revoked_partitions_only_is_dropped_not_handled_and_not_waited_for() -> None:
    """Async batch handler: a queued group whose every member is of a revoked partition was kept by drop_queued
    and counted by holds(): the revoke waited for the kept group's call ahead of it (here until its 3 s call
    ended), then the lane handled the revoked group during the revoke, for a partition given up."""
    broker = two_partitions(2, 2)  # round-robin: 0(p0), 2(p1), 1(p0), 3(p1); groups of one
    engine = make_engine(broker, Connector(broker, RevocableConsumer), consume_batch_size=4, batch_size=1,
                         shutdown_timeout_seconds=DEADLINE, max_in_flight=1)
    calls: list[int] = []
    go: asyncio.Event | None = None

    @engine.stream_app
    async def handler(items: list[Item]) -> list[tuple[str, Item]]:
        for item in items:
            calls.append(item.n)
            if item.n == 2:
                assert go is not None
                await go.wait()
        return [("out", item) for item in items]

    took: list[float] = []

    async def main() -> Any:
        nonlocal go
        go = asyncio.Event()
        task = asyncio.ensure_future(handler.run_async())
        await until(lambda: 2 in calls, "partition 1's group under way")
        assert calls == [0, 2], calls  # partition 0's second group (n=1) waits for a lane (max_in_flight=1)
        consumer = RevocableConsumer.latest
        assert consumer is not None
        asyncio.get_running_loop().call_later(3.0, go.set)
        started = time.monotonic()
        await asyncio.wait_for(consumer.revoke([("in", 0)]), 10)
        took.append(time.monotonic() - started)
        await until(lambda: 3 in calls, "partition 1's last group handled")
        handler.stop()
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(main())
    assert 1 not in calls, f"partition 0's queued group was handled after its partition was revoked: {calls}"
    assert took[0] < 1.5, f"the revoke took {took[0]:.1f} s: it waited for a group it gives up"
    assert report.abandoned >= 1
