"""Fixtures for volley-prometheus tests: a fresh registry per test and a plain HTTP client."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from prometheus_client import CollectorRegistry

from volley_prometheus import PrometheusObserver, VolleyMetrics


@dataclass
class Response:
    status: int
    body: str
    headers: dict[str, str]


def http_get(url: str, headers: dict[str, str] | None = None) -> Response:
    """A real GET: no mocks. Error statuses are returned, not raised."""
    request = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(request, timeout=5) as reply:
            return Response(reply.status, reply.read().decode(), dict(reply.headers.items()))
    except urllib.error.HTTPError as err:
        with err:
            return Response(err.code, err.read().decode(), dict(err.headers.items()))


class FakeClock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def metrics() -> VolleyMetrics:
    return VolleyMetrics(CollectorRegistry())


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def served(metrics: VolleyMetrics, clock: FakeClock) -> Iterator[PrometheusObserver]:
    """An observer for app "svc", started and serving on a free loopback port."""
    observer = PrometheusObserver("svc", 0, host="127.0.0.1", max_silence=30.0, metrics=metrics, clock=clock)
    observer.on_start("svc")
    try:
        yield observer
    finally:
        observer.on_stop("svc")


@pytest.fixture
def get() -> Callable[..., Response]:
    """``get(url, headers=None)``: a real HTTP GET returning status, body and headers."""
    return http_get
