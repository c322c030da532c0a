"""Prometheus metrics and health probes for Volley.

Installing this distribution is all it takes: Volley finds the ``prometheus``
observer through its plugin entry point, and ``Engine(metrics_port=3000)``
serves ``/metrics``, ``/healthz`` and ``/readyz`` on that port.
"""

from __future__ import annotations

from volley_prometheus.dashboard import dashboard_file, grafana_dashboard
from volley_prometheus.metrics import SPECS, MetricSpec, VolleyMetrics, default_metrics
from volley_prometheus.observer import PrometheusObserver
from volley_prometheus.server import HealthState, MetricsServer

__all__ = ["SPECS", "HealthState", "MetricSpec", "MetricsServer", "PrometheusObserver", "VolleyMetrics",
           "dashboard_file", "default_metrics", "grafana_dashboard"]
