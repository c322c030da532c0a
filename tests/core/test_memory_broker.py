"""The in-memory broker itself: yielding on empty polls, one scheduler thread for delays, a bounded log,
all-or-nothing produce calls with validated options."""

from __future__ import annotations

import asyncio
import threading

from volley import Engine, MemoryBroker
from volley.memory import MemoryConsumer


async def test_an_empty_poll_without_timeout_still_yields_to_the_event_loop() -> None:
    """consume(timeout=0) on an empty queue must await something: a fetch loop polling with
    poll_interval_seconds=0 would otherwise never let another task run."""
    broker = MemoryBroker()
    consumer = MemoryConsumer(broker, "empty")
    await consumer.start()
    ran = asyncio.Event()
    asyncio.get_running_loop().call_soon(ran.set)
    assert await consumer.consume(10, 0) == []
    assert ran.is_set(), "consume(timeout=0) returned without letting the event loop run"


def test_an_engine_polling_with_no_interval_processes_and_stops() -> None:
    """poll_interval_seconds=0: the app still processes its input and the drain check stops it."""
    broker = MemoryBroker()
    queues = {
        "in": {"value": "in", "profile": "memory", "config": {"broker": broker}},
        "out": {"value": "out", "profile": "memory", "config": {"broker": broker}},
    }
    engine = Engine(app_name="zero-poll", input_queue="in", output_queues=["out"], queue_config=queues,
                    metrics_port=None, poll_interval_seconds=0)
    for n in range(5):
        broker.publish("in", engine.input.encode({"n": n}))

    @engine.stream_app
    def forward(message: dict[str, int]) -> list[tuple[str, dict[str, int]]]:
        return [("out", message)]

    outcome: list[object] = []

    def run() -> None:
        outcome.append(forward.run_until_drained(timeout=5, drain_idle_seconds=0.0))

    thread = threading.Thread(target=run, daemon=True)  # a spinning loop would hang the test, not end it
    thread.start()
    thread.join(15)
    assert not thread.is_alive(), "the engine never yielded: run_until_drained(timeout=5) did not return"
    assert len(broker.produced("out")) == 5


async def test_the_memory_consumer_declares_an_instant_exact_drain_check() -> None:
    broker = MemoryBroker()
    consumer = MemoryConsumer(broker, "q")
    await consumer.start()
    assert consumer.instant_drain_check is True
    assert consumer.is_drained_now() is True
    broker.publish("q", b"x")
    assert consumer.is_drained_now() is False
    batch = await consumer.consume(1, 0)
    assert consumer.is_drained_now() is False  # held by this consumer until acked
    await consumer.ack(batch)
    assert consumer.is_drained_now() is True
