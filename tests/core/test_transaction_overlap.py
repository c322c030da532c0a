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

from volley import MemoryBroker
from volley.errors import DeliveryError
from volley.memory import MemoryProducer
from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryCallback
from volley.run import sync_executor

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
