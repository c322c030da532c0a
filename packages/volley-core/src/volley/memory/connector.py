"""The ``memory`` connector: the consumer and producer that serve a ``MemoryBroker``'s queues to the engine."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Mapping, Sequence
from typing import Any

from volley.errors import ConfigurationError, InvalidRecordError
from volley.memory.broker import MemoryBroker, default_broker
from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryCallback, DeliveryFailure, QueueSpec

_consumer_ids = itertools.count(1)

# The least an empty poll waits (unless a message arrives first), even when asked for timeout=0.
MIN_EMPTY_POLL_WAIT = 0.001


_position = operator.attrgetter("position")


class MemoryConsumer:
    """Consumes one memory queue. Unacked messages go back to the queue on close, as after a crash."""

    # is_drained() reads the broker under its lock, and take() hands a message out and marks it held in one step.
    # Kept while the engine still looks for this attribute; is_drained_now() declares the same ability.

    def __init__(self, broker: MemoryBroker, queue: str) -> None:
        self._broker = broker
        self._queue = queue
        self._owner = next(_consumer_ids)  # never reused, unlike id(self)

    async def start(self) -> None:
        self._broker.create_queue(self._queue)

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        """Ready messages at once, without awaiting (the hot path). On an empty queue it always awaits, at least
        ``MIN_EMPTY_POLL_WAIT`` seconds unless a message arrives first: a caller polling with ``timeout=0`` must
        still let the event loop run, and must not spin a core."""
        messages = self._broker.take(self._queue, max_messages, self._owner)
        if not messages:
            await self._broker.wait(self._queue, max(timeout, MIN_EMPTY_POLL_WAIT))
            messages = self._broker.take(self._queue, max_messages, self._owner)
        return messages

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        self._broker.ack(self._queue, map(_position, envelopes), self._owner)

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        self._broker.nack(self._queue, [e.position for e in envelopes], delay, self._owner)

    async def close(self) -> None:
        """Whatever this consumer still holds goes back to the queue, as when a worker dies."""
        self._broker.nack(self._queue, None, 0.0, self._owner)
        self._broker.forget_owner(self._queue, self._owner)

    async def depth(self) -> int:
        return self._broker.depth(self._queue)

    def is_drained(self) -> bool:
        """Nothing ready, nothing waiting for a delayed (re)delivery, nothing held by this consumer."""
        return self._broker.is_drained_for(self._queue, self._owner)

    def is_drained_now(self) -> bool:
        """The same answer as ``is_drained``, declared instant and exact: it reads local state under the broker's
        lock (no I/O), and ``take`` hands a message out and marks it held in one step, so the engine may ask it
        on the event loop as soon as the last ack is through."""
        return self._broker.is_drained_for(self._queue, self._owner)


class MemoryProducer:
    """Publishes to memory queues; delivery is confirmed as soon as the message is stored."""

    def __init__(self, broker: MemoryBroker) -> None:
        self._broker = broker

    async def start(self) -> None:
        return None

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        """Store the call's messages. A record with an invalid partition, delay or key is reported failed with
        ``InvalidRecordError`` (producing it again cannot help) and the others are stored: each record's report
        says exactly what happened to it."""
        try:
            self._broker.publish_many(messages)
        except (TypeError, ValueError):
            delivered: list[OutgoingMessage] = []
            failures: list[DeliveryFailure] = []
            for message in messages:
                try:
                    self._broker.publish_many([message])
                except (TypeError, ValueError) as exc:
                    failures.append((message, InvalidRecordError(str(exc))))
                else:
                    delivered.append(message)
            on_delivery(delivered, failures)
            return
        on_delivery(messages, ())

    async def flush(self, timeout: float) -> None:
        return None

    async def close(self) -> None:
        return None


def broker_from_config(config: Mapping[str, Any]) -> MemoryBroker:
    broker = config.get("broker")
    if broker is None:
        return default_broker()
    if isinstance(broker, MemoryBroker):
        return broker
    raise ConfigurationError(f"memory queue config 'broker' must be a MemoryBroker instance, got {broker!r}")


class MemoryBrowser:
    """Reads a memory queue without taking anything (``volley dlq``); ``settle`` deletes messages for good."""

    removes_each = True

    def __init__(self, broker: MemoryBroker, queue: str) -> None:
        self._broker = broker
        self._queue = queue
        self._after = -1
        self._upto = -1

    async def start(self) -> None:
        self._upto = self._broker.mark()

    async def browse(self, max_messages: int) -> Sequence[Envelope]:
        found = self._broker.browse(self._queue, self._after, self._upto, max_messages)
        if found:
            self._after = found[-1].position
        return found

    async def settle(self, envelopes: Sequence[Envelope]) -> None:
        self._broker.delete(self._queue, [e.position for e in envelopes])

    async def close(self) -> None:
        return None


class MemoryConnector:
    """The ``memory`` connector: queues live in a ``MemoryBroker`` (``config={"broker": ...}`` or the default)."""

    def create_consumer(self, queue: QueueSpec) -> MemoryConsumer:
        return MemoryConsumer(broker_from_config(queue.config), queue.value)

    def create_producer(self, queue: QueueSpec) -> MemoryProducer:
        return MemoryProducer(broker_from_config(queue.config))

    def create_browser(self, queue: QueueSpec) -> MemoryBrowser:
        return MemoryBrowser(broker_from_config(queue.config), queue.value)

    def locate(self, queue: QueueSpec) -> str:
        """The broker object (it lives as long as this process)."""
        return f"memory:{id(broker_from_config(queue.config))}"
