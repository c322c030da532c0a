"""The delivery-report event (volley.ports.DeliveryObserver), py-volley's ``delivery_report_status{status}``.

Every record a producer confirmed counts as "success" (outputs and dead letters alike), every failed report as
"fail", including attempts produced again later: a record that failed twice and then landed counts two fails and one
success, as py-volley counted each report. One call per report and status, never per message; reports arriving
after the shutdown closed settlement count nothing.
"""

from __future__ import annotations

import threading
from collections import Counter
from collections.abc import Callable, Sequence

import pytest
from engine_fakes import Connector, FlakyProducer, Item, make_engine, outputs, publish, wait_for

from volley import MemoryBroker
from volley.memory import MemoryProducer
from volley.message import OutgoingMessage
from volley.ports import DeliveryCallback


class DeliveryRecorder:
    """Takes the delivery event only (volley.ports.DeliveryObserver), on the engine's loop."""

    def __init__(self) -> None:
        self.calls: list[tuple[str, str, int]] = []

    def on_delivery(self, app_name: str, status: str, count: int) -> None:
        self.calls.append((app_name, status, count))

    def totals(self) -> Counter[str]:
        totals: Counter[str] = Counter()
        for _, status, count in self.calls:
            totals[status] += count
        return totals


def flaky(failures: Callable[[OutgoingMessage], int], how: str = "report",
          made: list[FlakyProducer] | None = None) -> Callable[[MemoryBroker], FlakyProducer]:
    def make(broker: MemoryBroker) -> FlakyProducer:
        producer = FlakyProducer(broker, failures, how)
        if made is not None:
            made.append(producer)
        return producer

    return make


def test_confirmed_outputs_and_dead_letters_count_as_success_and_each_failed_report_as_fail() -> None:
    broker = MemoryBroker()
    recorder = DeliveryRecorder()
    connector = Connector(broker, producer=flaky(lambda m: 1 if m.value == b'{"n":10}' else 0))
    engine = make_engine(broker, connector, max_retries=2, observers=[recorder])
    publish(broker, 6)

    @engine.stream_app
    def times_ten(item: Item) -> list[tuple[str, Item]]:
        if item.n == 3:
            raise ValueError("no threes")
        return [("out", Item(item.n * 10))]

    report = times_ten.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert report.acked == 5 and report.dead_lettered == 1 and report.failed == 0
    assert outputs(broker) == [0, 10, 20, 40, 50] and len(broker.produced("dlq")) == 1
    # Five outputs and one dead letter confirmed; the output of 1 failed once before it landed.
    assert recorder.totals() == {"success": 6, "fail": 1}
    assert all(app == "t" and count > 0 for app, _, count in recorder.calls), recorder.calls


def test_a_delivery_retried_until_it_lands_counts_each_failed_report_then_one_success() -> None:
    broker = MemoryBroker()
    recorder = DeliveryRecorder()
    connector = Connector(broker, producer=flaky(lambda m: 2))  # fails twice, delivered on the second retry
    engine = make_engine(broker, connector, max_retries=2, observers=[recorder])
    publish(broker, 1)

    @engine.stream_app
    def same(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    report = same.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert report.acked == 1 and report.retries == 2
    assert recorder.calls == [("t", "fail", 1), ("t", "fail", 1), ("t", "success", 1)]


def test_a_delivery_that_fails_for_good_counts_every_attempt_as_fail() -> None:
    broker = MemoryBroker()
    recorder = DeliveryRecorder()
    connector = Connector(broker, producer=flaky(lambda m: 10**6 if m.value == b'{"n":1}' else 0))
    engine = make_engine(broker, connector, max_retries=2, on_failure="continue", redelivery_delay_seconds=60.0,
                         observers=[recorder])
    publish(broker, 3)

    @engine.stream_app
    def same(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    report = same.run_until_drained(timeout=10, drain_idle_seconds=0.0, max_messages=3)
    assert report.failed == 1 and report.acked == 2
    assert recorder.totals() == {"success": 2, "fail": 3}  # tried, then retried max_retries times


def test_a_refused_produce_call_counts_each_of_its_records_as_fail() -> None:
    broker = MemoryBroker()
    recorder = DeliveryRecorder()
    made: list[FlakyProducer] = []
    connector = Connector(broker, producer=flaky(lambda m: 1 if m.value == b'{"n":1}' else 0, "raise", made))
    engine = make_engine(broker, connector, max_retries=2, observers=[recorder])
    publish(broker, 3)

    @engine.stream_app
    def same(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    report = same.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert report.acked == 3 and outputs(broker) == [0, 1, 2]
    [producer] = made
    refused = sum(len(times) - 1 for times in producer.attempts.values())  # every record of the refused call
    assert refused >= 1
    assert recorder.totals() == {"success": 3, "fail": refused}


class HoldingProducer(MemoryProducer):
    """Stores every record, but holds back the reports of those ``held`` picks until it is closed."""

    def __init__(self, broker: MemoryBroker, held: Callable[[OutgoingMessage], bool]) -> None:
        super().__init__(broker)
        self.held = held
        self.holding: list[tuple[Sequence[OutgoingMessage], DeliveryCallback]] = []

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        kept = [m for m in messages if self.held(m)]
        passing = [m for m in messages if not self.held(m)]
        if passing:
            super().produce(passing, on_delivery)
        if kept:
            super().produce(kept, lambda delivered, failed: None)  # stored now, reported at close
            self.holding.append((kept, on_delivery))

    async def close(self) -> None:
        for messages, on_delivery in self.holding:
            on_delivery(messages, ())


def test_reports_arriving_after_settlement_closed_count_nothing() -> None:
    broker = MemoryBroker()
    recorder = DeliveryRecorder()
    made: list[HoldingProducer] = []

    def holding(broker: MemoryBroker) -> HoldingProducer:
        made.append(HoldingProducer(broker, lambda m: m.value == b'{"n":1}'))
        return made[-1]

    engine = make_engine(broker, Connector(broker, producer=holding), shutdown_timeout_seconds=0.2,
                         observers=[recorder])
    publish(broker, 2)

    @engine.stream_app
    def same(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    def stop_once_held() -> None:
        if wait_for(lambda: bool(made and made[0].holding)):
            same.stop()

    threading.Thread(target=stop_once_held, daemon=True).start()
    report = same.run_until_drained(timeout=10)
    assert report.acked == 1 and report.abandoned == 1, report
    # The held report came from close(), after the shutdown closed settlement: it counts nothing.
    assert recorder.totals() == {"success": 1}


@pytest.mark.parametrize("observed", [False, True], ids=["no-observer", "observer"])
def test_without_an_observer_delivery_reports_are_not_counted(observed: bool, monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate of every per-batch event: without an observer the engine does not even call the no-op fan-out."""
    from volley.observe import MultiObserver

    calls: list[tuple[str, int]] = []
    monkeypatch.setattr(MultiObserver, "on_delivery",
                        lambda self, app_name, status, count: calls.append((status, count)), raising=True)
    broker = MemoryBroker()
    engine = make_engine(broker, Connector(broker), observers=[DeliveryRecorder()] if observed else None)
    publish(broker, 2)

    @engine.stream_app
    def same(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)]

    same.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    assert (sum(count for _, count in calls) == 2) is observed, calls
