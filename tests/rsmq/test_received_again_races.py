"""Races of the RSMQ consumer's "received again while held" handling, found by a second review of session 31's
fixes; each test failed on the code before its fix.

Each forces one interleaving of the receive thread with the settler thread or the event loop by wrapping a client
call (no sleeps): the wrapped call does, at that instant, what the other thread would do."""

from __future__ import annotations

import asyncio
import threading
from typing import Any

import pytest
import redis
from rsmq_parts import seed

from volley.ports import QueueSpec
from volley_rsmq import RsmqConnector

pytestmark = pytest.mark.redis


async def consume_one(consumer: Any) -> Any:
    for _ in range(50):
        got = list(await consumer.consume(1, 0.2))
        if got:
            return got[0]
    raise AssertionError("nothing received")


async def test_a_heartbeat_racing_a_receive_again_does_not_lose_the_held_delivery(
        rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis) -> None:
    """settler.py ``_watch_visibility`` takes (id, held.rc) under the lock, runs CHANGE_VISIBILITY without it,
    then marks the entry lost when that pair is reported lost. If the receive thread received the message again
    in between (its vt passed: the heartbeat was late), ``_not_held`` has moved the entry to the new receive
    count; the stale pair is "lost" and the entry this consumer still holds is marked lost. From then on it is
    neither extended nor excluded by ``_not_held``: the next time its vt passes, the same consumer hands it to
    the engine a second time (the doc: "is not handed to the handler a second time")."""
    config = {**rsmq_config, "vt": 1, "heartbeat": True}
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", config))
    await consumer.start()
    try:
        seed(config, qname, 1)
        first = await consume_one(consumer)
        client = consumer._client
        real_change = client.change_visibility
        raced = threading.Event()

        def change_visibility(q: str, vt_ms: int, held: Any, reason: str = "") -> Any:
            if not raced.is_set() and not reason:
                # The receive thread, at this instant: the message's vt passed, it is received again (rc 2).
                raw_redis.zadd(f"rsmq:{qname}", {first.position: 0})
                assert consumer._receive(10) == []  # not handed out: _not_held moved the entry to rc 2
                raced.set()
            return real_change(q, vt_ms, held, reason)

        client.change_visibility = change_visibility  # type: ignore[method-assign]
        assert await asyncio.to_thread(raced.wait, 10)
        await consumer.settled(5)
        with consumer._cond:
            entries = list(consumer._held.values())
        assert len(entries) == 1
        # Its vt passes once more (the heartbeat no longer extends a "lost" entry): received again.
        raw_redis.zadd(f"rsmq:{qname}", {first.position: 0})
        again = list(await consumer.consume(10, 0.5))
        assert not again and not entries[0].lost, (
            f"the consumer still holds {first.position} (engine has it) but its entry is lost={entries[0].lost}; "
            f"handed out again: {[(e.position, e.attempt) for e in again]}")
    finally:
        await consumer.close()


async def test_a_message_acked_and_deleted_while_its_receive_again_is_under_way_is_not_handed_out(
        rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis) -> None:
    """consumer.py ``_envelopes``/``_not_held`` look a re-received message up in ``_held``/``_deleting`` only
    after the RECEIVE script returned. If meanwhile the engine acked the held delivery and the settler deleted it
    (``_deleted`` pops it from ``_deleting``), the late copy matches nothing and is handed to the engine again:
    a message already handled and deleted is handled twice, with no warning."""
    config = {**rsmq_config, "vt": 30, "heartbeat": False}
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", config))
    await consumer.start()
    loop = asyncio.get_running_loop()
    try:
        seed(config, qname, 1)
        first = await consume_one(consumer)
        raw_redis.zadd(f"rsmq:{qname}", {first.position: 0})  # its vt passed while it waited in the buffer
        client = consumer._client
        real_receive = client.receive

        def receive(*args: Any, **kwargs: Any) -> Any:
            result = real_receive(*args, **kwargs)  # the script ran: the message is received again (rc 2)
            if result.messages:
                # The event loop and the settler, at this instant: the engine acks it, the delete reaches Redis.
                asyncio.run_coroutine_threadsafe(consumer.ack([first]), loop).result(5)
                with consumer._cond:
                    assert consumer._cond.wait_for(lambda: not consumer._deleting and not consumer._busy, 5)
            return result

        client.receive = receive  # type: ignore[method-assign]
        again = list(await consumer.consume(10, 0.5))
        assert raw_redis.zcard(f"rsmq:{qname}") == 0  # deleted
        assert not again, f"acked and deleted, yet handed out again: {[(e.position, e.attempt) for e in again]}"
    finally:
        await consumer.close()
