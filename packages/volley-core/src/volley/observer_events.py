"""The events the engine reports to observers (metrics), each a ``runtime_checkable`` protocol of its own.

An observer implements any subset of them; ``volley.observe.MultiObserver`` checks which with ``isinstance``
once, when it is built, and calls each observer only for its events. ``Observer`` is all of them
(volley-prometheus is one). Part of the ports: ``volley.ports`` exports every name here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from volley.ports import PartitionId


@runtime_checkable
class StartObserver(Protocol):
    def on_start(self, app_name: str) -> None: ...


@runtime_checkable
class ConsumedObserver(Protocol):
    def on_consumed(self, app_name: str, status: str, count: int) -> None: ...


@runtime_checkable
class ProducedObserver(Protocol):
    def on_produced(self, app_name: str, source: str, destination: str, count: int) -> None: ...


@runtime_checkable
class ProcessTimeObserver(Protocol):
    def on_process_time(self, app_name: str, process_name: str, seconds: float, count: int) -> None:
        """``count`` messages took ``seconds`` together in ``process_name`` (``component``: the handler call;
        ``cycle``: decoding to outputs handed over); each counts as one observation. Totals, not a value per
        message: the engine adds them up as it goes, so timing costs no list per message."""


@runtime_checkable
class DeliveryObserver(Protocol):
    def on_delivery(self, app_name: str, status: str, count: int) -> None:
        """A producer's delivery report: ``count`` records confirmed by their broker ("success", outputs and dead
        letters alike) or failed ("fail": every failed attempt, also one produced again later). Once per report
        and status, never per record."""


@runtime_checkable
class DataModelTimeObserver(Protocol):
    def on_data_model_time(self, process: str, seconds: float, count: int) -> None: ...


@runtime_checkable
class DeadLetterCountObserver(Protocol):
    def on_dead_letter(self, app_name: str, reason: str, count: int) -> None: ...


@runtime_checkable
class RetryObserver(Protocol):
    def on_retry(self, app_name: str, count: int) -> None: ...


@runtime_checkable
class InFlightObserver(Protocol):
    def on_in_flight(self, app_name: str, count: int) -> None: ...


@runtime_checkable
class HeartbeatObserver(Protocol):
    def on_heartbeat(self, app_name: str) -> None:
        """The engine's loop is alive and made progress; sent at most about once per second."""


@runtime_checkable
class ReadyObserver(Protocol):
    def on_ready(self, app_name: str, ready: bool) -> None:
        """Connected and consuming (True), or starting / stopping / partitions lost (False)."""


@runtime_checkable
class LagObserver(Protocol):
    def on_lag(self, app_name: str, lag: Mapping[PartitionId, int]) -> None: ...


@runtime_checkable
class CommitObserver(Protocol):
    def on_commit(self, app_name: str, seconds: float) -> None: ...


@runtime_checkable
class DepthObserver(Protocol):
    def on_depth(self, app_name: str, queue: str, depth: int) -> None: ...


@runtime_checkable
class StopObserver(Protocol):
    def on_stop(self, app_name: str) -> None: ...


@runtime_checkable
class Observer(
    StartObserver, ConsumedObserver, ProducedObserver, DeliveryObserver, ProcessTimeObserver, DataModelTimeObserver,
    DeadLetterCountObserver, RetryObserver, InFlightObserver, HeartbeatObserver, ReadyObserver, LagObserver,
    CommitObserver, DepthObserver, StopObserver, Protocol,
):
    """Receives the engine's events, for metrics. Called on the event loop, mostly once per batch.

    Names follow py-volley's metrics so that dashboards keep working:
    ``status`` is "success" or "fail"; ``process_name`` is "component" (the
    handler) or "cycle" (one message end to end).
    """
