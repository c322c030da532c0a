"""The HTTP endpoint: /metrics, /healthz and /readyz over real sockets on the loopback interface."""

from __future__ import annotations

import gzip
import socket
import urllib.request
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from volley.errors import ConfigurationError
from volley_prometheus import PrometheusObserver, VolleyMetrics

Get = Callable[..., Any]


def url(observer: PrometheusObserver, path: str) -> str:
    assert observer.port is not None
    return f"http://127.0.0.1:{observer.port}{path}"


def test_metrics_endpoint_serves_the_registry(served: PrometheusObserver, get: Get) -> None:
    served.on_consumed("svc", "success", 3)
    served.on_produced("svc", "in", "out", 3)
    served.on_process_time("svc", "cycle", 0.6, 3)
    reply = get(url(served, "/metrics"))
    assert reply.status == 200
    assert reply.headers["Content-Type"].startswith("text/plain")
    assert 'messages_consumed_count_total{status="success",volley_app="svc"} 3.0' in reply.body
    assert 'messages_produced_count_total{destination="out",source="in",volley_app="svc"} 3.0' in reply.body
    assert 'process_time_seconds_count{process_name="cycle",volley_app="svc"} 3.0' in reply.body
    assert "# TYPE process_time_seconds summary" in reply.body


def test_metrics_endpoint_negotiates_openmetrics_and_gzip(served: PrometheusObserver) -> None:
    served.on_consumed("svc", "success", 1)
    request = urllib.request.Request(url(served, "/metrics"), headers={
        "Accept": "application/openmetrics-text; version=1.0.0", "Accept-Encoding": "gzip"})
    with urllib.request.urlopen(request, timeout=5) as reply:
        assert reply.headers["Content-Encoding"] == "gzip"
        assert reply.headers["Content-Type"].startswith("application/openmetrics-text")
        body = gzip.decompress(reply.read()).decode()
    assert body.rstrip().endswith("# EOF")
    assert 'messages_consumed_count_total{status="success",volley_app="svc"} 1.0' in body


def test_unknown_path_is_404(served: PrometheusObserver, get: Get) -> None:
    assert get(url(served, "/nope")).status == 404
    assert get(url(served, "/")).status == 200


def test_healthz_fails_when_heartbeats_stop(served: PrometheusObserver, get: Get, clock: Any) -> None:
    reply = get(url(served, "/healthz"))
    assert (reply.status, reply.body.splitlines()[0]) == (200, "ok")

    clock.advance(29.0)
    served.on_heartbeat("svc")
    clock.advance(29.0)
    assert get(url(served, "/healthz")).status == 200  # 29 s since the last heartbeat: within 30 s

    clock.advance(2.0)
    reply = get(url(served, "/healthz"))
    assert reply.status == 503
    assert "svc: no progress for 31.0s (limit 30s)" in reply.body

    served.on_heartbeat("svc")
    assert get(url(served, "/healthz")).status == 200


def test_healthz_counts_silence_from_start_until_the_first_heartbeat(
    metrics: VolleyMetrics, clock: Any, get: Get
) -> None:
    observer = PrometheusObserver("slow", 0, host="127.0.0.1", max_silence=5.0, metrics=metrics, clock=clock)
    clock.advance(100.0)  # constructed long before it starts: the clock starts at on_start
    observer.on_start("slow")
    try:
        assert get(url(observer, "/healthz")).status == 200
        clock.advance(6.0)
        assert get(url(observer, "/healthz")).status == 503
    finally:
        observer.on_stop("slow")


def test_readyz_follows_on_ready(served: PrometheusObserver, get: Get) -> None:
    reply = get(url(served, "/readyz"))
    assert reply.status == 503
    assert "svc: not ready" in reply.body
    served.on_ready("svc", True)
    reply = get(url(served, "/readyz"))
    assert (reply.status, reply.body.splitlines()[0]) == (200, "ok")
    served.on_ready("svc", False)  # partitions lost, or stopping
    assert get(url(served, "/readyz")).status == 503
    served.on_ready("svc", True)
    assert get(url(served, "/readyz")).status == 200


def test_stop_closes_the_port(metrics: VolleyMetrics, get: Get) -> None:
    observer = PrometheusObserver("svc", 0, host="127.0.0.1", metrics=metrics)
    observer.on_start("svc")
    port = observer.port
    assert port is not None
    assert get(f"http://127.0.0.1:{port}/metrics").status == 200
    observer.on_stop("svc")
    assert observer.port is None
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_apps_on_one_port_share_the_server_and_the_probes(metrics: VolleyMetrics, clock: Any, get: Get) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    first = PrometheusObserver("a", port, host="127.0.0.1", metrics=metrics, clock=clock)
    second = PrometheusObserver("b", port, host="127.0.0.1", metrics=metrics, clock=clock)
    first.on_start("a")
    second.on_start("b")
    try:
        first.on_ready("a", True)
        reply = get(f"http://127.0.0.1:{port}/readyz")
        assert reply.status == 503
        assert "b: not ready" in reply.body
        second.on_ready("b", True)
        assert get(f"http://127.0.0.1:{port}/readyz").status == 200
        first.on_stop("a")
        assert get(f"http://127.0.0.1:{port}/readyz").status == 200  # still served for b
    finally:
        first.on_stop("a")
        second.on_stop("b")
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0


def test_taken_port_fails_at_start_with_advice(get: Get) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        observer = PrometheusObserver("svc", port, host="127.0.0.1", metrics=VolleyMetrics(CollectorRegistry()))
        with pytest.raises(ConfigurationError, match="metrics_port"):
            observer.on_start("svc")
        assert observer.port is None


def test_no_port_no_server(metrics: VolleyMetrics) -> None:
    observer = PrometheusObserver.from_settings("svc", None, {"prometheus_metrics": metrics})
    observer.on_start("svc")
    observer.on_consumed("svc", "success", 1)
    assert observer.port is None
    assert metrics.registry.get_sample_value("messages_consumed_count_total",
                                             {"volley_app": "svc", "status": "success"}) == 1
    observer.on_stop("svc")


def test_metrics_host_setting_is_used(metrics: VolleyMetrics, get: Get) -> None:
    observer = PrometheusObserver.from_settings("svc", 0, {"metrics_host": "127.0.0.1", "prometheus_metrics": metrics})
    observer.on_start("svc")
    try:
        assert observer.host == "127.0.0.1"
        assert get(url(observer, "/healthz")).status == 200
    finally:
        observer.on_stop("svc")
