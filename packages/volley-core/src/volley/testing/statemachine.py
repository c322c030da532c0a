"""A Hypothesis state machine that checks a connector against a plain model of what it holds.

Hypothesis interleaves produce, consume, ack, nack and consumer restarts in
random orders and shrinks any failure to the shortest sequence of steps that
shows it. The model is deliberately simple: every message produced is in
exactly one state (pending in a deque, optional, held by the consumer, nacked
and waiting for a restart, or acked), and each delivery the connector makes is
checked against it the moment it happens:

- a delivered message was produced, is intact (value, key, headers), and is
  not acked (nor held by the live consumer already);
- first deliveries keep production order within each ordering unit;
- ``attempt`` counts deliveries where the connector says it does;
- at the end every pending message does arrive: nothing is lost.

The connector's coroutines run on a private event loop that each example
creates and closes, so the machine itself is an ordinary synchronous
Hypothesis ``RuleBasedStateMachine``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Hashable, Iterator, Sequence
from dataclasses import dataclass
from typing import ClassVar, TypeVar

import hypothesis
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from volley.message import Envelope, Headers, OutgoingMessage
from volley.ports import Connector, Consumer, Producer, QueueSpec
from volley.testing.contract import DeliveryRecorder

__all__ = ["DEFAULT_SETTINGS", "SERVER_SETTINGS", "connector_state_machine"]

T = TypeVar("T")

DEFAULT_SETTINGS = hypothesis.settings(
    max_examples=50,
    stateful_step_count=30,
    deadline=None,  # brokers have latency; a step's duration says nothing about correctness
    suppress_health_check=[hypothesis.HealthCheck.too_slow],
)
"""Modest defaults for an in-process connector; pass ``settings=`` to change them."""

SERVER_SETTINGS = hypothesis.settings(
    DEFAULT_SETTINGS,
    max_examples=5,
    # No shrinking: against a real server every example costs seconds, so shrinking a failure could take longer
    # than the whole suite; the unshrunk sequence (at most ``stateful_step_count`` steps) is readable as it is.
    phases=[hypothesis.Phase.explicit, hypothesis.Phase.reuse, hypothesis.Phase.generate],
)
"""For a connector talking to a real server: few examples, no shrinking."""

_ID_BYTES = 8

_Record = tuple[bytes | None, Headers | None, bytes]  # key, headers, payload


def _encode(message_id: int, payload: bytes) -> bytes:
    return message_id.to_bytes(_ID_BYTES, "big") + payload


def _decode(value: bytes) -> int | None:
    return int.from_bytes(value[:_ID_BYTES], "big") if len(value) >= _ID_BYTES else None


def connector_state_machine(
    make_connector: Callable[[], Connector],
    make_spec: Callable[[str, str], QueueSpec],
    *,
    create_queue: Callable[[str], Awaitable[None]] | None = None,
    ordering: str = "partition",
    supports_keys: bool = True,
    supports_headers: bool = True,
    redelivers_nacked_in_session: bool = True,
    acks_individually: bool = True,
    counts_attempts: bool = False,
    max_wait_seconds: float = 10.0,
    poll_timeout: float = 0.05,
    settings: hypothesis.settings | None = None,
    name: str = "Connector",
) -> type[RuleBasedStateMachine]:
    """Build a state machine class for one connector; use its ``.TestCase`` or ``run_state_machine_as_test``.

    Per example, ``make_connector()`` is called first, then ``make_spec(name,
    "input")`` and ``make_spec(name, "output")`` for one fresh queue name
    (``create_queue(name)`` is awaited before, when given). The flags mean
    what :class:`volley.testing.contract.ConnectorContract`'s do, and
    ``ConnectorContract.capabilities()`` returns them for a contract subclass.
    ``poll_timeout`` is the ``timeout`` of each consume step (0 is fine for an
    in-process broker; a network broker wants a fraction of a second).

    With a server that a pytest fixture provides::

        def test_kafka_machine(kafka_bootstrap):
            machine = connector_state_machine(KafkaConnector, lambda n, r: spec(kafka_bootstrap, n, r), ...)
            run_state_machine_as_test(machine, settings=SERVER_SETTINGS)
    """
    if ordering not in ("partition", "key", "none"):
        raise ValueError(f"ordering must be 'partition', 'key' or 'none', not {ordering!r}")
    records = _records(supports_keys=supports_keys, supports_headers=supports_headers)

    # The rules are _ConnectorMachine's; only ``produce`` is bound here, as its strategy depends on the flags.
    class ConnectorMachine(_ConnectorMachine):
        options = _MachineConfig(
            make_connector=make_connector, make_spec=make_spec, create_queue=create_queue, ordering=ordering,
            supports_keys=supports_keys, supports_headers=supports_headers,
            redelivers_nacked_in_session=redelivers_nacked_in_session, acks_individually=acks_individually,
            counts_attempts=counts_attempts, max_wait_seconds=max_wait_seconds, poll_timeout=poll_timeout,
        )

        @rule(batch=records)
        def produce(self, batch: list[_Record]) -> None:
            with self._step():
                self._produce(batch)

    ConnectorMachine.__name__ = ConnectorMachine.__qualname__ = f"{name}StateMachine"
    ConnectorMachine.TestCase.settings = settings or DEFAULT_SETTINGS
    return ConnectorMachine


def _records(*, supports_keys: bool, supports_headers: bool) -> st.SearchStrategy[list[_Record]]:
    """Batches of (key, headers, payload) to produce: keys and headers only where the connector keeps them."""
    keys = st.none() | st.sampled_from([b"a", b"b", b"c", b"\x00\xff"]) if supports_keys else st.none()
    headers = (
        st.none()
        | st.dictionaries(st.sampled_from(["h", "trace-id", "ünï"]), st.binary(min_size=1, max_size=8),
                          min_size=1, max_size=2)
        if supports_headers
        else st.none()
    )
    return st.lists(st.tuples(keys, headers, st.binary(max_size=24)), min_size=1, max_size=8)


_picks = st.lists(st.integers(min_value=0, max_value=2**16), min_size=1, max_size=6)


@dataclass(frozen=True)
class _MachineConfig:
    """What ``connector_state_machine`` was given: the connector, and the flags that say what it does."""

    make_connector: Callable[[], Connector]
    make_spec: Callable[[str, str], QueueSpec]
    create_queue: Callable[[str], Awaitable[None]] | None
    ordering: str
    supports_keys: bool
    supports_headers: bool
    redelivers_nacked_in_session: bool
    acks_individually: bool
    counts_attempts: bool
    max_wait_seconds: float
    poll_timeout: float


class _ConnectorMachine(RuleBasedStateMachine):
    """The model and the rules; ``connector_state_machine`` makes a subclass with its ``options`` and ``produce``."""

    options: ClassVar[_MachineConfig]

    def __init__(self) -> None:
        super().__init__()
        self._loop = asyncio.new_event_loop()
        self._failed = False
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        # the model
        self.produced: dict[int, tuple[bytes, bytes | None, Headers | None]] = {}
        self.pending: deque[int] = deque()  # must still be delivered
        self.optional: set[int] = set()  # may be delivered again once (acked after a gap, Kafka-style)
        self.held: dict[int, Envelope] = {}  # delivered to the live consumer, not settled
        self.nacked: set[int] = set()  # nacked; comes back after a restart (no in-session redelivery)
        self.acked: set[int] = set()
        self.deliveries: Counter[int] = Counter()
        self.unit_of: dict[int, Hashable] = {}
        self.last_first_delivery: dict[Hashable, int] = {}
        self.partition_of_key: dict[bytes, int | None] = {}
        self.next_id = 0
        try:
            self.queue = f"statemachine-{uuid.uuid4().hex[:12]}"
            self.connector = self.options.make_connector()
            if self.options.create_queue is not None:
                self._run(self.options.create_queue(self.queue), "create_queue()")
            self.input_spec = self.options.make_spec(self.queue, "input")
            self.output_spec = self.options.make_spec(self.queue, "output")
            self._producer = self.connector.create_producer(self.output_spec)
            self._run(self._producer.start(), "Producer.start()")
            self._consumer = self._open_consumer()
        except BaseException:
            self._close_all()
            raise

    # ------------------------------------------------------------ plumbing

    def _run(self, coroutine: Awaitable[T], what: str, seconds: float | None = None) -> T:
        limit = self.options.max_wait_seconds if seconds is None else seconds

        async def bounded() -> T:
            try:
                return await asyncio.wait_for(coroutine, limit)
            except TimeoutError:
                raise AssertionError(f"{what} did not return within {limit:.1f} s") from None

        return self._loop.run_until_complete(bounded())

    @contextlib.contextmanager
    def _step(self) -> Iterator[None]:
        """Remember that a step failed, so that teardown does not pile a second failure on top."""
        try:
            yield
        except BaseException:
            self._failed = True
            raise

    @property
    def consumer(self) -> Consumer:
        assert self._consumer is not None
        return self._consumer

    @property
    def producer(self) -> Producer:
        assert self._producer is not None
        return self._producer

    def _open_consumer(self) -> Consumer:
        consumer = self.connector.create_consumer(self.input_spec)
        self._consumer = consumer
        self._run(consumer.start(), "Consumer.start()")
        return consumer

    def _close_all(self) -> None:
        try:
            for resource in (self._consumer, self._producer):
                if resource is not None:
                    with contextlib.suppress(Exception):
                        self._run(resource.close(), f"{type(resource).__name__}.close()")
            self._consumer = self._producer = None
            with contextlib.suppress(Exception):
                self._run(self._loop.shutdown_asyncgens(), "shutdown_asyncgens()")
                # bounded: a connector thread that never returns must not hang the run
                self._run(self._loop.shutdown_default_executor(), "shutdown_default_executor()")
        finally:
            self._loop.close()

    def _unit(self, envelope: Envelope) -> Hashable | None:
        if self.options.ordering == "partition":
            return ("partition", envelope.partition)
        if self.options.ordering == "key" and envelope.key is not None:
            return ("key", envelope.key)
        return None

    def _delivered(self, envelope: Envelope) -> int:
        """Check one delivery against the model and move the message to ``held``."""
        message_id = _decode(envelope.value)
        assert message_id is not None, f"delivered a message that was never produced: {envelope!r}"
        assert message_id in self.produced, f"delivered a message that was never produced: {envelope!r}"
        assert message_id not in self.acked, f"message {message_id} was acked and is delivered again: {envelope!r}"
        assert message_id not in self.held, f"message {message_id} is delivered while still held: {envelope!r}"
        if message_id in self.optional:
            self.optional.discard(message_id)
        elif message_id in self.nacked:  # a connector may redeliver in session even if it need not
            self.nacked.discard(message_id)
        else:
            assert message_id in self.pending, f"message {message_id} delivered in an impossible state"
            self.pending.remove(message_id)
        self._check_intact(envelope, message_id)
        self._check_order(envelope, message_id)
        self.deliveries[message_id] += 1
        self.held[message_id] = envelope
        return message_id

    def _check_intact(self, envelope: Envelope, message_id: int) -> None:
        """Value, key and headers as produced; ``attempt`` as the connector says it counts."""
        value, key, sent_headers = self.produced[message_id]
        assert envelope.value == value, f"value changed: {value!r} -> {envelope.value!r}"
        if self.options.supports_keys:
            assert envelope.key == key, f"key changed: {key!r} -> {envelope.key!r}"
        if self.options.supports_headers:
            assert dict(envelope.headers or {}) == (sent_headers or {}), (
                f"headers changed: {sent_headers!r} -> {envelope.headers!r}"
            )
        previous = self.deliveries[message_id]
        if self.options.counts_attempts:
            assert envelope.attempt == previous + 1, f"delivery {previous + 1} has attempt {envelope.attempt}"
        else:
            assert envelope.attempt >= 1, f"attempt must start at 1: {envelope!r}"

    def _check_order(self, envelope: Envelope, message_id: int) -> None:
        """A first delivery keeps production order in its unit; a redelivery stays in its unit; a key in one
        partition."""
        unit = self._unit(envelope)
        if self.deliveries[message_id] == 0:
            if unit is not None:
                last = self.last_first_delivery.get(unit)
                assert last is None or last < message_id, (
                    f"order broken in {unit!r}: message {message_id} first delivered after {last}"
                )
                self.last_first_delivery[unit] = message_id
            self.unit_of[message_id] = unit
        else:
            assert self.unit_of[message_id] == unit, (
                f"message {message_id} moved from {self.unit_of[message_id]!r} to {unit!r} on redelivery"
            )
        if self.options.ordering == "partition" and self.options.supports_keys and envelope.key is not None:
            seen = self.partition_of_key.setdefault(envelope.key, envelope.partition)
            assert seen == envelope.partition, f"key {envelope.key!r} in partitions {seen} and {envelope.partition}"

    def _consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        batch = self._run(self.consumer.consume(max_messages, timeout), f"consume(timeout={timeout})",
                          timeout + self.options.max_wait_seconds)
        assert len(batch) <= max_messages, f"consume(max_messages={max_messages}) returned {len(batch)}"
        for envelope in batch:
            self._delivered(envelope)
        return batch

    def _produce(self, batch: Sequence[_Record]) -> None:
        messages = []
        for key, message_headers, payload in batch:
            message_id = self.next_id
            self.next_id += 1
            value = _encode(message_id, payload)
            self.produced[message_id] = (value, key, message_headers)
            messages.append(OutgoingMessage(self.queue, value, key, message_headers, token=message_id))
        recorder = DeliveryRecorder()
        self.producer.produce(messages, recorder)
        wait = self.options.max_wait_seconds
        self._run(self.producer.flush(wait), "Producer.flush()", wait + 1.0)
        recorder.assert_all_delivered(messages)
        self.pending.extend(m.token for m in messages)

    # ------------------------------------------------------------ rules

    @rule(max_messages=st.integers(min_value=1, max_value=10))
    def consume(self, max_messages: int) -> None:
        with self._step():
            self._consume(max_messages, self.options.poll_timeout)

    # The choice of held messages is drawn as plain numbers mapped onto what is held, never with a
    # precondition or sampled_from over it: on a real broker what is held depends on timing, and
    # Hypothesis requires the same draws to mean the same choices from one run to the next.
    @rule(picks=_picks)
    def ack(self, picks: list[int]) -> None:
        if not self.held:
            return
        with self._step():
            chosen = _pick(sorted(self.held), picks)
            self._run(self.consumer.ack([self.held[i] for i in chosen]), "ack()")
            for message_id in chosen:
                del self.held[message_id]
                self.acked.add(message_id)

    @rule(picks=_picks)
    def nack(self, picks: list[int]) -> None:
        if not self.held:
            return
        with self._step():
            chosen = _pick(sorted(self.held), picks)
            self._run(self.consumer.nack([self.held[i] for i in chosen], 0.0), "nack()")
            for message_id in chosen:
                del self.held[message_id]
                if self.options.redelivers_nacked_in_session:
                    self.pending.append(message_id)
                else:
                    self.nacked.add(message_id)

    @rule()
    def restart_consumer(self) -> None:
        with self._step():
            self._restart()

    def _restart(self) -> None:
        """Close the consumer (unacked messages go back) and start a new one in its place."""
        self._run(self.consumer.close(), "Consumer.close()")
        self._consumer = None
        unsettled = set(self.held) | self.nacked
        if not self.options.acks_individually:
            # Only the contiguous acked prefix of each unit is committed: acked messages after the first
            # unsettled one of their unit may come back once. A message nacked in this session and not yet
            # delivered again is back in ``pending`` but is just as much a gap in what could be committed.
            redelivery_owed = {i for i in self.pending if self.deliveries[i] > 0}
            gap: dict[Hashable, int] = {}
            for message_id in unsettled | redelivery_owed:
                unit = self.unit_of[message_id]
                gap[unit] = min(gap.get(unit, message_id), message_id)
            reopened = {i for i in self.acked if self.unit_of[i] in gap and i > gap[self.unit_of[i]]}
            self.acked -= reopened
            self.optional |= reopened
        self.pending.extend(sorted(unsettled))
        self.held.clear()
        self.nacked.clear()
        self._open_consumer()

    # ------------------------------------------------------------ invariants

    @invariant()
    def every_message_is_in_exactly_one_state(self) -> None:
        states = [set(self.pending), self.optional, set(self.held), self.nacked, self.acked]
        assert sum(len(s) for s in states) == len(self.produced) == len(set().union(*states)), (
            "model bookkeeping lost track of a message"
        )
        assert len(self.pending) == len(set(self.pending))

    # ------------------------------------------------------------ end of an example

    def teardown(self) -> None:
        try:
            if not self._failed and self._consumer is not None and self._producer is not None:
                self._nothing_is_lost()
        finally:
            self._close_all()

    def _nothing_is_lost(self) -> None:
        """Restart, add a marker, and consume until everything still owed (and the marker) has arrived."""
        self._restart()
        self._produce([(None, None, b"final-marker")])
        deadline = time.monotonic() + self.options.max_wait_seconds
        while self.pending and time.monotonic() < deadline:
            batch = self._consume(100, min(0.25, max(0.0, deadline - time.monotonic())))
            if batch:
                self._run(self.consumer.ack(batch), "ack()")
                for envelope in batch:
                    message_id = _decode(envelope.value)
                    assert message_id is not None
                    del self.held[message_id]
                    self.acked.add(message_id)
        assert not self.pending, (
            f"{len(self.pending)} message(s) never came back within {self.options.max_wait_seconds} s: "
            f"{sorted(self.pending)[:10]}"
        )


def _pick(held: list[int], picks: list[int]) -> list[int]:
    """Distinct held ids chosen by drawn numbers, whatever the number of held messages."""
    return sorted({held[p % len(held)] for p in picks})
