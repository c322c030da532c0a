"""How long the RSMQ consumer holds a message, and what it gives back, around the edges of its life: a receive
answered after close, a give-back racing a receive of the same message, the extension budget of a message that
waited behind others. Each test failed on the code before its fix.

Interleavings are forced by wrapping a client call (no sleeps standing in for synchronisation): the wrapped call
waits for, or does, at that instant what another thread would do."""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
import redis
from rsmq_parts import seed

from volley.ports import QueueSpec
from volley_rsmq import RsmqConnector, RsmqConsumer

pytestmark = pytest.mark.redis


async def started(config: dict[str, Any], qname: str) -> RsmqConsumer:
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", config))
    await consumer.start()
    return consumer


async def receive_all(consumer: Any, count: int, within: float) -> list[Any]:
    got: list[Any] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got.extend(await consumer.consume(count - len(got), 0.1))
    return got


def visible_in_ms(raw_redis: redis.Redis, qname: str, message_id: str) -> float:
    """How long until the message is visible again, by the Redis server's clock (negative: visible now)."""
    score = raw_redis.zscore(f"rsmq:{qname}", message_id)
    assert score is not None, f"{message_id} is not in the queue"
    sec, usec = raw_redis.time()
    return score - (sec * 1000 + usec // 1000)


# ---------------------------------------------------------------------- a receive answered after close


async def test_a_receive_answered_after_close_gives_its_messages_back_at_once(
    rsmq_config: dict[str, Any], qname: str
) -> None:
    """close() waits for a receive under way for at most close_timeout_seconds, then releases what it holds and
    returns. A Redis slow to answer (a long script, a frozen server resumed, redis-py's retry on a fresh
    connection) may still answer that receive afterwards: its messages are hidden for the whole vt (60 s here, an
    hour with a vt chosen for slow handlers) and nobody will ever hand them out or release them."""
    config = {**rsmq_config, "vt": 60, "close_timeout_seconds": 0.2}
    consumer = await started(config, qname)
    seed(config, qname, 3)
    client = consumer._client
    executor = consumer._executor
    assert client is not None and executor is not None
    entered, gate = threading.Event(), threading.Event()
    real_receive = client.receive

    def slow_receive(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        gate.wait(10)  # Redis has not answered yet
        return real_receive(*args, **kwargs)

    client.receive = slow_receive  # type: ignore[method-assign]
    poll = asyncio.create_task(consumer.consume(10, 5.0))
    assert await asyncio.to_thread(entered.wait, 5)
    poll.cancel()  # the engine's shutdown step 1
    await consumer.close()  # gives up waiting for the receive after close_timeout_seconds
    gate.set()  # now Redis answers: the three messages are received, hidden for vt
    await asyncio.wait_for(asyncio.to_thread(executor.shutdown, True), 10)  # the receive thread is done

    other = await started(config, qname)
    try:
        got = await receive_all(other, 3, within=3)
    finally:
        await other.close()
    assert len(got) == 3, f"{3 - len(got)} of 3 messages received after close stay hidden for vt=60 s"


# ---------------------------------------------------------------------- a give-back racing a receive of its message


async def consume_one(consumer: Any) -> Any:
    [envelope] = await receive_all(consumer, 1, within=5)
    return envelope


async def test_a_give_back_landing_after_a_receive_again_keeps_its_delay(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    """The message's vt passed while the engine still had it; a receive of this consumer takes it again (rc 2)
    and, before that receive's answer is looked at, the engine gives the delivery it has back with a 5 s delay
    (nack): the nack no longer finds it held and its visibility change (for rc 1) is refused as lost. The
    receive's copy then matches nothing held and is handed out at once: the message is handled again right away
    instead of after the delay the engine asked for."""
    config = {**rsmq_config, "vt": 30, "heartbeat": False}
    consumer = await started(config, qname)
    loop = asyncio.get_running_loop()
    try:
        seed(config, qname, 1)
        first = await consume_one(consumer)
        raw_redis.zadd(f"rsmq:{qname}", {first.position: 0})  # its vt passed while it waited in the buffer
        client = consumer._client
        assert client is not None
        real_receive = client.receive

        def receive(*args: Any, **kwargs: Any) -> Any:
            result = real_receive(*args, **kwargs)  # the script ran: received again (rc 2)
            if result.messages:
                # The event loop and the settler, at this instant: the engine gives it back for 5 s, the change
                # reaches Redis (refused: rc 1 is no longer the delivery).
                asyncio.run_coroutine_threadsafe(consumer.nack([first], 5.0), loop).result(5)
                with consumer._cond:
                    assert consumer._cond.wait_for(lambda: not consumer._to_release and not consumer._busy, 5)
            return result

        client.receive = receive  # type: ignore[method-assign]
        again = list(await consumer.consume(10, 0.5))
        assert not again, (
            f"given back for 5 s, yet handed out again at once: {[(e.position, e.attempt) for e in again]}")
        await consumer.settled(5)
        assert 3500 < visible_in_ms(raw_redis, qname, first.position) <= 5000, "the nack's delay was not kept"
    finally:
        await consumer.close()


async def test_a_give_back_queued_before_a_receive_again_keeps_its_delay(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    """The other order: the engine's nack (5 s) is queued; before the settler's visibility change reaches Redis
    the message's vt passes and this consumer's receive takes it again (rc 2). The nack no longer holds it, so the
    copy is handed out at once, and the change for rc 1 is refused: the delay is lost."""
    config = {**rsmq_config, "vt": 30, "heartbeat": False}
    consumer = await started(config, qname)
    try:
        seed(config, qname, 1)
        first = await consume_one(consumer)
        client = consumer._client
        assert client is not None
        real_change = client.change_visibility
        handed_out: list[Any] = []
        raced = threading.Event()

        def change_visibility(q: str, vt_ms: int, held: Any, reason: str = "") -> Any:
            if not raced.is_set() and vt_ms == 5000:
                # The receive thread, at this instant: the message's vt passed, it is received again (rc 2).
                raw_redis.zadd(f"rsmq:{qname}", {first.position: 0})
                handed_out.extend(consumer._receive(10) or [])
                raced.set()
            return real_change(q, vt_ms, held, reason)

        client.change_visibility = change_visibility  # type: ignore[method-assign]
        await consumer.nack([first], 5.0)
        assert await asyncio.to_thread(raced.wait, 5)
        await consumer.settled(5)
        assert not handed_out, (
            f"given back for 5 s, yet handed out again at once: {[(e.position, e.attempt) for e in handed_out]}")
        assert 3500 < visible_in_ms(raw_redis, qname, first.position) <= 5000, "the nack's delay was not kept"
    finally:
        await consumer.close()


# ---------------------------------------------------------------------- the extension budget of a message that waited


async def test_a_message_that_waited_behind_others_gets_its_whole_extension_budget(
    rsmq_config: dict[str, Any], qname: str
) -> None:
    """max_extension_seconds (3 s here) bounds how long a message *being processed* is kept hidden. It was counted
    from the receipt: three messages received in one batch and handled one after the other, 2 s each (well within
    the budget), and the third, begun at 4 s, had spent its budget waiting: it became visible at about 3.5 s and
    another worker received it while this one was about to handle it (processed twice)."""
    config = {**rsmq_config, "vt": 1, "max_extension_seconds": 3}
    consumer = await started(config, qname)
    other = await started(config, qname)
    try:
        seed(config, qname, 3)
        batch = await receive_all(consumer, 3, within=5)
        assert len(batch) == 3
        taken: list[Any] = []
        for envelope in batch:  # the engine: one handler call after another, 2 s each, acked when done
            handler_done = time.monotonic() + 2.0
            while time.monotonic() < handler_done:  # meanwhile another worker polls the queue
                taken.extend(await other.consume(10, min(0.1, max(0.0, handler_done - time.monotonic()))))
            await consumer.ack([envelope])
        assert not taken, (f"{[(e.value, e.attempt) for e in taken]} received by another worker while this one "
                           "held it, within max_extension_seconds of its handling")
    finally:
        await consumer.close()
        await other.close()


async def test_messages_waiting_behind_a_stuck_handler_are_let_go_within_two_budgets(
    rsmq_config: dict[str, Any], qname: str
) -> None:
    """The other side of counting the budget from the start of handling: a handler stuck on the first of five
    buffered messages. Each message behind it would begin its budget only when the one before it was let go, so
    the n-th was held n budgets (n hours by default, thousands for a full buffer) while other workers had
    nothing to do. Once the stuck one is let go, every message waiting behind it starts its budget at once: all
    are let go within two budgets of their receipt (here 1 s each: by about 2.5 s, not 5.5 s)."""
    config = {**rsmq_config, "vt": 1, "max_extension_seconds": 1}
    consumer = await started(config, qname)
    other = await started(config, qname)
    try:
        seed(config, qname, 5)
        batch = await receive_all(consumer, 5, within=5)
        assert len(batch) == 5
        received = time.monotonic()
        taken = await receive_all(other, 5, within=4.0)  # the engine never settles any: its handler is stuck
        assert len(taken) == 5, (f"{5 - len(taken)} of 5 messages still held {time.monotonic() - received:.1f} s "
                                 "after their receipt with max_extension_seconds=1")
    finally:
        await consumer.close()
        await other.close()
