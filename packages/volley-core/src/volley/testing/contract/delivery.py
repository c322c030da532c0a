"""The contract's tests of producing and consuming: lifecycle, exactly-once delivery, what survives, order,
partitions, timeouts and delays."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter, defaultdict
from collections.abc import Sequence

import pytest

from volley.message import Envelope, Headers, OutgoingMessage
from volley.testing.contract.base import ContractBase
from volley.testing.contract.checks import assert_exactly_once, assert_in_order, index_of
from volley.testing.contract.draining import HANG_SLACK_SECONDS, bounded, drain, drain_until
from volley.testing.contract.recorder import DeliveryRecorder

__all__ = ["DeliveryTests"]


class DeliveryTests(ContractBase):
    """Producing and consuming, from start and close to large batches and delays."""

    # ------------------------------------------------------------------ lifecycle

    async def test_start_and_close_without_traffic(self) -> None:
        name = await self.fresh_queue("lifecycle")
        consumer = await self.open_consumer(name)
        producer = await self.open_producer(name)
        await consumer.ack([])
        await consumer.nack([], 0.0)
        started = time.monotonic()
        await bounded(producer.flush(self.max_wait_seconds), self.timing_slack_seconds,
                       "flush() with nothing pending")
        assert time.monotonic() - started <= self.timing_slack_seconds
        await self.close(consumer)
        await self.close(producer)
        # A second close must be harmless: shutdown paths after errors may close twice.
        await bounded(consumer.close(), self.max_wait_seconds, "a second Consumer.close()")
        await bounded(producer.close(), self.max_wait_seconds, "a second Producer.close()")
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
        extra = await bounded(consumer.consume(100, self.empty_poll_timeout),
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
        await bounded(producer.flush(self.max_wait_seconds), self.max_wait_seconds + self.timing_slack_seconds,
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
        await bounded(producer.flush(self.max_wait_seconds), self.max_wait_seconds + self.timing_slack_seconds,
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
                batch = await bounded(consumer.consume(10, timeout), timeout + HANG_SLACK_SECONDS,
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
            batch = await bounded(waiting, self.max_wait_seconds,
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
            await bounded(producer.flush(self.max_wait_seconds), self.max_wait_seconds + self.timing_slack_seconds,
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
        await bounded(producer.flush(seconds), seconds + self.timing_slack_seconds, "Producer.flush()")
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
