"""Exactly-once: a partition fenced at an input given back (transactional.py), made deterministic with the fake
clients of test_races. A fence holds the partition until what came before the input is committed (or being
committed) and the redelivery delay is over; a review found two ways for a held partition never to resume and
one for the given-back input to be skipped."""

from __future__ import annotations

import time
from typing import Any

import pytest
from test_races import FakeProducer, fakes, take, transactional  # noqa: F401  (fakes: a fixture, used below)

from volley.errors import DeliveryError
from volley.message import Envelope

pytestmark = pytest.mark.usefixtures("fakes")

KEY = ("in", 0)


async def handed_out(consumer: Any, count: int, within: float = 5.0) -> list[int]:
    """Positions of the next ``count`` envelopes the consumer hands out (fewer if it stops handing out)."""
    got: list[Envelope] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got.extend(await consumer.consume(count - len(got), 0.05))
    return [int(e.position) for e in got]


async def test_a_fence_whose_delay_ends_while_the_commit_is_sent_lifts_once_it_is_done() -> None:
    """The commit carrying the inputs before the fence is under way when the delay ends: at its start the delay
    was not over, at the timer nothing before the fence was committed yet. The partition stayed held for good."""
    consumer, fake, _, producer = await transactional()
    fake.add(*KEY, [b"%d" % i for i in range(10)])
    fake.rebalance("assign", [KEY])
    try:
        first = await take(consumer, 10)
        await consumer.begin()
        await consumer.nack([first[5]], 0.5)
        await consumer.abort()
        rewound = await take(consumer, 5)
        assert [int(e.position) for e in rewound] == [0, 1, 2, 3, 4], "read again up to the fence"

        def slow_commit(*_args: Any) -> None:
            time.sleep(1.0)  # the delay ends while the broker commits
            FakeProducer.commit_transaction(producer)

        producer.commit_transaction = slow_commit
        await consumer.begin()
        await consumer.commit(rewound)
        assert await handed_out(consumer, 5) == [5, 6, 7, 8, 9], "the partition resumed at the fence"
    finally:
        await consumer.close()


async def test_a_fence_lifted_as_its_record_arrives_hands_out_that_record_first() -> None:
    """The fence could be lifted already when the record at it was fetched: the lift (a seek) happened in the
    middle of the fetch's records, the rest of them went out, and the given-back input was skipped."""
    consumer, fake, _, _ = await transactional()
    fake.add(*KEY, [b"%d" % i for i in range(5)])
    fake.rebalance("assign", [KEY])
    try:
        await consumer.begin()
        await consumer.commit(await take(consumer, 5))
        state = consumer._tracker.partitions[KEY]
        state.fenced_at(5, until=0.0)  # given back at 5 (rewound to the commit), its delay over
        fake.add(*KEY, [b"%d" % i for i in range(5, 10)])
        assert await handed_out(consumer, 5) == [5, 6, 7, 8, 9]
    finally:
        await consumer.close()


async def test_a_commit_that_starts_after_its_partition_was_released_is_refused() -> None:
    """A commit can outlive a revoke's deadline and start sending late: the group metadata it then takes is the
    next generation's, so the broker took the offsets of a partition this member no longer owned, while its next
    owner (this member again, in the failing run) had read the old offset and handled the inputs again: their
    outputs were visible twice (test_rebalance's zombie test, under load). The commit is now refused (aborted)."""
    consumer, fake, _, producer = await transactional()
    fake.add(*KEY, [b"a", b"b"])
    fake.rebalance("assign", [KEY])
    try:
        inputs = await take(consumer, 2)
        await consumer.begin()
        metadata = fake.consumer_group_metadata

        def after_a_rebalance() -> str:
            consumer._fetcher.release({KEY})  # the revoke gave the partition up while the commit waited
            fake.generation = 2
            return metadata()

        fake.consumer_group_metadata = after_a_rebalance  # type: ignore[method-assign]
        with pytest.raises(DeliveryError, match="revoked before it committed"):
            await consumer.commit(inputs)
        assert not [call for call in producer.transaction_calls if call.startswith("offsets:")]
        assert producer.transaction_calls[-1] == "abort"
    finally:
        await consumer.close()
