"""An envelope marked given up (``pending = -1``) by its consumer before the engine began it is skipped by every way a
handler runs, and counted abandoned (Envelope's docstring). The Kafka share consumer marks the records of a batch
it gave up past the group's lock: a stale copy queued ahead of the fresh one was handled first, a duplicate, and
the fresh copies behind it waited past their lock too (session 31's review of the share consumer)."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import pytest
from engine_fakes import Connector, Item, make_engine

from volley import MemoryBroker
from volley.memory import MemoryConsumer
from volley.message import Envelope

GIVEN_UP = {1, 13}
COUNT = 16


class GivingUpConsumer(MemoryConsumer):
    """Hands out every message, and gives up those of n == 1 and 13 (their lock expired) before the engine begins
    them: one in the first batch (which auto mode runs on the thread, timing the handler), one in a later batch (run
    inline on the loop)."""

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        envelopes = await super().consume(max_messages, timeout)
        for env in envelopes:
            if json.loads(env.value)["n"] in GIVEN_UP:
                env.pending = -1
        return envelopes

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        assert all(json.loads(e.value)["n"] not in GIVEN_UP for e in envelopes), "a given-up envelope was acknowledged"
        await super().ack(envelopes)


@pytest.mark.parametrize(("kind", "settings"), [
    ("sync", {}),
    ("sync", {"sync_handler_mode": "thread"}),
    ("async", {}),
    ("sync-batch", {"batch_size": 2}),
    ("async-batch", {"batch_size": 2}),
])
def test_an_envelope_its_consumer_gave_up_before_it_was_begun_is_skipped(kind: str, settings: dict[str, Any]) -> None:
    broker = MemoryBroker()
    for n in range(COUNT):
        broker.publish("in", json.dumps({"n": n}).encode())
    engine = make_engine(broker, Connector(broker, GivingUpConsumer), consume_batch_size=4, **settings)
    seen: list[int] = []

    if kind == "sync":
        @engine.stream_app
        def handler(item: Item) -> bool:
            seen.append(item.n)
            return True
    elif kind == "async":
        @engine.stream_app
        async def handler(item: Item) -> bool:
            seen.append(item.n)
            return True
    elif kind == "sync-batch":
        @engine.stream_app
        def handler(items: list[Item]) -> bool:
            seen.extend(item.n for item in items)
            return True
    else:
        @engine.stream_app
        async def handler(items: list[Item]) -> bool:
            seen.extend(item.n for item in items)
            return True

    report = asyncio.run(asyncio.wait_for(handler.run_async(max_messages=COUNT), 30))
    assert sorted(seen) == sorted(set(range(COUNT)) - GIVEN_UP), f"handled {seen}: a given-up message was handled"
    assert report.abandoned == len(GIVEN_UP) and report.acked == COUNT - len(GIVEN_UP), report
