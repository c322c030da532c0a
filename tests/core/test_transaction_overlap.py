"""Exactly-once: while a transaction settles and commits, the next one's inputs are fetched and handled.

A producer has one transaction at a time, so the next one begins only once the last one committed; what its
handling produced meanwhile waits (staged) and goes out after that begin. When the ending transaction aborts
(its commit failed, or its outputs did), everything of the next one so far is given up with it, wherever it
runs: inline on the loop, on the handler thread, or in async lanes; nothing of it settles or is sent.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from typing import Any

import pytest
from engine_fakes import Connector, Item, TxConsumer, make_engine, outputs, publish

from volley import Engine, MemoryBroker
from volley.errors import DeliveryError, TransactionAbortedError, VolleyError
from volley.memory import MemoryProducer
from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryCallback
from volley.run import sync_executor, transactions

MODES = [("sync", "inline"), ("sync", "thread"), ("async", "auto")]


@pytest.fixture(autouse=True)
def inline_from_the_start(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> None:
    """Mode "inline": a sync handler runs on the loop from the first batch (no calibration on the thread)."""
    if "inline" in request.node.name:
        monkeypatch.setattr(sync_executor, "CALIBRATION_BATCHES", 0)


class LoggingProducer(MemoryProducer):
    """Notes each record it sends, in the same log as the consumer's begin and commits."""

    def __init__(self, broker: MemoryBroker, log: list[Any]) -> None:
        super().__init__(broker)
        self.log = log

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        self.log.extend(("sent", json.loads(m.value)["n"]) for m in messages if m.topic == "out")
        super().produce(messages, on_delivery)


class FailingFirstCommit(TxConsumer):
    """Its first commit takes a while, then fails after the broker aborted the transaction, and rewinds (as
    Kafka's does): every input not committed comes again, those fetched and handled for the next one too."""

    def __init__(self, broker: MemoryBroker, queue: str, log: list[Any], handled: list[int]) -> None:
        super().__init__(broker, queue, log, commit_delay=0.3)
        self.handled = handled
        self.failed = False
        self.handled_during_commit: list[int] = []

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        if self.failed:
            await super().commit(envelopes)
            return
        self.failed = True
        self.log.append(("commit-start", len(envelopes)))
        before = len(self.handled)
        await asyncio.sleep(self.commit_delay)
        self.handled_during_commit = self.handled[before:]
        await self.abort()
        raise DeliveryError("the transaction was aborted: its inputs will be consumed again")


def run_two_transactions(consumer: Any, log: list[Any], handled: list[int], *, handler_kind: str,
                         mode: str = "auto") -> Any:
    broker = MemoryBroker()
    publish(broker, 10)
    engine = make_engine(broker, Connector(broker, consumer,
                                           lambda b: LoggingProducer(b, log)),
                         consume_batch_size=5, transaction_max_messages=5, transaction_interval_seconds=30.0,
                         shutdown_timeout_seconds=2.0, sync_handler_mode="auto" if mode == "inline" else mode)
    if handler_kind == "async":
        @engine.stream_app
        async def handler(item: Item) -> list[tuple[str, Item]]:
            handled.append(item.n)
            log.append(("handled", item.n))
            await asyncio.sleep(0)
            return [("out", item)]

        return broker, handler.run_until_drained(timeout=20, drain_idle_seconds=0.2)

    @engine.stream_app
    def sync_handler(item: Item) -> list[tuple[str, Item]]:
        handled.append(item.n)
        log.append(("handled", item.n))
        return [("out", item)]

    return broker, sync_handler.run_until_drained(timeout=20, drain_idle_seconds=0.2)


@pytest.mark.parametrize(("handler_kind", "mode"), MODES)
def test_the_next_transactions_inputs_are_handled_while_one_commits(handler_kind: str, mode: str) -> None:
    """The commit takes 0.3 s; the next five inputs are handled meanwhile (before, nothing was: the broker's
    round trips stalled the worker at every commit), and their outputs go out only after the next begin."""
    log: list[Any] = []
    handled: list[int] = []
    broker, report = run_two_transactions(lambda b, q: TxConsumer(b, q, log, commit_delay=0.3), log, handled,
                                          handler_kind=handler_kind, mode=mode)
    first_done = log.index(("commit-done", 5))
    assert log.index(("commit-start", 5)) < log.index(("handled", 5)) < first_done, log
    second_begin = log.index("begin", first_done)
    assert all(log.index(("sent", n)) > second_begin for n in range(5, 10)), log
    assert log.count(("commit-done", 5)) == 2, log
    assert outputs(broker) == list(range(10))
    assert report.acked == 10 and broker.acked("in") == 10 and report.settled == report.consumed, report


@pytest.mark.parametrize(("handler_kind", "mode"), MODES)
def test_a_failed_commit_gives_up_what_the_next_transaction_handled_meanwhile(handler_kind: str, mode: str) -> None:
    """The first commit fails after 0.3 s, during which the next inputs were handled: none of their outputs is
    sent (there is no transaction for them), none of them is counted, and all ten come again, once."""
    log: list[Any] = []
    handled: list[int] = []
    consumers: list[FailingFirstCommit] = []

    def make(broker: MemoryBroker, queue: str) -> FailingFirstCommit:
        consumers.append(FailingFirstCommit(broker, queue, log, handled))
        return consumers[-1]

    broker, report = run_two_transactions(make, log, handled, handler_kind=handler_kind, mode=mode)
    assert set(consumers[0].handled_during_commit) == set(range(5, 10)), log
    sent = [entry[1] for entry in log if entry[0] == "sent"]
    # The first five were sent into the transaction that aborted (a real broker never shows them); the next five
    # were handled during its commit, but sent only once, after they came again.
    assert sorted(sent) == sorted([*range(10), *range(5)]), log
    assert sorted(handled) == sorted([*range(10), *range(10)]), log
    assert report.acked == 10 and broker.acked("in") == 10, report
    assert report.settled == report.consumed, report


def test_a_stop_while_one_transaction_commits_and_the_next_one_waits_commits_both() -> None:
    log: list[Any] = []
    handled: list[int] = []
    broker = MemoryBroker()
    publish(broker, 10)
    engine = make_engine(broker, Connector(broker, lambda b, q: TxConsumer(b, q, log, commit_delay=0.3),
                                           lambda b: LoggingProducer(b, log)),
                         consume_batch_size=5, transaction_max_messages=5, transaction_interval_seconds=30.0,
                         shutdown_timeout_seconds=5.0)

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        handled.append(item.n)
        return [("out", item)]

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        deadline = time.monotonic() + 10
        while len(handled) < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.005)
        assert ("commit-done", 5) not in log, "the first commit ended before the next inputs were handled"
        handler.stop()  # SIGTERM while the first commits and the second waits for it
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(main())
    assert log.count(("commit-done", 5)) == 2, log
    assert report.acked == 10 and broker.acked("in") == 10 and outputs(broker) == list(range(10)), report


# ------------------------------------------------------------------ found by review (each failed before its fix)

class FatalCommit(TxConsumer):
    """Its commit fails for good (a fenced producer) while the next transaction's inputs wait, handled and staged."""

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        self.log.append(("commit-start", len(envelopes)))
        await asyncio.sleep(self.commit_delay)
        raise VolleyError("fatal error committing a transaction: fenced")


@pytest.mark.parametrize(("handler_kind", "mode"), MODES)
def test_a_fatal_commit_ends_the_run_without_waiting_out_the_shutdown_deadline(handler_kind: str, mode: str) -> None:
    """The staged inputs of the next transaction can never settle: they are given up at once (they come again),
    instead of shutdown waiting its whole deadline (8 s here) for them."""
    log: list[Any] = []
    handled: list[int] = []
    broker = MemoryBroker()
    publish(broker, 10)
    engine = make_engine(broker, Connector(broker, lambda b, q: FatalCommit(b, q, log, commit_delay=0.3)),
                         consume_batch_size=5, transaction_max_messages=5, transaction_interval_seconds=30.0,
                         shutdown_timeout_seconds=8.0, sync_handler_mode="auto" if mode == "inline" else mode)
    if handler_kind == "async":
        @engine.stream_app
        async def handler(item: Item) -> list[tuple[str, Item]]:
            handled.append(item.n)
            return [("out", item)]
    else:
        @engine.stream_app
        def handler(item: Item) -> list[tuple[str, Item]]:
            handled.append(item.n)
            return [("out", item)]

    started = time.monotonic()
    with pytest.raises(VolleyError, match="fenced"):
        handler.run_until_drained(timeout=30, drain_idle_seconds=0.3)
    took = time.monotonic() - started
    assert took < 5.0, f"the run took {took:.1f} s to end after the fatal commit (shutdown deadline 8 s)"
    assert broker.acked("in") == 0, "nothing was committed"


class SlowReports(MemoryProducer):
    """Confirms each record 0.4 s after it was produced: a transaction's reports come after the next one opened."""

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        asyncio.get_running_loop().call_later(0.4, super().produce, list(messages), on_delivery)


class FailSecondCommit(TxConsumer):
    def __init__(self, broker: MemoryBroker, queue: str, log: list[Any]) -> None:
        super().__init__(broker, queue, log)
        self.commits = 0

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        self.commits += 1
        if self.commits == 2:
            self.log.append(("commit-fail", len(envelopes)))
            await self.abort()
            raise DeliveryError("the transaction was aborted: its inputs will be consumed again")
        await super().commit(envelopes)


def test_an_abort_does_not_take_back_what_the_transaction_before_it_committed(
        monkeypatch: pytest.MonkeyPatch) -> None:
    """The second transaction opens while the first one's reports are still coming; the first commits, then the
    second's commit fails. The report counts the first five acked (the broker has them), not abandoned."""
    log: list[Any] = []
    closed: list[float] = []
    finish = transactions.TransactionBarrier.finish

    async def noting_finish(self: transactions.TransactionBarrier) -> None:
        await finish(self)
        closed.append(time.monotonic())

    monkeypatch.setattr(transactions.TransactionBarrier, "finish", noting_finish)
    broker = MemoryBroker()
    publish(broker, 5)
    engine = make_engine(broker, Connector(broker, lambda b, q: FailSecondCommit(b, q, log), SlowReports),
                         consume_batch_size=5, transaction_max_messages=10, transaction_interval_seconds=0.05,
                         shutdown_timeout_seconds=3.0)

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        deadline = time.monotonic() + 10
        while not closed and time.monotonic() < deadline:  # the first one closed after its interval
            await asyncio.sleep(0.005)
        assert ("commit-start", 5) not in log, "the first transaction waits for its reports (0.4 s)"
        for n in range(5, 10):  # the second one opens while the first one's reports are still coming
            broker.publish("in", json.dumps({"n": n}).encode())
        while broker.acked("in") < 10 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        handler.stop()
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(main())
    assert ("commit-fail", 5) in log, log
    assert broker.acked("in") == 10, log
    assert report.acked == broker.acked("in"), (report, log)


class AbortsFirstCommit(TxConsumer):
    def __init__(self, broker: MemoryBroker, queue: str, log: list[Any]) -> None:
        super().__init__(broker, queue, log, commit_delay=0.3)
        self.failed = False

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        if self.failed:
            await super().commit(envelopes)
            return
        self.failed = True
        self.log.append(("commit-start", len(envelopes)))
        await asyncio.sleep(self.commit_delay)
        await self.abort()
        raise DeliveryError("the transaction was aborted: its inputs will be consumed again")


def test_an_async_handler_that_outlives_the_abort_settles_nothing_of_the_aborted_work() -> None:
    """An abort resets the lanes, waiting at most a second for their tasks. A handler whose cleanup takes longer
    survives it: its lane must not go on through the aborted work's queue (handled again, its outputs sent
    outside any transaction, its acks counted for inputs already given up)."""
    log: list[Any] = []
    handled: list[int] = []
    broker = MemoryBroker()
    publish(broker, 10)
    engine = make_engine(broker, Connector(broker, lambda b, q: AbortsFirstCommit(b, q, log),
                                           lambda b: LoggingProducer(b, log)),
                         consume_batch_size=5, transaction_max_messages=5, transaction_interval_seconds=30.0,
                         shutdown_timeout_seconds=5.0)
    slow_once = [True]
    cleaned_up = asyncio.Event()

    @engine.stream_app
    async def handler(item: Item) -> list[tuple[str, Item]]:
        handled.append(item.n)
        if item.n == 5 and slow_once[0]:
            slow_once[0] = False
            try:
                await asyncio.sleep(60)  # still running when the first commit fails
            finally:
                await asyncio.sleep(1.3)  # its cleanup outlasts the reset's second
                cleaned_up.set()
        return [("out", item)]

    async def main() -> Any:
        task = asyncio.ensure_future(handler.run_async())
        deadline = time.monotonic() + 20
        while not (cleaned_up.is_set() and broker.acked("in") == 10) and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        handler.stop()
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(main())
    abort = log.index("abort")
    sent_after = sorted(entry[1] for entry in log[abort:] if isinstance(entry, tuple) and entry[0] == "sent")
    assert sent_after == list(range(10)), f"each input's output sent once after the abort: {log}"
    assert broker.acked("in") == 10 and report.acked == 10, report
    assert report.settled == report.consumed, report


class AbortedFirstRecord(MemoryProducer):
    """Reports its first record unsent because its transaction is over (as Kafka's producer does for the records
    an abort purged), and sends every other one."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.refused = False

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        if not self.refused and messages:
            self.refused = True
            on_delivery((), [(messages[0], TransactionAbortedError("its transaction is over"))])
            messages = messages[1:]
        if messages:
            super().produce(messages, on_delivery)


class GiveBackLog(TxConsumer):
    """Notes what the engine gives back (nack); an abort's own rewind is not a give-back."""

    def __init__(self, broker: MemoryBroker, queue: str, log: list[Any]) -> None:
        super().__init__(broker, queue, log)
        self.given_back: list[Envelope] = []

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        self.given_back.extend(envelopes)
        await super().nack(envelopes, delay)


def logging_give_backs(producer: Any, count: int,
                       **settings: Any) -> tuple[list[Any], list[GiveBackLog], MemoryBroker, Engine]:
    """An exactly-once engine (transactions of five inputs) over ``count`` published inputs, whose consumer notes
    what the engine gives back, and whose outputs go to ``producer(broker)``."""
    log: list[Any] = []
    consumers: list[GiveBackLog] = []

    def make(broker: MemoryBroker, queue: str) -> GiveBackLog:
        consumers.append(GiveBackLog(broker, queue, log))
        return consumers[-1]

    broker = MemoryBroker()
    publish(broker, count)
    engine = make_engine(broker, Connector(broker, make, producer), consume_batch_size=5, transaction_max_messages=5,
                         **settings)
    return log, consumers, broker, engine


def test_a_record_unsent_because_its_transaction_is_over_aborts_it_without_giving_its_input_back() -> None:
    """Not the record's fault: the abort rewinds its input to the last commit. Given back as a failure, the input
    would count a delivery against max_deliveries (repeated aborts would dead-letter healthy messages) and pause
    its partition for the redelivery delay."""
    log, consumers, broker, engine = logging_give_backs(AbortedFirstRecord, 10, transaction_interval_seconds=30.0,
                                                        shutdown_timeout_seconds=2.0)

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    report = handler.run_until_drained(timeout=20, drain_idle_seconds=0.2)
    assert "abort" in log, log
    assert consumers[0].given_back == [], "the input was given back as a failure"
    assert report.failed == 0 and not report.errors, report
    assert report.acked == 10 and broker.acked("in") == 10, report
    assert set(outputs(broker)) == set(range(10))


class FailsFirstBatchLate(MemoryProducer):
    """Reports every record of its first call failed, a second later; sends every later one."""

    def __init__(self, broker: MemoryBroker) -> None:
        super().__init__(broker)
        self.refused = False

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        if not self.refused:
            self.refused = True
            failures = [(m, DeliveryError("the broker lost it")) for m in messages]
            asyncio.get_running_loop().call_later(1.0, on_delivery, (), failures)
            return
        super().produce(messages, on_delivery)


def test_a_failure_reported_after_its_batch_handlers_transaction_aborted_changes_nothing() -> None:
    """A batch handler's outputs belong to its group of inputs. Their transaction aborts (unsettled at its deadline),
    which gives up every input; the failure reports that come after must neither give the inputs back a second
    time (counted failed, nacked) nor fail the next transaction."""
    log, consumers, broker, engine = logging_give_backs(FailsFirstBatchLate, 5, transaction_interval_seconds=0.05,
                                                        shutdown_timeout_seconds=0.5, batch_size=5)

    @engine.stream_app
    def handler(items: list[Item]) -> list[tuple[str, Item]]:
        return [("out", item) for item in items]

    report = handler.run_until_drained(timeout=20, drain_idle_seconds=1.5)
    assert log.count("abort") == 1, log
    assert consumers[0].given_back == [], "the late failures gave the inputs back again"
    assert report.failed == 0, report
    assert report.acked == 5 and broker.acked("in") == 5, report


class SlowFirstCommit(TxConsumer):
    """Its first commit takes 0.3 s; notes which inputs were handled meanwhile (for the next transaction)."""

    def __init__(self, broker: MemoryBroker, queue: str, log: list[Any], handled: list[int]) -> None:
        super().__init__(broker, queue, log, commit_delay=0.3)
        self.handled = handled
        self.handled_during_first_commit: list[int] | None = None

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        if self.handled_during_first_commit is not None:
            self.commit_delay = 0.0
            await super().commit(envelopes)
            return
        before = len(self.handled)
        await super().commit(envelopes)
        self.handled_during_first_commit = self.handled[before:]


@pytest.mark.parametrize(("max_buffered", "expected"), [(None, 50), (20, 20)])
def test_by_default_the_next_transaction_may_take_all_its_inputs_while_one_commits(
        max_buffered: int | None, expected: int) -> None:
    """The inputs handled while a transaction commits stay unsettled (their outputs wait for the next begin), so
    the at-least-once default bound (4 x consume_batch_size, 20 here) stalled the worker after 20 of them at
    every commit: about 10% of exactly-once throughput on a local broker. By default a transactional input may
    now hold a whole transaction's inputs (``transaction_max_messages``); a ``max_buffered`` given is kept."""
    log: list[Any] = []
    handled: list[int] = []
    consumers: list[SlowFirstCommit] = []

    def make(broker: MemoryBroker, queue: str) -> SlowFirstCommit:
        consumers.append(SlowFirstCommit(broker, queue, log, handled))
        return consumers[-1]

    broker = MemoryBroker()
    publish(broker, 100)
    settings: dict[str, Any] = {} if max_buffered is None else {"max_buffered": max_buffered}
    engine = make_engine(broker, Connector(broker, make, lambda b: LoggingProducer(b, log)),
                         consume_batch_size=5, max_in_flight=1, transaction_max_messages=50,
                         transaction_interval_seconds=30.0, shutdown_timeout_seconds=2.0, **settings)
    assert engine.max_buffered == 20 if max_buffered is None else max_buffered

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        handled.append(item.n)
        return [("out", item)]

    report = handler.run_until_drained(timeout=20, drain_idle_seconds=0.2)
    assert consumers[0].handled_during_first_commit is not None
    assert len(consumers[0].handled_during_first_commit) == expected, log
    assert outputs(broker) == list(range(100))
    assert report.acked == 100 and broker.acked("in") == 100, report
