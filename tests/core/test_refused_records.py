"""Records a broker refuses for what they are, and reasons too long to carry.

A dead letter the DLQ's broker refused for itself (``InvalidRecordError``: too large for it) was produced again
``max_retries`` times, to be refused each time, before the input was given back; and the ``volley-error-reason``
of a large invalid input (Pydantic lists every error) had no bound, which is what made such letters too large.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from engine_fakes import Connector, Item, make_engine, publish

from volley import Engine, MemoryBroker
from volley.errors import DeliveryError, InvalidRecordError
from volley.memory import MemoryProducer
from volley.message import OutgoingMessage
from volley.plugins import build_registry
from volley.ports import DeliveryCallback
from volley.run.tokens import MAX_REASON
from volley.testing import harness


class RefusingDlq(MemoryProducer):
    """A DLQ producer whose broker refuses every record as too large; counts the attempts."""

    attempts = 0

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        RefusingDlq.attempts += len(messages)
        on_delivery((), [(m, InvalidRecordError("Broker: Message size too large")) for m in messages])


def test_a_dead_letter_refused_for_itself_is_not_produced_again() -> None:
    broker = MemoryBroker()
    publish(broker, 1)
    registry = build_registry()
    registry.entries["observer"] = {}
    where = {"broker": broker}
    engine = Engine(app_name="t", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                    queue_config={"in": {"value": "in", "profile": "memory", "data_model": Item, "config": where},
                                  "out": {"value": "out", "profile": "memory", "data_model": Item, "config": where},
                                  "dlq": {"value": "dlq", "profile": "memory-dlq", "config": where,
                                          "producer": Connector(broker, producer=RefusingDlq)}},
                    metrics_port=None, poll_interval_seconds=0.02, retry_backoff_seconds=0.0, max_retries=3,
                    shutdown_timeout_seconds=2.0, registry=registry)
    RefusingDlq.attempts = 0

    @engine.stream_app
    def handler(item: Item) -> Any:
        raise ValueError("cannot handle it")

    with pytest.raises(DeliveryError, match=r"could not be written to 'dlq'.*Message size too large"):
        handler.run_until_drained(timeout=20, drain_idle_seconds=0.1)
    assert RefusingDlq.attempts == 1  # before: 1 + max_retries, each refused the same way
    assert broker.acked("in") == 0  # not lost: given back, it comes again


def test_a_huge_error_reason_is_cut_in_the_dead_letter_and_says_how_much() -> None:
    engine = Engine(app_name="t", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                    queue_config={"in": {"value": "in", "profile": "memory", "data_model": Item},
                                  "out": {"value": "out", "profile": "memory", "data_model": Item},
                                  "dlq": {"value": "dlq", "profile": "memory-dlq"}},
                    metrics_port=None)

    @engine.stream_app
    def handler(item: Item) -> Any:
        raise ValueError("x" * 100_000)

    h = harness(handler)
    h.send(Item(n=1))
    letters = h.run().dead_letters
    assert len(letters) == 1 and letters[0].headers is not None
    reason = letters[0].headers["volley-error-reason"]
    assert reason.startswith(b"ValueError: xxx")
    assert len(reason) <= MAX_REASON + 40, len(reason)
    assert reason.endswith(b"... (%d more characters)" % (len("ValueError: ") + 100_000 - MAX_REASON))


class AcceptsFirstThenRaises(MemoryProducer):
    """Its first call accepts the first record (delivered a moment later, as a broker's client reports it) and
    then raises for the call; later calls store and report normally."""

    calls = 0

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        AcceptsFirstThenRaises.calls += 1
        if AcceptsFirstThenRaises.calls > 1:
            super().produce(messages, on_delivery)
            return
        first = messages[0]
        asyncio.get_running_loop().call_later(0.05, super().produce, [first], on_delivery)
        raise OverflowError("Python int too large to convert to C int")


def test_a_record_accepted_before_its_call_raised_is_not_produced_again_once_delivered() -> None:
    """The engine counts every record of a call that raised as failed and schedules their retries; the record
    the producer had accepted is then reported delivered. Its retry must be cancelled: it was produced again
    (a duplicate output) because a delivered record's pending timer was left to fire."""
    broker = MemoryBroker()
    publish(broker, 2)
    AcceptsFirstThenRaises.calls = 0
    engine = make_engine(broker, Connector(broker, producer=AcceptsFirstThenRaises), retry_backoff_seconds=0.2,
                         consume_batch_size=2)

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    report = handler.run_until_drained(timeout=20, drain_idle_seconds=0.5)
    assert sorted(json.loads(v)["n"] for v in broker.produced("out")) == [0, 1]
    assert report.acked == 2, report


class AcceptsFirstThenRaisesThenFailsIt(MemoryProducer):
    """First call: accepts the first record, raises for the call, and a moment later reports that accepted record
    failed (a transient broker error). Later calls store at once and confirm after 0.5 s (a slow broker)."""

    calls = 0

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        cls = AcceptsFirstThenRaisesThenFailsIt
        cls.calls += 1
        loop = asyncio.get_running_loop()
        if cls.calls > 1:
            self._broker.publish_many(messages)
            loop.call_later(0.5, on_delivery, list(messages), ())
            return
        first = messages[0]
        loop.call_later(0.05, on_delivery, (), [(first, DeliveryError("Broker: request timed out"))])
        raise RuntimeError("the producer's call raised after accepting the first record")


def test_a_record_failed_twice_is_not_produced_twice() -> None:
    """The call raised (every record counted failed, a retry scheduled), then the accepted record was reported
    failed too: a second retry was scheduled beside the first, and both sent it (a review found it)."""
    broker = MemoryBroker()
    publish(broker, 1)
    AcceptsFirstThenRaisesThenFailsIt.calls = 0
    engine = make_engine(broker, Connector(broker, producer=AcceptsFirstThenRaisesThenFailsIt),
                         retry_backoff_seconds=0.2, max_retries=3)

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    report = handler.run_until_drained(timeout=20, drain_idle_seconds=1.5)
    produced = [json.loads(v)["n"] for v in broker.produced("out")]
    assert produced == [0], produced
    assert report.acked == 1, report
