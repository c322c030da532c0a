"""End to end: an Engine with metrics_port, on memory queues, serves py-volley's metrics and the probes."""

from __future__ import annotations

import asyncio
import json
import socket
import time
from collections.abc import Callable
from typing import Any

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
