"""The contract's frame: capability flags, timings, what a subclass provides, and the plumbing its tests share."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Hashable, Iterable, Sequence
from typing import Any, ClassVar

import pytest

from volley.message import Envelope, Headers, OutgoingMessage
from volley.ports import Connector, Consumer, Producer, QueueSpec
from volley.testing.contract.checks import assert_in_order, value_for
from volley.testing.contract.draining import bounded, deadline_in, drain, drain_until
from volley.testing.contract.recorder import DeliveryRecorder

__all__ = ["ContractBase"]


class ContractBase:
    """What the contract's tests stand on; :class:`volley.testing.contract.ConnectorContract` documents it."""

    # ------------------------------------------------------------------ capabilities
    partitions: ClassVar[int] = 1
    """Partitions of each queue ``create_queue`` makes (1 for brokers without partitions)."""
    ordering: ClassVar[str] = "partition"
    """First deliveries keep production order within each "partition" (``Envelope.partition``; None = the whole
    queue), within each "key", or "none"."""
    redelivery_keeps_order: ClassVar[bool] = True
    """Redelivered messages (after a nack or a reconnect) come back in production order within their unit."""
    supports_keys: ClassVar[bool] = True
    """``OutgoingMessage.key`` arrives as ``Envelope.key``; with "partition" ordering, one key -> one partition."""
    supports_headers: ClassVar[bool] = True
    """``OutgoingMessage.headers`` arrive unchanged as ``Envelope.headers`` (none in -> none out)."""
    supports_partitions: ClassVar[bool] = False
    """``OutgoingMessage.partition`` is honoured, and an out-of-range partition is reported as a failure."""
    supports_delay: ClassVar[bool] = False
    """``OutgoingMessage.delay`` holds a message back for that many seconds."""
    supports_nack_delay: ClassVar[bool] = False
    """``nack(envelopes, delay)`` holds the messages back for ``delay`` seconds (needs in-session redelivery)."""
    redelivers_nacked_in_session: ClassVar[bool] = True
    """A nacked message comes back to the same live consumer. False (Kafka): nack only keeps the position from
    being committed, and the message comes back after the consumer is closed and a new one starts."""
    acks_individually: ClassVar[bool] = True
    """An acked message is never delivered again. False (Kafka): only the contiguous acked prefix of each
    partition is committed, so acked messages after an unacked one may come back after a reconnect."""
    counts_attempts: ClassVar[bool] = False
    """``Envelope.attempt`` is exact: 1 on first delivery, one more on each redelivery (otherwise just >= 1)."""
    creates_queues_on_produce: ClassVar[bool] = True
    """Producing to a never-seen queue creates it; False: it must fail clearly (raise or report a failure)."""

    # ------------------------------------------------------------------ timings and sizes
    max_wait_seconds: ClassVar[float] = 10.0
    """How long a produced (or redelivered) message may take to appear at a consumer."""
    empty_poll_timeout: ClassVar[float] = 0.5
    """The ``timeout`` passed to ``consume`` where the queue is expected to stay empty."""
    timing_slack_seconds: ClassVar[float] = 1.0
    """How far past a requested timeout a call may return and still count as honouring it."""
    loop_block_tolerance_seconds: ClassVar[float] = 0.25
    """The longest the event loop may be blocked while ``consume`` waits (it must not block it)."""
    delay_seconds: ClassVar[float] = 1.0
    """The delay used by the delay tests."""
    message_count: ClassVar[int] = 30
    """Messages in the ordinary tests."""
    large_batch_size: ClassVar[int] = 2000
    """Messages in the large-batch test."""

    @classmethod
    def capabilities(cls) -> dict[str, Any]:
        """The flags :func:`volley.testing.statemachine.connector_state_machine` takes, as keyword arguments."""
        return {
            "ordering": cls.ordering,
            "supports_keys": cls.supports_keys,
            "supports_headers": cls.supports_headers,
            "redelivers_nacked_in_session": cls.redelivers_nacked_in_session,
            "acks_individually": cls.acks_individually,
            "counts_attempts": cls.counts_attempts,
            "max_wait_seconds": cls.max_wait_seconds,
        }

    # ------------------------------------------------------------------ to provide

    def make_connector(self) -> Connector:
        raise NotImplementedError(f"{type(self).__name__} must define make_connector(self) -> Connector")

    def queue_spec(self, name: str, role: str) -> QueueSpec:
        raise NotImplementedError(f"{type(self).__name__} must define queue_spec(self, name, role) -> QueueSpec")

    async def create_queue(self, name: str) -> None:
        """Make queue ``name`` exist with ``partitions`` partitions. Default: nothing (created on first use)."""

    # ------------------------------------------------------------------ plumbing

    @pytest.fixture(autouse=True)
    async def _contract_resources(self) -> AsyncIterator[None]:
        """Per-test state; closes whatever a test left open, even when it failed."""
        self.contract_setup()
        yield
        await self.contract_teardown()

    def contract_setup(self) -> None:
        """Reset the per-test state (the autouse fixture calls it; call it yourself to run a test by hand)."""
        self._open: list[Consumer | Producer] = []
        self._specs: dict[tuple[str, str], QueueSpec] = {}
        self._connector: Connector | None = None

    async def contract_teardown(self) -> None:
        """Close every consumer and producer the test left open; raise the first error closing them gave."""
        errors: list[BaseException] = []
        for resource in reversed(self._open):
            try:
                await bounded(resource.close(), self.max_wait_seconds, f"{type(resource).__name__}.close()")
            except Exception as exc:
                errors.append(exc)
        self._open.clear()
        if errors:
            raise errors[0]

    @property
    def connector(self) -> Connector:
        if self._connector is None:
            self._connector = self.make_connector()
        return self._connector

    def fresh_name(self, label: str) -> str:
        """A unique queue name (letters, digits and hyphens: valid for Kafka topics and RSMQ queues)."""
        return f"contract-{label}-{uuid.uuid4().hex[:12]}"

    async def fresh_queue(self, label: str) -> str:
        """A unique queue name, created through ``create_queue``."""
        name = self.fresh_name(label)
        await self.create_queue(name)
        return name

    def spec(self, name: str, role: str = "input") -> QueueSpec:
        """``queue_spec(name, role)``, built once per test and reused."""
        key = (name, role)
        if key not in self._specs:
            self._specs[key] = self.queue_spec(name, role)
        return self._specs[key]

    def deadline(self, seconds: float | None = None) -> float:
        return deadline_in(self.max_wait_seconds if seconds is None else seconds)

    async def open_consumer(self, name: str) -> Consumer:
        consumer = self.connector.create_consumer(self.spec(name, "input"))
        self._open.append(consumer)
        await bounded(consumer.start(), self.max_wait_seconds, "Consumer.start()")
        return consumer

    async def open_producer(self, name: str) -> Producer:
        producer = self.connector.create_producer(self.spec(name, "output"))
        self._open.append(producer)
        await bounded(producer.start(), self.max_wait_seconds, "Producer.start()")
        return producer

    async def close(self, resource: Consumer | Producer) -> None:
        if resource in self._open:
            self._open.remove(resource)
        await bounded(resource.close(), self.max_wait_seconds, f"{type(resource).__name__}.close()")

    async def reconnect(self, consumer: Consumer, name: str) -> Consumer:
        """Close ``consumer`` (as a worker that stops or crashes cleanly) and start a new one on ``name``."""
        await self.close(consumer)
        return await self.open_consumer(name)

    def outgoing(
        self,
        name: str,
        index: int,
        *,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        delay: float | None = None,
        tag: str = "msg",
    ) -> OutgoingMessage:
        """Record ``index`` for queue ``name``, valued :func:`value_for` and with the value as token."""
        value = value_for(index, tag)
        return OutgoingMessage(name, value, key, headers, partition, delay, token=value)

    async def produce_confirmed(self, producer: Producer, messages: Sequence[OutgoingMessage]) -> DeliveryRecorder:
        """Produce, flush, and assert that every record was reported delivered exactly once."""
        recorder = DeliveryRecorder()
        producer.produce(messages, recorder)
        await bounded(producer.flush(self.max_wait_seconds), self.max_wait_seconds + self.timing_slack_seconds,
                       "Producer.flush()")
        recorder.assert_all_delivered(messages)
        return recorder

    async def drain(
        self, consumer: Consumer, expected: int, *, seconds: float | None = None, ack: bool = False,
        max_messages: int = 100,
    ) -> list[Envelope]:
        return await drain(consumer, expected, self.deadline(seconds), max_messages=max_messages, ack=ack)

    def sentinels(self, name: str) -> list[OutgoingMessage]:
        """Markers produced after the interesting messages: one per partition where partitions can be chosen."""
        tag = f"sentinel{uuid.uuid4().hex[:8]}"
        if self.supports_partitions and self.partitions > 1:
            return [self.outgoing(name, p, partition=p, tag=tag) for p in range(self.partitions)]
        return [self.outgoing(name, 0, tag=tag)]

    async def drain_past_sentinels(
        self, consumer: Consumer, producer: Producer, name: str, required: Iterable[bytes] = ()
    ) -> tuple[list[Envelope], list[bytes]]:
        """Produce sentinels, then consume until they and every ``required`` value arrived (or time is up).

        Proves that the consumer is live and past the point where stale
        messages would show up, without sleeping. Returns everything received
        and the sentinel values.
        """
        sentinels = self.sentinels(name)
        await self.produce_confirmed(producer, sentinels)
        sentinel_values = [m.value for m in sentinels]
        wanted = set(required) | set(sentinel_values)
        received = await drain_until(
            consumer, lambda got: wanted <= {e.value for e in got}, self.deadline()
        )
        return received, sentinel_values

    def unit_of(self, envelope: Envelope) -> Hashable | None:
        """The ordering unit this connector promises order within, or None when there is none."""
        if self.ordering == "partition":
            return ("partition", envelope.partition)
        if self.ordering == "key" and envelope.key is not None:
            return ("key", envelope.key)
        return None

    def check_order(self, received: Sequence[Envelope], *, redelivered: bool = False) -> None:
        if self.ordering == "none" or (redelivered and not self.redelivery_keeps_order):
            return
        assert_in_order(received, self.unit_of)

    def _one_unit_key(self) -> bytes | None:
        """A key that keeps messages in one ordering unit (where keys exist)."""
        return b"one-unit" if self.supports_keys else None
