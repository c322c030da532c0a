"""Fan-out of engine events to every installed observer, isolating the engine from observer bugs."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import Any

from volley.errors import ConfigurationError
from volley.ports import Observer, PartitionId

logger = logging.getLogger("volley")


class MultiObserver:
    """Calls every observer; one that raises is logged once per event name and never breaks the pipeline."""

    def __init__(self, observers: Sequence[Observer]) -> None:
        self.observers = list(observers)
        self.enabled = bool(self.observers)
        self._complained: set[tuple[int, str]] = set()

    def _each(self, event: str, *args: Any) -> None:
        for observer in self.observers:
            method = getattr(observer, event, None)
            if method is None:
                continue
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
        self._each("on_start", app_name)

    def on_consumed(self, app_name: str, status: str, count: int) -> None:
        self._each("on_consumed", app_name, status, count)

    def on_produced(self, app_name: str, source: str, destination: str, count: int) -> None:
        self._each("on_produced", app_name, source, destination, count)

    def on_process_time(self, app_name: str, process_name: str, seconds: Sequence[float]) -> None:
        self._each("on_process_time", app_name, process_name, seconds)

    def on_data_model_time(self, process: str, seconds: float, count: int) -> None:
        self._each("on_data_model_time", process, seconds, count)

    def on_dead_letter(self, app_name: str, reason: str, count: int) -> None:
        self._each("on_dead_letter", app_name, reason, count)

    def on_retry(self, app_name: str, count: int) -> None:
        self._each("on_retry", app_name, count)

    def on_in_flight(self, app_name: str, count: int) -> None:
        self._each("on_in_flight", app_name, count)

    def on_heartbeat(self, app_name: str) -> None:
        self._each("on_heartbeat", app_name)

    def on_ready(self, app_name: str, ready: bool) -> None:
        self._each("on_ready", app_name, ready)

    def on_lag(self, app_name: str, lag: Mapping[PartitionId, int]) -> None:
        self._each("on_lag", app_name, lag)

    def on_commit(self, app_name: str, seconds: float) -> None:
        self._each("on_commit", app_name, seconds)

    def on_depth(self, app_name: str, queue: str, depth: int) -> None:
        self._each("on_depth", app_name, queue, depth)

    def on_stop(self, app_name: str) -> None:
        self._each("on_stop", app_name)
