"""End to end: an Engine with metrics_port, on memory queues, serves py-volley's metrics and the probes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

import pytest

from volley import Engine
from volley.memory import MemoryBroker
from volley_prometheus import PrometheusObserver

Get = Callable[..., Any]
N = 300


def make_app(broker: MemoryBroker, app_name: str) -> Engine:
    config = {
        "in": {"value": "e2e.in", "profile": "memory", "config": {"broker": broker}},
        "out": {"value": "e2e.out", "profile": "memory", "config": {"broker": broker}},
        "dlq": {"value": "e2e.dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    return Engine(app_name=app_name, input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                  queue_config=config, metrics_port=0, metrics_settings={"metrics_host": "127.0.0.1"})


async def wait_for(condition: Callable[[], bool], what: str, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.01)


async def test_engine_serves_metrics_and_probes(get: Get) -> None:
    broker = MemoryBroker()
    for i in range(N):
        broker.publish("e2e.in", json.dumps({"i": i}).encode())
    broker.publish("e2e.in", b"not json")
    app = make_app(broker, "prom-e2e")
    observers = [o for o in app.observer.observers if isinstance(o, PrometheusObserver)]
    assert len(observers) == 1, "the prometheus observer is found through the plugin entry point"
    observer = observers[0]

    @app.stream_app
    def handler(message: dict[str, int]) -> list[tuple[str, dict[str, int]]]:
        return [("out", message)]

    task = asyncio.ensure_future(handler.run_async())
    try:
        await wait_for(lambda: observer.port is not None, "the metrics server")
        await wait_for(lambda: len(broker.produced("e2e.out")) == N and len(broker.produced("e2e.dlq")) == 1,
                       "the messages to be processed")
        base = f"http://127.0.0.1:{observer.port}"

        async def metric_lines() -> set[str]:
            reply = await asyncio.to_thread(get, base + "/metrics")
            assert reply.status == 200
            return set(reply.body.splitlines())

        await wait_for(lambda: broker.acked("e2e.in") == N + 1, "acks")
        lines = await metric_lines()
        assert f'messages_consumed_count_total{{status="success",volley_app="prom-e2e"}} {float(N)}' in lines
        assert 'messages_consumed_count_total{status="fail",volley_app="prom-e2e"} 1.0' in lines
        assert (f'messages_produced_count_total{{destination="e2e.out",source="e2e.in",volley_app="prom-e2e"}} '
                f"{float(N)}") in lines
        assert f'process_time_seconds_count{{process_name="cycle",volley_app="prom-e2e"}} {float(N)}' in lines
        assert 'volley_dead_letter_count_total{reason="deserialize",volley_app="prom-e2e"} 1.0' in lines
        # Every output and the dead letter confirmed by the broker (the acks came after their reports).
        assert f'delivery_report_status_total{{status="success",volley_app="prom-e2e"}} {float(N + 1)}' in lines
        assert not [line for line in lines if line.startswith('delivery_report_status_total{status="fail",'
                                                              'volley_app="prom-e2e"}')]
        assert 'volley_ready{volley_app="prom-e2e"} 1.0' in lines

        ready = await asyncio.to_thread(get, base + "/readyz")
        assert ready.status == 200
        health = await asyncio.to_thread(get, base + "/healthz")
        assert health.status == 200
        port = observer.port
    finally:
        handler.stop()
        report = await asyncio.wait_for(task, 30)
    assert report.consumed == N + 1
    assert observer.port is None
    with socket.socket() as probe:
        assert probe.connect_ex(("127.0.0.1", port)) != 0, "the endpoint closes when the app stops"


@pytest.mark.parametrize("use_async", [False, True], ids=["sync", "async"])
def test_a_failed_batch_counts_every_input_it_held_as_failed(use_async: bool) -> None:
    """messages_consumed_count counted a failed batch handler's group as one failure and its other inputs as
    successes: a batch of three, all dead-lettered, read success=2, fail=1 (found by a bug hunt, session 38)."""
    from prometheus_client import CollectorRegistry

    from volley_prometheus import VolleyMetrics

    broker = MemoryBroker()
    metrics = VolleyMetrics(CollectorRegistry())

    def raw(value: str, **settings: Any) -> dict[str, Any]:
        return {"value": value, "profile": "memory", "serializer": "none", "model_handler": "none",
                "config": {"broker": broker}, **settings}

    app = Engine(app_name="batchy", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                 queue_config={"in": raw("b-in", batch_size=3), "out": raw("b-out"),
                               "dlq": raw("b-dlq", profile="memory-dlq")},
                 metrics_port=None, metrics_settings={"prometheus_metrics": metrics}, poll_interval_seconds=0.01,
                 max_retries=0)
    for n in range(3):
        broker.publish("b-in", str(n).encode())

    if use_async:
        async def handler(messages: list[bytes]) -> list[tuple[str, bytes]]:
            raise RuntimeError("boom")
    else:
        def handler(messages: list[bytes]) -> list[tuple[str, bytes]]:  # type: ignore[misc]
            raise RuntimeError("boom")

    report = app.stream_app(handler).run_until_drained(timeout=10)
    assert report.dead_lettered == 3
    sample = metrics.registry.get_sample_value
    assert sample("messages_consumed_count_total", {"volley_app": "batchy", "status": "fail"}) == 3.0
    assert sample("messages_consumed_count_total", {"volley_app": "batchy", "status": "success"}) is None
