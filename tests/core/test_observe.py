"""MultiObserver: an observer takes any subset of the events (each a protocol in volley.ports), decided once."""

from __future__ import annotations

import logging

import pytest

from volley.errors import ConfigurationError
from volley.observe import MultiObserver
from volley.ports import ConsumedObserver, DeliveryObserver, Observer, ReadyObserver, StartObserver


class Partial:
    """Takes on_consumed and on_ready only."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def on_consumed(self, app_name: str, status: str, count: int) -> None:
        self.calls.append(("consumed", app_name, status, count))

    def on_ready(self, app_name: str, ready: bool) -> None:
        self.calls.append(("ready", app_name, ready))


class Failing:
    def on_consumed(self, app_name: str, status: str, count: int) -> None:
        raise RuntimeError("observer bug")

    def on_start(self, app_name: str) -> None:
        raise ConfigurationError("metrics port taken")


def test_each_event_reaches_the_observers_that_declare_it() -> None:
    partial = Partial()
    assert isinstance(partial, ConsumedObserver) and isinstance(partial, ReadyObserver)
    assert not isinstance(partial, StartObserver) and not isinstance(partial, Observer)
    multi = MultiObserver([partial])
    multi.on_start("app")
    multi.on_consumed("app", "success", 3)
    multi.on_depth("app", "q", 7)
    multi.on_ready("app", True)
    multi.on_stop("app")
    assert partial.calls == [("consumed", "app", "success", 3), ("ready", "app", True)]
    assert isinstance(multi, Observer)


class Deliveries:
    """Takes on_delivery only (py-volley's delivery_report_status)."""

    def __init__(self) -> None:
        self.calls: list[tuple[object, ...]] = []

    def on_delivery(self, app_name: str, status: str, count: int) -> None:
        self.calls.append(("delivery", app_name, status, count))


def test_the_delivery_event_reaches_only_the_observers_that_declare_it() -> None:
    deliveries, partial = Deliveries(), Partial()
    assert isinstance(deliveries, DeliveryObserver) and not isinstance(partial, DeliveryObserver)
    assert not isinstance(deliveries, ConsumedObserver)
    multi = MultiObserver([deliveries, partial])
    multi.on_delivery("app", "success", 5)
    multi.on_delivery("app", "fail", 1)
    multi.on_consumed("app", "success", 5)
    assert deliveries.calls == [("delivery", "app", "success", 5), ("delivery", "app", "fail", 1)]
    assert partial.calls == [("consumed", "app", "success", 5)]


def test_which_observer_takes_which_event_is_decided_when_they_are_bound() -> None:
    partial = Partial()
    multi = MultiObserver([partial])
    partial.on_depth = lambda *args: partial.calls.append(("depth", *args))  # type: ignore[attr-defined]
    multi.on_depth("app", "q", 1)
    assert partial.calls == []


def test_a_raising_observer_is_logged_once_per_event_and_the_others_still_run(
        caplog: pytest.LogCaptureFixture) -> None:
    partial = Partial()
    multi = MultiObserver([Failing(), partial])
    with caplog.at_level(logging.ERROR, logger="volley"):
        multi.on_consumed("app", "success", 1)
        multi.on_consumed("app", "fail", 2)
    assert [c[2] for c in partial.calls] == ["success", "fail"]
    assert len([r for r in caplog.records if "on_consumed" in r.getMessage()]) == 1
    with pytest.raises(ConfigurationError, match="metrics port taken"):
        multi.on_start("app")
