"""Metrics settings defects found by a review (session 31): each test failed on the code before its fix."""

from __future__ import annotations

import math
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from volley import ConfigurationError, Engine, MemoryBroker
from volley_prometheus import PrometheusObserver, VolleyMetrics


@pytest.mark.parametrize("settings", [
    {"metrics_hots": "127.0.0.1"},                 # misspelled metrics_host: would bind 0.0.0.0
    {"health_max_silence": 120},                   # missing _seconds: liveness limit stays 30 s
    {"host": "127.0.0.1"},
])
def test_a_misspelled_metrics_setting_is_refused(settings: dict[str, Any]) -> None:
    """An unknown metrics_settings key was silently ignored: a pod meant to expose metrics on localhost only
    served them on every interface, and a slow handler's worker was restarted by a 30 s liveness limit."""
    broker = MemoryBroker()
    config = {"in": {"value": "in", "profile": "memory", "config": {"broker": broker}}}
    with pytest.raises(ConfigurationError, match=next(iter(settings))):
        Engine(input_queue="in", queue_config=config, metrics_port=0,
               metrics_settings={**settings, "prometheus_metrics": VolleyMetrics(CollectorRegistry())})


@pytest.mark.parametrize("silence", [math.nan])
def test_health_max_silence_nan_or_infinite_is_refused(silence: float) -> None:
    """NaN passed ``max_silence <= 0``; then ``silence > nan`` is always False and /healthz never fails."""
    with pytest.raises(ConfigurationError, match="health_max_silence_seconds"):
        PrometheusObserver.from_settings("svc", None, {"health_max_silence_seconds": silence,
                                                        "prometheus_metrics": VolleyMetrics(CollectorRegistry())})
