"""An engine on the memory broker for the tests of tests/core: a transactional consumer (ports.Transactional), a
producer that fails deliveries, and a connector that builds the consumers and producers a test passes."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from volley import Engine, MemoryBroker
from volley.memory import MemoryConnector, MemoryConsumer, MemoryProducer
from volley.message import Envelope, OutgoingMessage
from volley.plugins import build_registry
from volley.ports import DeliveryCallback, QueueSpec


@dataclass
class Item:
    n: int


class TxConsumer(MemoryConsumer):
    """A transactional consumer (ports.Transactional): commit acks the batch, abort gives it all back."""

    transactional = True

    def __init__(self, broker: MemoryBroker, queue: str, log: list[Any], commit_delay: float = 0.05) -> None:
        super().__init__(broker, queue)
        self.log, self.held, self.commit_delay = log, list[Envelope](), commit_delay

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        messages = await super().consume(max_messages, timeout)
        self.held.extend(messages)
        return messages

    async def begin(self) -> None:
        self.log.append("begin")

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        self.log.append(("commit-start", len(envelopes)))
        await asyncio.sleep(self.commit_delay)
        await super().ack(envelopes)
        self.held = [e for e in self.held if e not in envelopes]
        self.log.append(("commit-done", len(envelopes)))

    async def abort(self) -> None:
        self.log.append("abort")
        await super().nack(self.held, 0.0)
        self.held = []

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        raise AssertionError("ack() in transactional mode")


class RevocableConsumer(MemoryConsumer):
    """A consumer whose partitions can be taken away (ports.RebalanceAware); the test calls ``revoke``."""

    latest: RevocableConsumer | None = None

    def __init__(self, broker: MemoryBroker, queue: str) -> None:
        super().__init__(broker, queue)
        self.handler: Any = None
        RevocableConsumer.latest = self

    def set_revoke_handler(self, handler: Any) -> None:
        self.handler = handler

    async def revoke(self, partitions: list[tuple[str, int]]) -> None:
        await self.handler(partitions)


class FlakyProducer(MemoryProducer):
    """A memory producer that fails the first ``failures(message)`` deliveries of a message, then delivers it.

    ``how``: "report" reports the failure through the delivery callback (from a thread, as a broker's client
    does); "raise" refuses the whole produce() call, as a producer whose local queue is full does.
    """

    def __init__(self, broker: MemoryBroker, failures: Callable[[OutgoingMessage], int], how: str = "report") -> None:
        super().__init__(broker)
        self.failures = failures
        self.how = how
        self.lock = threading.Lock()
        self.attempts: dict[tuple[str, bytes], list[float]] = {}  # (topic, value) -> monotonic time of each attempt
        self.threads: list[threading.Thread] = []

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        now = time.monotonic()
        failing: list[OutgoingMessage] = []
        passing: list[OutgoingMessage] = []
        with self.lock:
            for m in messages:
                times = self.attempts.setdefault((m.topic, m.value), [])
                times.append(now)
                (failing if len(times) <= self.failures(m) else passing).append(m)
        if failing and self.how == "raise":
            raise BufferError("local queue full")
        if passing:
            super().produce(passing, on_delivery)
        if failing:
            error = RuntimeError("broker unavailable")
            thread = threading.Thread(target=on_delivery, args=((), [(m, error) for m in failing]), daemon=True)
            self.threads.append(thread)
            thread.start()

    async def flush(self, timeout: float) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def times(self, topic: str, value: bytes) -> list[float]:
        with self.lock:
            return list(self.attempts.get((topic, value), []))


class Connector(MemoryConnector):
    def __init__(self, broker: MemoryBroker, consumer: Any = None, producer: Any = None) -> None:
        self.broker, self.consumer, self.producer = broker, consumer, producer

    def create_consumer(self, queue: QueueSpec) -> MemoryConsumer:
        return self.consumer(self.broker, queue.value) if self.consumer else MemoryConsumer(self.broker, queue.value)

    def create_producer(self, queue: QueueSpec) -> MemoryProducer:
        return self.producer(self.broker) if self.producer else MemoryProducer(self.broker)


def make_engine(broker: MemoryBroker, connector: Connector, *, profile: str = "memory", ordering: str = "partition",
                batch_size: int | None = None, dead_letter_queue: str | None = "dlq", **settings: Any) -> Engine:
    registry = build_registry()
    registry.entries["observer"] = {}
    queues = {"in": {"value": "in", "profile": profile, "data_model": Item, "consumer": connector,
                     "ordering": ordering, "config": {"broker": broker}},
              "out": {"value": "out", "profile": "memory", "data_model": Item, "producer": connector,
                      "config": {"broker": broker}},
              "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}}}
    if batch_size:  # a batch handler
        queues["in"]["batch_size"] = batch_size
    options: dict[str, Any] = {"metrics_port": None, "poll_interval_seconds": 0.02, "retry_backoff_seconds": 0.0,
                               "shutdown_timeout_seconds": 1.0, "registry": registry}
    options.update(settings)
    return Engine(app_name="t", input_queue="in", output_queues=["out"], dead_letter_queue=dead_letter_queue,
                  queue_config=queues, **options)


def publish(broker: MemoryBroker, count: int) -> None:
    for n in range(count):
        broker.publish("in", json.dumps({"n": n}).encode())


def outputs(broker: MemoryBroker) -> list[int]:
    return sorted(json.loads(value)["n"] for value in broker.produced("out"))


def wait_for(condition: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Whether ``condition()`` came true within ``timeout`` seconds (checked every 5 ms)."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.005)
    return True
