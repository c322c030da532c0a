"""volley-prometheus's plugin: registers the ``prometheus`` observer with Volley."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from volley.plugins import Register, hookimpl
from volley.ports import Observer
from volley_prometheus.observer import PrometheusObserver


def create_observer(app_name: str, metrics_port: int | None, settings: Mapping[str, Any]) -> Observer:
    """factory(app_name, metrics_port, settings) -> Observer, as the ``volley_register_observers`` hook asks."""
    return PrometheusObserver.from_settings(app_name, metrics_port, settings)


# The metrics_settings keys this plugin reads: the Engine refuses any other (volley.engine).
create_observer.settings_keys = frozenset(  # type: ignore[attr-defined]
    {"metrics_host", "health_max_silence_seconds", "prometheus_metrics", "clock"})


@hookimpl
def volley_register_observers(register: Register) -> None:
    register("prometheus", create_observer)
