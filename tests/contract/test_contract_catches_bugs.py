"""The contract suite and the state machine must fail for broken connectors, not only pass for good ones.

Each broken connector wraps the memory connector and breaks one promise; the
contract test (or the state machine) that guards that promise must fail.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import hypothesis
import pytest
from hypothesis.stateful import run_state_machine_as_test

from volley.memory import MemoryBroker, MemoryConnector, MemoryConsumer, MemoryProducer
from volley.message import Envelope, OutgoingMessage
from volley.ports import Connector, Consumer, DeliveryCallback, Producer, QueueSpec
from volley.testing.contract import ConnectorContract
from volley.testing.statemachine import DEFAULT_SETTINGS, connector_state_machine

# ------------------------------------------------------------------------------------------ broken parts


class _Consumer:
    """Forwards to a memory consumer and remembers what it holds; subclasses break one thing."""

    def __init__(self, inner: MemoryConsumer) -> None:
        self.inner = inner
        self.held: dict[object, Envelope] = {}

    async def start(self) -> None:
        await self.inner.start()

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        batch = await self.inner.consume(max_messages, timeout)
        self.held.update((e.position, e) for e in batch)
        return batch

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        for envelope in envelopes:
            self.held.pop(envelope.position, None)
        await self.inner.ack(envelopes)

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        for envelope in envelopes:
            self.held.pop(envelope.position, None)
        await self.inner.nack(envelopes, delay)

    async def close(self) -> None:
        await self.inner.close()


class LosesHeldOnClose(_Consumer):
    """At-most-once: closing acks what was never processed."""

    async def close(self) -> None:
        await self.inner.ack(list(self.held.values()))
        await self.inner.close()


class IgnoresAcks(_Consumer):
    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        return None


class DropsNacked(_Consumer):
    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        await self.inner.ack(envelopes)


class ReversesBatches(_Consumer):
    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        return list(reversed(await super().consume(max_messages, timeout)))


class IgnoresMaxMessages(_Consumer):
    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        return await super().consume(max_messages + 1, timeout)


class BlocksTheLoop(_Consumer):
    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        batch = await super().consume(max_messages, 0.0)
        if not batch:
            time.sleep(timeout)  # noqa: ASYNC251 - the bug under test
        return batch


class DropsHeaders(_Consumer):
    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        batch = await super().consume(max_messages, timeout)
        for envelope in batch:
            envelope.headers = None
        return batch


class _Producer:
    def __init__(self, inner: MemoryProducer) -> None:
        self.inner = inner

    async def start(self) -> None:
        await self.inner.start()

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        self.inner.produce(messages, on_delivery)

    async def flush(self, timeout: float) -> None:
        await self.inner.flush(timeout)

    async def close(self) -> None:
        await self.inner.close()


class ReportsTwice(_Producer):
    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        self.inner.produce(messages, on_delivery)
        on_delivery(messages[:1], ())


class LosesEveryFifth(_Producer):
    """Reports everything delivered but never stores every fifth record."""

    def __init__(self, inner: MemoryProducer) -> None:
        super().__init__(inner)
        self.count = 0

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        kept = []
        for message in messages:
            self.count += 1
            if self.count % 5:
                kept.append(message)
        self.inner.produce(kept, lambda delivered, failed: None)
        on_delivery(messages, ())


class BrokenConnector:
    def __init__(self, consumer: type[_Consumer] = _Consumer, producer: type[_Producer] = _Producer) -> None:
        self.memory = MemoryConnector()
        self.consumer = consumer
        self.producer = producer

    def create_consumer(self, queue: QueueSpec) -> Consumer:
        return self.consumer(self.memory.create_consumer(queue))

    def create_producer(self, queue: QueueSpec) -> Producer:
        return self.producer(self.memory.create_producer(queue))


# ------------------------------------------------------------------------------------------ the contract


class BrokenMemoryContract(ConnectorContract):
    """The memory connector's contract settings with a broken part swapped in (not collected: no Test prefix)."""

    partitions = 3
    supports_partitions = True
    supports_delay = True
    supports_nack_delay = True
    counts_attempts = True
    max_wait_seconds = 1.0  # the failures below wait for messages that never come; keep that short

    def __init__(self, connector: BrokenConnector) -> None:
        self.broker = MemoryBroker(partitions=self.partitions)
        self.broken = connector

    def make_connector(self) -> Connector:
        return self.broken

    def queue_spec(self, name: str, role: str) -> QueueSpec:
        return QueueSpec(name=name, value=name, connector="memory", config={"broker": self.broker}, role=role)


CONTRACT_CASES = [
    (LosesHeldOnClose, _Producer, "test_unacked_messages_are_redelivered_after_reconnect"),
    (IgnoresAcks, _Producer, "test_acked_messages_are_not_redelivered_after_reconnect"),
    (IgnoresAcks, _Producer, "test_acks_out_of_order_then_reconnect"),
    (DropsNacked, _Producer, "test_nack_redelivers"),
    (DropsNacked, _Producer, "test_nack_gives_back_only_the_nacked"),
    (ReversesBatches, _Producer, "test_order_is_kept_within_each_unit"),
    (IgnoresMaxMessages, _Producer, "test_consume_honours_max_messages"),
    (BlocksTheLoop, _Producer, "test_consume_on_empty_queue_returns_within_timeout"),
    (DropsHeaders, _Producer, "test_headers_survive"),
    (_Consumer, ReportsTwice, "test_flush_returns_once_all_are_reported"),
    (_Consumer, ReportsTwice, "test_delivery_reports_arrive_without_flush"),
    (_Consumer, LosesEveryFifth, "test_produce_and_consume_exactly_once"),
    (_Consumer, LosesEveryFifth, "test_large_batch_nothing_lost_or_duplicated"),
]


@pytest.mark.parametrize(
    ("consumer", "producer", "test_name"),
    CONTRACT_CASES,
    ids=[f"{c.__name__}-{p.__name__}-{t}" for c, p, t in CONTRACT_CASES],
)
async def test_contract_fails_for_a_broken_connector(
    consumer: type[_Consumer], producer: type[_Producer], test_name: str
) -> None:
    case = BrokenMemoryContract(BrokenConnector(consumer, producer))
    case.contract_setup()
    try:
        with pytest.raises(AssertionError):
            await getattr(case, test_name)()
    finally:
        await case.contract_teardown()


async def test_contract_passes_for_the_unbroken_wrapper() -> None:
    """The control: the forwarding wrappers themselves break nothing, so the failures above are the bugs'."""
    case = BrokenMemoryContract(BrokenConnector())
    for _, _, test_name in CONTRACT_CASES:
        case.contract_setup()
        try:
            await getattr(case, test_name)()
        finally:
            await case.contract_teardown()


# ------------------------------------------------------------------------------------------ the state machine

MACHINE_CASES = [
    (LosesHeldOnClose, _Producer),
    (IgnoresAcks, _Producer),
    (DropsNacked, _Producer),
    (ReversesBatches, _Producer),
    (DropsHeaders, _Producer),
    (_Consumer, LosesEveryFifth),
]

# Finding the failure is what is under test; shrinking it (thousands of runs) is Hypothesis's business.
SEARCH = hypothesis.settings(DEFAULT_SETTINGS, max_examples=200, database=None, derandomize=True,
                             print_blob=False, phases=[hypothesis.Phase.explicit, hypothesis.Phase.generate])


def _machine(consumer: type[_Consumer], producer: type[_Producer]) -> type[hypothesis.stateful.RuleBasedStateMachine]:
    brokers: list[MemoryBroker] = []

    def make_connector() -> Connector:
        brokers.append(MemoryBroker(partitions=3))
        return BrokenConnector(consumer, producer)

    def make_spec(name: str, role: str) -> QueueSpec:
        return QueueSpec(name=name, value=name, connector="memory", config={"broker": brokers[-1]}, role=role)

    # An in-process broker has nothing in flight: a short final wait keeps shrinking a lossy connector quick.
    options = {**BrokenMemoryContract.capabilities(), "max_wait_seconds": 0.2}
    return connector_state_machine(make_connector, make_spec, **options, poll_timeout=0.0)


@pytest.mark.parametrize(
    ("consumer", "producer"), MACHINE_CASES, ids=[f"{c.__name__}-{p.__name__}" for c, p in MACHINE_CASES]
)
def test_state_machine_finds_a_broken_connector(consumer: type[_Consumer], producer: type[_Producer]) -> None:
    with pytest.raises((AssertionError, ExceptionGroup)):
        run_state_machine_as_test(_machine(consumer, producer), settings=SEARCH)


def test_state_machine_passes_for_the_unbroken_wrapper() -> None:
    run_state_machine_as_test(_machine(_Consumer, _Producer), settings=DEFAULT_SETTINGS)
