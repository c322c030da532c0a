"""A process task that dies (a bug of the engine's own, injected here) during a run or during its shutdown.

Found by a review of the tracer-failure change (each test failed before its fix): shutdown skipped waiting for
in-flight work as soon as the process task had failed, which also cancelled an async handler's call under way on
its lane, though the lanes run on their own and would have finished it; and a process task that died once the
shutdown had begun was neither logged nor raised, and the shutdown sat out the whole deadline for an inbox
nothing drained any more.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

import pytest

from volley import Engine, MemoryBroker
from volley.run import lanes as lanes_module
from volley.run import sync_executor


def raw(broker: MemoryBroker, value: str, **settings: Any) -> dict[str, Any]:
    return {"value": value, "profile": "memory", "serializer": "none", "model_handler": "none",
            "config": {"broker": broker}, **settings}


def make_engine(broker: MemoryBroker, **settings: Any) -> Engine:
    queues = {"in": raw(broker, "in"), "out": raw(broker, "out"), "dlq": raw(broker, "dlq", profile="memory-dlq")}
    return Engine(app_name="crashy", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                  queue_config=queues, metrics_port=None, poll_interval_seconds=0.01, consume_batch_size=1,
                  **settings)


def test_an_async_call_under_way_finishes_within_the_deadline_when_the_process_task_dies(
        monkeypatch: pytest.MonkeyPatch) -> None:
    broker = MemoryBroker()
    for n in range(3):
        broker.publish("in", b"m%d" % n)
    original = lanes_module.AsyncLanes.run
    batches = 0
    started = asyncio.Event()

    async def run(self: Any, batch: Any) -> None:
        nonlocal batches
        batches += 1
        if batches == 2:
            await started.wait()  # message 0's call is under way on its lane
            raise RuntimeError("bug in the process loop")
        await original(self, batch)

    monkeypatch.setattr(lanes_module.AsyncLanes, "run", run)
    finished: list[bytes] = []

    async def handler(message: bytes) -> list[tuple[str, bytes]]:
        started.set()
        await asyncio.sleep(0.3)
        finished.append(message)
        return [("out", message)]

    app = make_engine(broker, shutdown_timeout_seconds=10).stream_app(handler)
    with pytest.raises(RuntimeError, match="bug in the process loop"):
        asyncio.run(app.run_async())
    report = app.last_report
    assert finished == [b"m0"]
    assert report is not None and report.acked == 1, report
    assert report.elapsed_seconds < 5, report  # not the whole deadline


def test_a_process_task_dying_during_shutdown_is_raised_and_does_not_hold_the_shutdown(
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    broker = MemoryBroker()
    for n in range(5):
        broker.publish("in", b"m%d" % n)
    original = sync_executor.SyncExecutor.run

    async def run(self: Any, batch: Any) -> None:
        if self.stop.is_stopping:
            raise RuntimeError("bug in the process loop")
        await original(self, batch)

    monkeypatch.setattr(sync_executor.SyncExecutor, "run", run)
    holder: dict[str, Any] = {}

    def handler(message: bytes) -> list[tuple[str, bytes]]:
        if message == b"m0":
            holder["app"].stop()
        return [("out", message)]

    app = make_engine(broker, shutdown_timeout_seconds=20, sync_handler_mode="thread").stream_app(handler)
    holder["app"] = app
    began = time.monotonic()
    with caplog.at_level(logging.ERROR, logger="volley"), \
            pytest.raises(RuntimeError, match="bug in the process loop"):
        asyncio.run(app.run_async())
    assert time.monotonic() - began < 10  # not the 20 s deadline
    assert "bug in the process loop" in caplog.text
    report = app.last_report
    assert report is not None and report.acked == 1, report
