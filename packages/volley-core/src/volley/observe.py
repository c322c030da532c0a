"""Fan-out of engine events to every installed observer, isolating the engine from observer bugs."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from volley.errors import ConfigurationError
from volley.ports import (
    CommitObserver,
    ConsumedObserver,
    DataModelTimeObserver,
    DeadLetterCountObserver,
    DeliveryObserver,
    DepthObserver,
    HeartbeatObserver,
    InFlightObserver,
    LagObserver,
    PartitionId,
    ProcessTimeObserver,
    ProducedObserver,
    ReadyObserver,
    RetryObserver,
    StartObserver,
    StopObserver,
)

logger = logging.getLogger("volley")

_Calls = list[tuple[object, Callable[..., None]]]


class MultiObserver:
    """Calls every observer; one that raises is logged once per event name and never breaks the pipeline.

    An observer implements any subset of the events (each one a protocol in ``volley.ports``): which observers
    take which event is decided here, once, so that an event costs one loop over the observers that take it.
    """

    def __init__(self, observers: Sequence[object]) -> None:
        self.observers = list(observers)
        self.enabled = bool(self.observers)
        self._complained: set[tuple[int, str]] = set()
        each = self.observers
        self._start: _Calls = [(o, o.on_start) for o in each if isinstance(o, StartObserver)]
        self._consumed: _Calls = [(o, o.on_consumed) for o in each if isinstance(o, ConsumedObserver)]
        self._produced: _Calls = [(o, o.on_produced) for o in each if isinstance(o, ProducedObserver)]
        self._delivery: _Calls = [(o, o.on_delivery) for o in each if isinstance(o, DeliveryObserver)]
        self._process_time: _Calls = [(o, o.on_process_time) for o in each if isinstance(o, ProcessTimeObserver)]
        self._data_model_time: _Calls = [
            (o, o.on_data_model_time) for o in each if isinstance(o, DataModelTimeObserver)
        ]
        self._dead_letter: _Calls = [(o, o.on_dead_letter) for o in each if isinstance(o, DeadLetterCountObserver)]
        self._retry: _Calls = [(o, o.on_retry) for o in each if isinstance(o, RetryObserver)]
        self._in_flight: _Calls = [(o, o.on_in_flight) for o in each if isinstance(o, InFlightObserver)]
        self._heartbeat: _Calls = [(o, o.on_heartbeat) for o in each if isinstance(o, HeartbeatObserver)]
        self._ready: _Calls = [(o, o.on_ready) for o in each if isinstance(o, ReadyObserver)]
        self._lag: _Calls = [(o, o.on_lag) for o in each if isinstance(o, LagObserver)]
        self._commit: _Calls = [(o, o.on_commit) for o in each if isinstance(o, CommitObserver)]
        self._depth: _Calls = [(o, o.on_depth) for o in each if isinstance(o, DepthObserver)]
        self._stop: _Calls = [(o, o.on_stop) for o in each if isinstance(o, StopObserver)]

    def _each(self, event: str, calls: _Calls, *args: Any) -> None:
        for observer, method in calls:
            try:
                method(*args)
            except ConfigurationError:
                if event == "on_start":  # e.g. the metrics port is taken: fail at start-up, as py-volley did
                    raise
                logger.exception("observer %r failed in %s", observer, event)
            except Exception:
                key = (id(observer), event)
                if key not in self._complained:
                    self._complained.add(key)
                    logger.exception("observer %r failed in %s (further failures of this kind are not logged)",
                                     observer, event)

    def on_start(self, app_name: str) -> None:
        self._each("on_start", self._start, app_name)

    def on_consumed(self, app_name: str, status: str, count: int) -> None:
        self._each("on_consumed", self._consumed, app_name, status, count)

    def on_produced(self, app_name: str, source: str, destination: str, count: int) -> None:
        self._each("on_produced", self._produced, app_name, source, destination, count)

    def on_delivery(self, app_name: str, status: str, count: int) -> None:
        self._each("on_delivery", self._delivery, app_name, status, count)

    def on_process_time(self, app_name: str, process_name: str, seconds: float, count: int) -> None:
        self._each("on_process_time", self._process_time, app_name, process_name, seconds, count)

    def on_data_model_time(self, process: str, seconds: float, count: int) -> None:
        self._each("on_data_model_time", self._data_model_time, process, seconds, count)

    def on_dead_letter(self, app_name: str, reason: str, count: int) -> None:
        self._each("on_dead_letter", self._dead_letter, app_name, reason, count)

    def on_retry(self, app_name: str, count: int) -> None:
        self._each("on_retry", self._retry, app_name, count)

    def on_in_flight(self, app_name: str, count: int) -> None:
        self._each("on_in_flight", self._in_flight, app_name, count)

    def on_heartbeat(self, app_name: str) -> None:
        self._each("on_heartbeat", self._heartbeat, app_name)

    def on_ready(self, app_name: str, ready: bool) -> None:
        self._each("on_ready", self._ready, app_name, ready)

    def on_lag(self, app_name: str, lag: Mapping[PartitionId, int]) -> None:
        self._each("on_lag", self._lag, app_name, lag)

    def on_commit(self, app_name: str, seconds: float) -> None:
        self._each("on_commit", self._commit, app_name, seconds)

    def on_depth(self, app_name: str, queue: str, depth: int) -> None:
        self._each("on_depth", self._depth, app_name, queue, depth)

    def on_stop(self, app_name: str) -> None:
        self._each("on_stop", self._stop, app_name)
