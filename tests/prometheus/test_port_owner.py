"""A metrics port that is already taken (multiprocess mode): only a sibling worker of the same run may keep it.

Each test switches multiprocess mode on for the observer through ``PROMETHEUS_MULTIPROC_DIR`` while the
metrics themselves stay in a private registry (prometheus-client picks its value storage at import time,
so nothing is written to the directory). The sibling is a real server of the run, on a real port.
"""

from __future__ import annotations

import logging
import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client import CollectorRegistry

from volley.errors import ConfigurationError
from volley_prometheus import PrometheusObserver, VolleyMetrics
from volley_prometheus.metrics import MULTIPROC_ENV
from volley_prometheus.server import AGGREGATE_HEADER, MetricsServer, run_id

from .conftest import http_get


@pytest.fixture
def run_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    directory = tmp_path / "run"
    directory.mkdir()
    monkeypatch.setenv(MULTIPROC_ENV, str(directory))
    return directory


@pytest.fixture
def sibling(run_dir: Path) -> Iterator[MetricsServer]:
    """The worker of this run that bound the port first, serving the run's aggregate."""
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), str(run_dir))
    server.start()
    try:
        yield server
    finally:
        server.stop()


def observer(port: int) -> PrometheusObserver:
    return PrometheusObserver("mp", port, host="127.0.0.1", metrics=VolleyMetrics(CollectorRegistry()))


def test_the_aggregate_names_its_run(sibling: MetricsServer, run_dir: Path) -> None:
    reply = http_get(f"http://127.0.0.1:{sibling.port}/healthz")
    assert reply.headers[AGGREGATE_HEADER] == run_id(str(run_dir))
    assert run_id(str(run_dir)) != run_id(str(run_dir.parent))


def test_a_sibling_of_the_same_run_keeps_the_port(sibling: MetricsServer, caplog: pytest.LogCaptureFixture) -> None:
    second = observer(sibling.port)
    with caplog.at_level(logging.INFO, logger="volley_prometheus"):
        second.on_start("mp")  # no exception: the sibling serves the aggregate of every worker
    try:
        assert second.port is None
        assert "served by another worker of this run" in caplog.text
    finally:
        second.on_stop("mp")


def test_a_port_held_by_an_unrelated_process_fails_at_start(run_dir: Path) -> None:
    """It used to be taken for a sibling: the worker carried on, and nothing served this run's metrics."""
    with socket.socket() as other:
        other.bind(("127.0.0.1", 0))
        other.listen()
        port = other.getsockname()[1]
        worker = observer(port)
        with pytest.raises(ConfigurationError, match=r"metrics_port") as caught:
            worker.on_start("mp")
        assert "not a worker of this run" in str(caught.value)
        assert worker.port is None


def test_a_port_served_by_another_run_fails_at_start(tmp_path: Path, run_dir: Path) -> None:
    other_run = tmp_path / "other-run"
    other_run.mkdir()
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), str(other_run))
    server.start()
    try:
        with pytest.raises(ConfigurationError, match="not a worker of this run"):
            observer(server.port).on_start("mp")
    finally:
        server.stop()


def test_a_single_process_server_on_the_port_is_not_a_sibling(run_dir: Path) -> None:
    server = MetricsServer("127.0.0.1", 0, CollectorRegistry(), None)
    server.start()
    try:
        reply = http_get(f"http://127.0.0.1:{server.port}/metrics")
        assert AGGREGATE_HEADER not in reply.headers
        with pytest.raises(ConfigurationError, match="not a worker of this run"):
            observer(server.port).on_start("mp")
    finally:
        server.stop()


def test_an_address_not_of_this_machine_fails_at_start(run_dir: Path) -> None:
    """Any other bind error was swallowed in multiprocess mode too."""
    worker = PrometheusObserver("mp", 0, host="192.0.2.1", metrics=VolleyMetrics(CollectorRegistry()))
    with pytest.raises(ConfigurationError, match="metrics_host"):
        worker.on_start("mp")
    assert worker.port is None


def test_an_unknown_host_name_fails_at_start(run_dir: Path) -> None:
    worker = PrometheusObserver("mp", 0, host="no-such-host.invalid", metrics=VolleyMetrics(CollectorRegistry()))
    with pytest.raises(ConfigurationError, match="metrics_host"):
        worker.on_start("mp")
