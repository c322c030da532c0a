"""The connector contract: what every Consumer/Producer pair must do, as a pytest base class.

Every connector (the memory broker, Kafka, RSMQ, third-party plugins) runs the
same tests by subclassing :class:`ConnectorContract` in a ``TestXxx`` class and
saying what its broker can do through capability flags. The engine's
guarantees (at-least-once, order, nothing lost, nothing acked twice) rest on
exactly these behaviours, so a connector that passes here can be trusted by
the engine.

The helpers (:class:`DeliveryRecorder`, :func:`drain`, :func:`drain_until`,
:func:`assert_exactly_once`, :func:`assert_in_order`) are public so that
adapters can write their own broker-specific tests in the same style.
Needs ``pytest`` and ``pytest-asyncio`` (``asyncio_mode = "auto"``).
"""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import AsyncIterator, Awaitable, Callable, Hashable, Iterable, Sequence
from typing import Any, ClassVar, TypeVar

import pytest

from volley.message import Envelope, Headers, OutgoingMessage
from volley.ports import Connector, Consumer, DeliveryFailure, Producer, QueueSpec

__all__ = [
    "ConnectorContract",
    "DeliveryRecorder",
    "assert_exactly_once",
    "assert_in_order",
    "deadline_in",
    "drain",
    "drain_until",
    "index_of",
    "value_for",
]

T = TypeVar("T")

HANG_SLACK_SECONDS = 5.0
"""How far past its own ``timeout`` a ``consume`` call may run before the helpers call it a hang."""


# ---------------------------------------------------------------------------------------------- helpers


def deadline_in(seconds: float) -> float:
    """An absolute deadline on the ``time.monotonic()`` clock, as :func:`drain` takes it."""
    return time.monotonic() + seconds


def value_for(index: int, tag: str = "msg") -> bytes:
    """The value the contract gives message ``index``: readable in failure output, and sortable."""
    return f"{tag}-{index:06d}".encode()


def index_of(message: Envelope | OutgoingMessage | bytes) -> int:
    """The index :func:`value_for` encoded in a value (or in an envelope's or record's value)."""
    value = message if isinstance(message, bytes) else message.value
    return int(value.rsplit(b"-", 1)[1])


class DeliveryRecorder:
    """A thread-safe ``on_delivery`` callback that keeps every report for assertions.

    Producers may report from any thread (librdkafka's delivery thread, a
    redis client's thread), so everything is guarded by a lock; waiting is a
    poll on the event loop with a deadline, which never blocks a producer that
    reports through the loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delivered: list[OutgoingMessage] = []
        self._failed: list[DeliveryFailure] = []
        self._calls = 0
        self._threads: set[int] = set()

    def __call__(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        with self._lock:
            self._delivered.extend(delivered)
            self._failed.extend(failed)
            self._calls += 1
            self._threads.add(threading.get_ident())

    @property
    def delivered(self) -> list[OutgoingMessage]:
        with self._lock:
            return list(self._delivered)

    @property
    def failed(self) -> list[DeliveryFailure]:
        with self._lock:
            return list(self._failed)

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def threads(self) -> set[int]:
        """Identities of the threads that reported (for information: any thread is allowed)."""
        with self._lock:
            return set(self._threads)

    def reported(self) -> int:
        """How many records were reported so far, delivered or failed."""
        with self._lock:
            return len(self._delivered) + len(self._failed)

    def delivered_tokens(self) -> list[Any]:
        return [m.token for m in self.delivered]

    def failed_tokens(self) -> list[Any]:
        return [m.token for m, _ in self.failed]

    async def wait_for(self, count: int, deadline: float) -> bool:
        """Wait until at least ``count`` records were reported; False if ``deadline`` passed first."""
        while self.reported() < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def assert_all_delivered(self, messages: Sequence[OutgoingMessage]) -> None:
        """Every record was reported delivered exactly once (by token), none failed, nothing else reported."""
        failed = self.failed
        assert not failed, f"{len(failed)} record(s) reported as failed, first: {failed[0]!r}"
        expected = Counter(m.token for m in messages)
        got = Counter(self.delivered_tokens())
        missing = sorted((t for t in expected if got[t] < expected[t]), key=repr)
        extra = sorted((t for t in got if got[t] > expected[t]), key=repr)
        summary = (
            f"delivery reports must name every record exactly once (by its token): "
            f"{len(missing)} never or too rarely reported (first: {missing[:5]}), "
            f"{len(extra)} reported too often or unknown (first: {extra[:5]})"
        )
        assert not missing, summary
        assert not extra, summary


async def _bounded(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """Await with a hard limit, so that a hanging connector fails the test instead of hanging it."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"{what} did not return within {seconds:.1f} s") from None


async def drain_until(
    consumer: Consumer,
    done: Callable[[Sequence[Envelope]], bool],
    deadline: float,
    *,
    max_messages: int = 100,
    poll_timeout: float = 0.25,
    ack: bool = False,
) -> list[Envelope]:
    """Consume until ``done(received)`` holds or ``deadline`` (``time.monotonic()``) passes; return what came.

    Never fails on its own for missing messages (the caller asserts what it
    expected, with a better message), but it does fail when ``consume``
    returns more than ``max_messages`` or hangs far past its timeout.
    ``ack=True`` acknowledges each batch as it arrives.
    """
    received: list[Envelope] = []
    while not done(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        timeout = min(poll_timeout, remaining)
        batch = await _bounded(
            consumer.consume(max_messages, timeout),
            timeout + HANG_SLACK_SECONDS,
            f"consume(max_messages={max_messages}, timeout={timeout:.2f})",
        )
        assert len(batch) <= max_messages, f"consume(max_messages={max_messages}) returned {len(batch)} envelopes"
        if batch:
            received.extend(batch)
            if ack:
                await consumer.ack(batch)
    return received


async def drain(
    consumer: Consumer,
    expected: int,
    deadline: float,
    *,
    max_messages: int = 100,
    poll_timeout: float = 0.25,
    ack: bool = False,
) -> list[Envelope]:
    """Consume until ``expected`` envelopes arrived or ``deadline`` (``time.monotonic()``) passed."""
    return await drain_until(
        consumer, lambda got: len(got) >= expected, deadline, max_messages=max_messages,
        poll_timeout=poll_timeout, ack=ack,
    )


def _short(values: Iterable[bytes], limit: int = 5) -> str:
    items = sorted(values)
    text = ", ".join(repr(v[:40]) for v in items[:limit])
    return f"[{text}{', ...' if len(items) > limit else ''}]"


def assert_exactly_once(
    received: Sequence[Envelope], expected: Iterable[bytes], *, optional: Iterable[bytes] = ()
) -> None:
    """Every expected value arrived exactly once and nothing else did (``optional`` values: at most once)."""
    expected_counts = Counter(expected)
    assert all(n == 1 for n in expected_counts.values()), "the test itself produced duplicate values"
    allowed = set(expected_counts) | set(optional)
    counts = Counter(e.value for e in received)
    missing = [v for v in expected_counts if counts[v] == 0]
    duplicated = [v for v, n in counts.items() if n > 1]
    unexpected = [v for v in counts if v not in allowed]
    problems = []
    if missing:
        problems.append(f"{len(missing)} of {len(expected_counts)} never arrived {_short(missing)}")
    if duplicated:
        problems.append(f"{len(duplicated)} arrived more than once {_short(duplicated)}")
    if unexpected:
        problems.append(f"{len(unexpected)} should not have arrived {_short(unexpected)}")
    assert not problems, "; ".join(problems) + f" (received {len(received)} envelopes)"


def assert_in_order(received: Sequence[Envelope], unit: Callable[[Envelope], Hashable | None]) -> None:
    """Within each ordering unit (``unit(envelope)``; None = unordered), indices strictly increase."""
    last: dict[Hashable, Envelope] = {}
    for envelope in received:
        group = unit(envelope)
        if group is None:
            continue
        before = last.get(group)
        assert before is None or index_of(before) < index_of(envelope), (
            f"order broken within {group!r}: {envelope.value!r} arrived after {before.value!r}"
        )
        last[group] = envelope


def _group_by_partition(received: Sequence[Envelope]) -> dict[int | None, list[Envelope]]:
    groups: dict[int | None, list[Envelope]] = defaultdict(list)
    for envelope in received:
        groups[envelope.partition].append(envelope)
    return groups


# ---------------------------------------------------------------------------------------------- the suite


class ConnectorContract:
    """The behaviour every Consumer/Producer pair must show. Subclass it as ``class TestMyBroker(ConnectorContract)``.

    This class is not collected itself (its name has no ``Test`` prefix); every
    ``test_*`` method runs in each subclass. Tests are ``async`` and need
    pytest-asyncio in auto mode. Every test creates fresh queues with unique
    names, so a real broker that keeps state between tests is fine.

    A subclass must provide:

    ``make_connector(self) -> Connector``
        A connector object (what the plugin registers). Called once per test.
    ``queue_spec(self, name: str, role: str) -> QueueSpec``
        The spec of broker queue/topic ``name`` (already unique: use it as
        ``value``) for ``role`` "input" (consumers) or "output" (producers),
        with every setting the connector needs in ``config``. Called once per
        (name, role) per test; the suite reuses the result, so a consumer
        opened again after a close gets the same spec. Kafka: put a consumer
        group id that is unique per call (e.g. ``f"{name}-group"``) and
        ``auto.offset.reset=earliest`` into input specs, plus the bootstrap
        servers; RSMQ: host/port and a visibility timeout longer than a test,
        but short enough for ``max_wait_seconds`` when redelivery after a
        close relies on it.

    and may override:

    ``async create_queue(self, name: str) -> None``
        Create a fresh queue with ``partitions`` partitions before use (Kafka:
        create the topic with an admin client; RSMQ: create the queue).
        Default: nothing (the broker creates queues on first use). Not called
        for the "never seen queue" test.
    Capability flags and timings (class attributes, below).

    Per-test state (a broker address from a fixture, a fresh in-memory
    broker) goes into ``setup_method`` or an autouse fixture of the subclass::

        @pytest.fixture(autouse=True)
        def _bootstrap(self, kafka_bootstrap: str) -> None:
            self.bootstrap = kafka_bootstrap

    A test that cannot apply can be overridden in the subclass and marked
    ``skip`` or ``xfail(strict=True)`` with the reason.
    """

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
                await _bounded(resource.close(), self.max_wait_seconds, f"{type(resource).__name__}.close()")
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
        await _bounded(consumer.start(), self.max_wait_seconds, "Consumer.start()")
        return consumer

    async def open_producer(self, name: str) -> Producer:
        producer = self.connector.create_producer(self.spec(name, "output"))
        self._open.append(producer)
        await _bounded(producer.start(), self.max_wait_seconds, "Producer.start()")
        return producer

    async def close(self, resource: Consumer | Producer) -> None:
        if resource in self._open:
            self._open.remove(resource)
        await _bounded(resource.close(), self.max_wait_seconds, f"{type(resource).__name__}.close()")

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
        await _bounded(producer.flush(self.max_wait_seconds), self.max_wait_seconds + self.timing_slack_seconds,
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

    # ------------------------------------------------------------------ lifecycle

    async def test_start_and_close_without_traffic(self) -> None:
        name = await self.fresh_queue("lifecycle")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        await consumer.ack([])
        await consumer.nack([], 0.0)
        started = time.monotonic()
        await _bounded(producer.flush(self.max_wait_seconds), self.timing_slack_seconds,
                       "flush() with nothing pending")
        assert time.monotonic() - started <= self.timing_slack_seconds
        await self.close(consumer)
        await self.close(producer)
        # A second close must be harmless: shutdown paths after errors may close twice.
        await _bounded(consumer.close(), self.max_wait_seconds, "a second Consumer.close()")
        await _bounded(producer.close(), self.max_wait_seconds, "a second Producer.close()")
        # The queue is still usable by a new pair.
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, 0)]
        await self.produce_confirmed(producer, messages)
        assert_exactly_once(await self.drain(consumer, 1, ack=True), [messages[0].value])

    async def test_producer_close_reports_every_record(self) -> None:
        name = await self.fresh_queue("closeflush")
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i) for i in range(self.message_count)]
        recorder = DeliveryRecorder()
        producer.produce(messages, recorder)
        await self.close(producer)
        recorder.assert_all_delivered(messages)
        consumer = await self.open_consumer(name)
        assert_exactly_once(await self.drain(consumer, len(messages), ack=True), [m.value for m in messages])

    # ------------------------------------------------------------------ produce / consume

    async def test_produce_and_consume_exactly_once(self) -> None:
        name = await self.fresh_queue("basic")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i) for i in range(self.message_count)]
        await self.produce_confirmed(producer, messages)
        received = await self.drain(consumer, len(messages), ack=True)
        assert_exactly_once(received, [m.value for m in messages])
        for envelope in received:
            assert envelope.source == name, f"Envelope.source must be the queue's broker name {name!r}: {envelope!r}"
            assert envelope.attempt == 1, f"a first delivery has attempt 1: {envelope!r}"
            assert envelope.position is not None, f"Envelope.position must identify the message: {envelope!r}"
            if self.partitions > 1:
                assert envelope.partition in range(self.partitions), f"partition out of range: {envelope!r}"
        places = Counter((e.partition, e.position) for e in received)
        assert max(places.values()) == 1, "two messages share a (partition, position)"
        extra = await _bounded(consumer.consume(100, self.empty_poll_timeout),
                               self.empty_poll_timeout + HANG_SLACK_SECONDS, "consume() on a drained queue")
        assert not extra, f"nothing was left to consume, got {extra!r}"

    async def test_binary_and_empty_values_survive(self) -> None:
        name = await self.fresh_queue("binary")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        values = [b"", bytes(range(256)), "héllo ✓ 你好".encode(), b"\x00" * 17, b'{"a": 1}\n', bytes(range(256)) * 128]
        messages = [OutgoingMessage(name, v, token=i) for i, v in enumerate(values)]
        await self.produce_confirmed(producer, messages)
        received = await self.drain(consumer, len(values), ack=True)
        assert sorted(e.value for e in received) == sorted(values), "values must arrive byte for byte"

    async def test_delivery_reports_arrive_without_flush(self) -> None:
        name = await self.fresh_queue("reports")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i) for i in range(self.message_count)]
        recorder = DeliveryRecorder()
        for start in range(0, len(messages), 7):
            producer.produce(messages[start:start + 7], recorder)
        reported = await recorder.wait_for(len(messages), self.deadline())
        assert reported, (
            f"only {recorder.reported()} of {len(messages)} records reported within {self.max_wait_seconds} s "
            "without flush(): a producer must report on its own (the engine does not flush to make progress)"
        )
        recorder.assert_all_delivered(messages)
        assert_exactly_once(await self.drain(consumer, len(messages), ack=True), [m.value for m in messages])
        recorder.assert_all_delivered(messages)  # and no late duplicate reports

    async def test_flush_returns_once_all_are_reported(self) -> None:
        name = await self.fresh_queue("flush")
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i) for i in range(self.message_count)]
        recorder = DeliveryRecorder()
        producer.produce(messages[: len(messages) // 2], recorder)
        producer.produce(messages[len(messages) // 2 :], recorder)
        await _bounded(producer.flush(self.max_wait_seconds), self.max_wait_seconds + self.timing_slack_seconds,
                       "Producer.flush()")
        assert recorder.reported() == len(messages), (
            f"flush() returned with {recorder.reported()} of {len(messages)} records reported"
        )
        recorder.assert_all_delivered(messages)

    async def test_keys_survive(self) -> None:
        if not self.supports_keys:
            pytest.skip("connector has no message keys")
        name = await self.fresh_queue("keys")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        keys: list[bytes | None] = [None, b"k1", b"\x00\xff\x10bin", "ключ".encode(), b"k1"]
        messages = [self.outgoing(name, i, key=keys[i % len(keys)]) for i in range(15)]
        await self.produce_confirmed(producer, messages)
        received = await self.drain(consumer, len(messages), ack=True)
        assert_exactly_once(received, [m.value for m in messages])
        for envelope in received:
            sent = messages[index_of(envelope)]
            assert envelope.key == sent.key, f"key {sent.key!r} arrived as {envelope.key!r}"

    async def test_headers_survive(self) -> None:
        if not self.supports_headers:
            pytest.skip("connector has no message headers")
        name = await self.fresh_queue("headers")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        variants: list[Headers | None] = [
            None,
            {"a": b"1"},
            {"trace-id": bytes(range(256)), "content-type": b"application/json"},
            {"ünïcode-näme": "wert ✓".encode()},
        ]
        messages = [self.outgoing(name, i, headers=variants[i % len(variants)]) for i in range(12)]
        await self.produce_confirmed(producer, messages)
        received = await self.drain(consumer, len(messages), ack=True)
        assert_exactly_once(received, [m.value for m in messages])
        for envelope in received:
            sent = messages[index_of(envelope)]
            got = dict(envelope.headers or {})
            assert got == (sent.headers or {}), f"headers {sent.headers!r} arrived as {envelope.headers!r}"

    async def test_order_is_kept_within_each_unit(self) -> None:
        if self.ordering == "none":
            pytest.skip("connector promises no order")
        name = await self.fresh_queue("order")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        count = self.message_count * 3
        keys = [f"key-{i % 6}".encode() if self.supports_keys else None for i in range(count)]
        messages = [self.outgoing(name, i, key=keys[i]) for i in range(count)]
        for start in range(0, count, 30):
            producer.produce(messages[start:start + 30], DeliveryRecorder())
        await _bounded(producer.flush(self.max_wait_seconds), self.max_wait_seconds + self.timing_slack_seconds,
                       "Producer.flush()")
        received = await self.drain(consumer, count, ack=True, max_messages=7)
        assert_exactly_once(received, [m.value for m in messages])
        self.check_order(received)
        if self.ordering == "partition" and self.supports_keys and self.partitions > 1:
            partitions_of_key: dict[bytes | None, set[int | None]] = defaultdict(set)
            for envelope in received:
                partitions_of_key[envelope.key].add(envelope.partition)
            split = {k: p for k, p in partitions_of_key.items() if len(p) > 1}
            assert not split, f"one key must always land in one partition: {split}"

    async def test_explicit_partition_is_honoured(self) -> None:
        if not self.supports_partitions:
            pytest.skip("connector does not let producers choose partitions")
        name = await self.fresh_queue("partition")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i, partition=i % self.partitions) for i in range(5 * self.partitions)]
        await self.produce_confirmed(producer, messages)
        received = await self.drain(consumer, len(messages), ack=True)
        assert_exactly_once(received, [m.value for m in messages])
        for envelope in received:
            wanted = messages[index_of(envelope)].partition
            assert envelope.partition == wanted, f"sent to partition {wanted}, arrived from {envelope!r}"
        assert_in_order(received, lambda e: e.partition)

    async def test_invalid_partition_is_reported_not_stored(self) -> None:
        """A record the broker cannot take is reported failed; reports never disagree with what consumers see."""
        if not self.supports_partitions:
            pytest.skip("connector does not let producers choose partitions")
        name = await self.fresh_queue("badpartition")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        good_before = self.outgoing(name, 0)
        bad = self.outgoing(name, 1, partition=self.partitions + 7)
        good_after = self.outgoing(name, 2)
        recorder = DeliveryRecorder()
        producer.produce([good_before, bad, good_after], recorder)
        assert await recorder.wait_for(3, self.deadline()), f"only {recorder.reported()} of 3 records were reported"
        assert bad.token in recorder.failed_tokens(), "a record for a partition that does not exist must fail"
        assert all(isinstance(exc, BaseException) for _, exc in recorder.failed)
        counts = Counter(recorder.delivered_tokens() + recorder.failed_tokens())
        assert counts == Counter([good_before.token, bad.token, good_after.token]), f"reports: {counts}"
        delivered = set(recorder.delivered_tokens())
        received, sentinels = await self.drain_past_sentinels(consumer, producer, name, delivered)
        assert_exactly_once(received, [*delivered, *sentinels])

    async def test_consume_honours_max_messages(self) -> None:
        name = await self.fresh_queue("maxmessages")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i) for i in range(10)]
        await self.produce_confirmed(producer, messages)
        first = await self.drain(consumer, 1, max_messages=1, ack=True)  # drain asserts len(batch) <= max_messages
        assert len(first) == 1, f"consume(max_messages=1) gave {len(first)} envelopes"
        rest = await self.drain(consumer, 9, max_messages=3, ack=True)
        assert_exactly_once(first + rest, [m.value for m in messages])

    async def test_consume_on_empty_queue_returns_within_timeout(self) -> None:
        name = await self.fresh_queue("empty")
        consumer = await self.open_consumer(name)
        ticks: list[float] = []

        async def ticker() -> None:
            while True:
                ticks.append(time.monotonic())
                await asyncio.sleep(0.01)

        timeout = self.empty_poll_timeout
        ticking = asyncio.create_task(ticker())
        try:
            for _ in range(2):
                started = time.monotonic()
                batch = await _bounded(consumer.consume(10, timeout), timeout + HANG_SLACK_SECONDS,
                                       f"consume(timeout={timeout}) on an empty queue")
                elapsed = time.monotonic() - started
                assert list(batch) == [], f"an empty queue gave {batch!r}"
                assert elapsed <= timeout + self.timing_slack_seconds, (
                    f"consume(timeout={timeout}) on an empty queue took {elapsed:.2f} s"
                )
        finally:
            ticking.cancel()
        gaps = [b - a for a, b in itertools.pairwise(ticks)]
        assert gaps, "the event loop never ran while consume() waited"
        assert max(gaps) <= self.loop_block_tolerance_seconds, (
            f"consume() blocked the event loop for {max(gaps):.2f} s: it must await, not block"
        )

    async def test_waiting_consume_wakes_up_for_a_new_message(self) -> None:
        name = await self.fresh_queue("wakeup")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        long_timeout = 3 * self.max_wait_seconds

        async def first_batch() -> Sequence[Envelope]:
            while True:
                batch = await consumer.consume(100, long_timeout)
                if batch:
                    return batch

        waiting = asyncio.create_task(first_batch())
        try:
            await asyncio.sleep(0.1)  # let the consumer settle into its wait; the assertion does not depend on it
            message = self.outgoing(name, 0)
            await self.produce_confirmed(producer, [message])
            batch = await _bounded(waiting, self.max_wait_seconds,
                                   f"consume(timeout={long_timeout}) after a message arrived")
        finally:
            waiting.cancel()
        assert [e.value for e in batch] == [message.value]
        await consumer.ack(batch)

    async def test_produce_to_two_queues_at_once(self) -> None:
        first = await self.fresh_queue("two-a")
        second = await self.fresh_queue("two-b")
        producer = await self.open_producer(first)
        consumer_a = await self.open_consumer(first)
        consumer_b = await self.open_consumer(second)
        messages = [self.outgoing(first if i % 2 else second, i) for i in range(self.message_count)]
        await self.produce_confirmed(producer, messages)
        for consumer, queue in ((consumer_a, first), (consumer_b, second)):
            expected = [m.value for m in messages if m.topic == queue]
            received = await self.drain(consumer, len(expected), ack=True)
            assert_exactly_once(received, expected)
            assert {e.source for e in received} == {queue}

    async def test_produce_to_a_never_seen_queue(self) -> None:
        home = await self.fresh_queue("home")
        producer = await self.open_producer(home)
        target = self.fresh_name("unseen")  # deliberately not created
        messages = [self.outgoing(target, i) for i in range(3)]
        if self.creates_queues_on_produce:
            await self.produce_confirmed(producer, messages)
            consumer = await self.open_consumer(target)
            assert_exactly_once(await self.drain(consumer, 3, ack=True), [m.value for m in messages])
            return
        recorder = DeliveryRecorder()
        error: Exception | None = None
        try:
            producer.produce(messages, recorder)
            await _bounded(producer.flush(self.max_wait_seconds), self.max_wait_seconds + self.timing_slack_seconds,
                           "Producer.flush()")
        except Exception as exc:
            error = exc
        if error is None:
            await recorder.wait_for(len(messages), self.deadline())
        assert not recorder.delivered, "records for a queue that does not exist were reported delivered"
        assert error is not None or len(recorder.failed) == len(messages), (
            "producing to a queue that does not exist must raise or report every record as failed"
        )

    async def test_large_batch_nothing_lost_or_duplicated(self) -> None:
        name = await self.fresh_queue("large")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        count = self.large_batch_size
        messages = [self.outgoing(name, i, key=f"k{i % 16}".encode() if self.supports_keys else None)
                    for i in range(count)]
        recorder = DeliveryRecorder()
        for start in range(0, count, 250):
            producer.produce(messages[start:start + 250], recorder)
        seconds = 3 * self.max_wait_seconds
        await _bounded(producer.flush(seconds), seconds + self.timing_slack_seconds, "Producer.flush()")
        recorder.assert_all_delivered(messages)
        received = await self.drain(consumer, count, ack=True, max_messages=500, seconds=seconds)
        assert_exactly_once(received, [m.value for m in messages])
        self.check_order(received)

    async def test_delay_is_honoured(self) -> None:
        if not self.supports_delay:
            pytest.skip("connector cannot delay messages")
        name = await self.fresh_queue("delay")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        delayed = self.outgoing(name, 0, delay=self.delay_seconds)
        prompt = self.outgoing(name, 1)
        recorder = DeliveryRecorder()
        sent_at = time.monotonic()
        producer.produce([delayed, prompt], recorder)
        arrival: dict[bytes, float] = {}
        deadline = self.deadline(self.delay_seconds + self.max_wait_seconds)
        while len(arrival) < 2 and time.monotonic() < deadline:
            batch = await drain(consumer, 1, deadline, ack=True)
            for envelope in batch:
                assert envelope.value not in arrival, f"{envelope.value!r} arrived twice"
                arrival[envelope.value] = time.monotonic()
        assert set(arrival) == {delayed.value, prompt.value}, f"arrived: {sorted(arrival)}"
        waited = arrival[delayed.value] - sent_at
        assert waited >= 0.9 * self.delay_seconds, (
            f"a message delayed by {self.delay_seconds} s arrived after {waited:.2f} s"
        )
        assert await recorder.wait_for(2, self.deadline()), "delayed records must be reported too"
        recorder.assert_all_delivered([delayed, prompt])

    async def test_delayed_record_for_invalid_partition_is_reported_failed(self) -> None:
        """A delayed record is validated when accepted: it must not be reported delivered and then vanish."""
        if not (self.supports_delay and self.supports_partitions):
            pytest.skip("connector cannot delay messages or choose partitions")
        name = await self.fresh_queue("delaybad")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        bad = self.outgoing(name, 0, partition=self.partitions + 7, delay=0.2)
        marker = self.outgoing(name, 1, delay=0.6)  # released after the bad one would have been
        recorder = DeliveryRecorder()
        producer.produce([bad], recorder)
        producer.produce([marker], recorder)
        assert await recorder.wait_for(2, self.deadline()), f"only {recorder.reported()} of 2 records reported"
        received = await drain_until(consumer, lambda got: any(e.value == marker.value for e in got), self.deadline(),
                                     ack=True)
        assert marker.token in recorder.delivered_tokens()
        assert bad.token in recorder.failed_tokens(), (
            "a delayed record for a partition that does not exist was reported delivered "
            f"(received: {[e.value for e in received]})"
        )

    # ------------------------------------------------------------------ acks, nacks and redelivery

    async def test_acked_messages_are_not_redelivered_after_reconnect(self) -> None:
        name = await self.fresh_queue("acked")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i) for i in range(self.message_count)]
        await self.produce_confirmed(producer, messages)
        assert_exactly_once(await self.drain(consumer, len(messages), ack=True), [m.value for m in messages])
        consumer = await self.reconnect(consumer, name)
        received, sentinels = await self.drain_past_sentinels(consumer, producer, name)
        assert_exactly_once(received, sentinels)

    async def test_unacked_messages_are_redelivered_after_reconnect(self) -> None:
        """At-least-once: a consumer that closes without acking gives its messages to the next one."""
        name = await self.fresh_queue("unacked")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i) for i in range(self.message_count)]
        await self.produce_confirmed(producer, messages)
        received = await self.drain(consumer, len(messages))
        assert_exactly_once(received, [m.value for m in messages])
        acked: list[Envelope] = []
        for group in _group_by_partition(received).values():
            acked.extend(group[: len(group) // 2])  # a prefix of each partition, in delivery order
        await consumer.ack(acked)
        acked_values = {e.value for e in acked}
        unacked = [e.value for e in received if e.value not in acked_values]
        consumer = await self.reconnect(consumer, name)
        again, sentinels = await self.drain_past_sentinels(consumer, producer, name, unacked)
        assert_exactly_once(again, [*unacked, *sentinels])
        redelivered = [e for e in again if e.value not in sentinels]
        self.check_order(redelivered, redelivered=True)
        for envelope in redelivered:
            if self.counts_attempts:
                assert envelope.attempt == 2, f"second delivery must have attempt 2: {envelope!r}"
            else:
                assert envelope.attempt >= 1

    async def test_acks_out_of_order_then_reconnect(self) -> None:
        """Acks in any order: unacked ones come back; acked ones do not (Kafka: none of the committed prefix)."""
        name = await self.fresh_queue("ackorder")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        messages = [self.outgoing(name, i) for i in range(self.message_count)]
        await self.produce_confirmed(producer, messages)
        received = await self.drain(consumer, len(messages))
        assert_exactly_once(received, [m.value for m in messages])
        acked: list[Envelope] = []
        forbidden: set[bytes] = set()
        for group in _group_by_partition(received).values():
            # ack positions 0, 1, 3, 5, ...: a committed prefix of two, then a gap before every other one
            chosen = [e for i, e in enumerate(group) if i < 2 or i % 2 == 1]
            acked.extend(chosen)
            forbidden.update(e.value for e in group[:2])
        await consumer.ack(list(reversed(acked)))
        acked_values = {e.value for e in acked}
        if self.acks_individually:
            forbidden = acked_values
        optional = acked_values - forbidden
        unacked = [e.value for e in received if e.value not in acked_values]
        consumer = await self.reconnect(consumer, name)
        again, sentinels = await self.drain_past_sentinels(consumer, producer, name, unacked)
        assert_exactly_once(again, [*unacked, *sentinels], optional=optional)

    async def test_nack_redelivers(self) -> None:
        name = await self.fresh_queue("nack")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        key = self._one_unit_key()
        messages = [self.outgoing(name, i, key=key) for i in range(3)]
        await self.produce_confirmed(producer, messages)
        first = await self.drain(consumer, 3)
        assert_exactly_once(first, [m.value for m in messages])
        await consumer.nack(first, 0.0)
        if not self.redelivers_nacked_in_session:
            consumer = await self.reconnect(consumer, name)
        again = await self.drain(consumer, 3)
        assert_exactly_once(again, [m.value for m in messages])
        self.check_order(again, redelivered=True)
        for envelope in again:
            wanted = 2 if self.counts_attempts else 1
            assert envelope.attempt >= wanted, f"a redelivery must count its attempt: {envelope!r}"
            if self.counts_attempts:
                assert envelope.attempt == 2, f"second delivery must have attempt 2: {envelope!r}"
        await consumer.ack(again)
        consumer = await self.reconnect(consumer, name)
        received, sentinels = await self.drain_past_sentinels(consumer, producer, name)
        assert_exactly_once(received, sentinels)

    async def test_nack_gives_back_only_the_nacked(self) -> None:
        name = await self.fresh_queue("partialnack")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        key = self._one_unit_key()
        messages = [self.outgoing(name, i, key=key) for i in range(3)]
        await self.produce_confirmed(producer, messages)
        first = sorted(await self.drain(consumer, 3), key=index_of)
        assert_exactly_once(first, [m.value for m in messages])
        await consumer.ack([first[0]])
        await consumer.nack([first[1]], 0.0)
        await consumer.ack([first[2]])
        optional: set[bytes] = set()
        if not self.redelivers_nacked_in_session:
            consumer = await self.reconnect(consumer, name)
            if not self.acks_individually:
                optional = {first[2].value}  # acked after the gap the nack left
        again, sentinels = await self.drain_past_sentinels(consumer, producer, name, [first[1].value])
        assert_exactly_once(again, [first[1].value, *sentinels], optional=optional)

    async def test_nack_with_delay_holds_the_message_back(self) -> None:
        if not (self.supports_nack_delay and self.redelivers_nacked_in_session):
            pytest.skip("connector cannot delay a nacked message")
        name = await self.fresh_queue("nackdelay")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        message = self.outgoing(name, 0)
        await self.produce_confirmed(producer, [message])
        first = await self.drain(consumer, 1)
        assert_exactly_once(first, [message.value])
        nacked_at = time.monotonic()
        await consumer.nack(first, self.delay_seconds)
        again = await self.drain(consumer, 1, seconds=self.delay_seconds + self.max_wait_seconds, ack=True)
        waited = time.monotonic() - nacked_at
        assert_exactly_once(again, [message.value])
        assert waited >= 0.9 * self.delay_seconds, (
            f"a message nacked with delay {self.delay_seconds} s came back after {waited:.2f} s"
        )
