"""Regression tests for issue 11, bug 12: memory and threads that grow without bound.

A long-running app must not keep one string per failure, one thread per delayed record, or a copy of every
message it ever produced.
"""

from __future__ import annotations

import asyncio
import gc
import threading
import time
import tracemalloc
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from volley import Engine, MemoryBroker
from volley.memory import MemoryConsumer, default_broker, reset_default_broker
from volley.message import OutgoingMessage


@dataclass
class Item:
    n: int


def _wait_for(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.005)


async def _until(condition: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.005)


def test_bug12_run_report_errors_are_bounded() -> None:
    """Bug 12: RunReport.errors grew by one string per failure (750 entries from one poison message given back
    over and over with on_failure="continue"). It must stay bounded (at most 100 entries here)."""
    broker = MemoryBroker()
    queues: dict[str, Any] = {
        "in": {"value": "in", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
    }
    engine = Engine(app_name="t", input_queue="in", queue_config=queues, metrics_port=None,
                    poll_interval_seconds=0.02, on_failure="continue", max_retries=0,
                    redelivery_delay_seconds=0.0, shutdown_timeout_seconds=1.0)
    broker.publish("in", engine.input.encode(Item(1)))

    @engine.stream_app
    async def poison(item: Item) -> bool:
        raise RuntimeError("poison")

    async def main() -> Any:
        task = asyncio.ensure_future(poison.run_async())
        try:
            await _until(lambda: poison.report is not None and poison.report.failed >= 300, 15,
                         "300 failures of the poison message")
        finally:
            poison.stop()
        return await asyncio.wait_for(task, 10)

    report = asyncio.run(main())
    assert report.failed >= 300
    assert len(report.errors) <= 100, f"{len(report.errors)} error strings kept for {report.failed} failures"


@pytest.mark.parametrize("how", ["publish", "nack"])
def test_bug12_delayed_records_do_not_take_a_thread_each(how: str) -> None:
    """Bug 12: the memory broker started one threading.Timer thread per delayed record (1,003 threads at peak for
    1000 delayed records). The thread count must stay bounded, and the records still arrive."""
    broker = MemoryBroker()
    baseline = threading.active_count()
    count = 1000
    if how == "publish":
        broker.publish_many([OutgoingMessage("q", b"%d" % n, delay=1.0) for n in range(count)])
    else:
        broker.publish_many([OutgoingMessage("q", b"%d" % n) for n in range(count)])
        consumer = MemoryConsumer(broker, "q")

        async def nack_each() -> None:
            await consumer.start()
            envelopes = await consumer.consume(count, 0.1)
            assert len(envelopes) == count
            for env in envelopes:  # one nack per message, as an app giving back messages one by one
                await consumer.nack([env], 1.0)

        asyncio.run(nack_each())
    extra = threading.active_count() - baseline
    _wait_for(lambda: broker.depth("q") == count, 20, "every delayed record to be delivered")
    assert extra < 10, f"{extra} extra threads for {count} delayed records"


def test_bug12_the_default_broker_does_not_keep_every_message_forever() -> None:
    """Bug 12: the process-wide default broker (what "memory" queues use unless given a broker) logged every
    message published to it, forever: a long-running app on it grows without bound. Once 200,000 messages
    have been published, consumed and acknowledged, next to nothing of them may remain."""
    reset_default_broker()
    try:
        broker = default_broker()
        value = b"payload"
        gc.collect()
        tracemalloc.start()
        try:
            before = tracemalloc.get_traced_memory()[0]
            for _ in range(20):
                broker.publish_many([OutgoingMessage("q", value) for _ in range(10_000)])
                taken = broker.take("q", 10_000, owner=1)
                broker.ack("q", [env.position for env in taken], owner=1)
                del taken
            gc.collect()
            retained = tracemalloc.get_traced_memory()[0] - before
        finally:
            tracemalloc.stop()
        assert broker.is_idle("q")
        assert retained < 5_000_000, f"{retained / 1e6:.1f} MB retained after 200,000 messages were acked"
    finally:
        reset_default_broker()
