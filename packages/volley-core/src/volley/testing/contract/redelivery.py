"""The contract's tests of acks, nacks and redelivery: what comes back after a nack or a reconnect, and what not."""

from __future__ import annotations

import time

import pytest

from volley.message import Envelope
from volley.testing.contract.base import ContractBase
from volley.testing.contract.checks import assert_exactly_once, group_by_partition, index_of

__all__ = ["RedeliveryTests"]


class RedeliveryTests(ContractBase):
    """Acks, nacks and redelivery after a reconnect."""

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
        for group in group_by_partition(received).values():
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
        for group in group_by_partition(received).values():
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
