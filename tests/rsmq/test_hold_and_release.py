"""How long the RSMQ consumer holds a message, and what it gives back, around the edges of its life: a receive
answered after close, a give-back racing a receive of the same message, the extension budget of a message that
waited behind others. Each test failed on the code before its fix.

Interleavings are forced by wrapping a client call (no sleeps standing in for synchronisation): the wrapped call
waits for, or does, at that instant what another thread would do."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from typing import Any

import pytest
import redis

from volley.ports import QueueSpec
from volley_rsmq import RsmqClient, RsmqConnector, RsmqConsumer, parse_settings

pytestmark = pytest.mark.redis


def seed(config: dict[str, Any], qname: str, count: int) -> None:
    client = RsmqClient(parse_settings(config, qname, "output"))
    try:
        client.send(qname, [(None, json.dumps({"id": i}).encode()) for i in range(count)])
    finally:
        client.close()


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
