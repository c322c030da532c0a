"""The contract of the dead-letter ports (``volley dlq``): browsing a queue without consuming it, and settling
browsed messages. A mixin beside :class:`ConnectorContract` for connectors that declare ``create_browser``::

    class TestMyBrokerContract(ConnectorContract, BrowsingTests): ...

Messages are produced and browsed with ``queue_spec(name, "dlq")`` (a dead-letter queue's settings), consumed
with the "input" spec.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

from volley.message import Envelope
from volley.ports import BrowsableConnector, Producer, QueueBrowser, SettlingBrowser
from volley.testing.contract.base import ContractBase
from volley.testing.contract.checks import group_by_partition
from volley.testing.contract.draining import bounded

__all__ = ["BrowsingTests"]


def _place(envelope: Envelope) -> tuple[int | None, object]:
    return (envelope.partition, envelope.position)


class BrowsingTests(ContractBase):
    """``QueueBrowser``, ``SettlingBrowser``: reading commits nothing and counts no delivery; settling removes."""

    browse_batch: int = 7
    """``browse`` is asked for this many at a time, so that every test pages through several calls."""

    async def open_browser(self, name: str) -> QueueBrowser:
        connector = self.connector
        assert isinstance(connector, BrowsableConnector), f"{type(connector).__name__} has no create_browser()"
        browser = connector.create_browser(self.spec(name, "dlq"))
        await bounded(browser.start(), self.max_wait_seconds, "QueueBrowser.start()")
        self._browsers = [*getattr(self, "_browsers", []), browser]
        return browser

    async def browse_all(self, browser: QueueBrowser) -> list[Envelope]:
        seen: list[Envelope] = []
        while True:
            batch = await bounded(browser.browse(self.browse_batch), self.max_wait_seconds, "QueueBrowser.browse()")
            assert len(batch) <= self.browse_batch, f"browse({self.browse_batch}) returned {len(batch)} messages"
            if not batch:
                return seen
            seen.extend(batch)

    async def close_browser(self, browser: QueueBrowser) -> None:
        await bounded(browser.close(), self.max_wait_seconds, "QueueBrowser.close()")

    async def contract_teardown(self) -> None:
        for browser in getattr(self, "_browsers", []):
            await bounded(browser.close(), self.max_wait_seconds, "QueueBrowser.close()")
        self._browsers = []
        await super().contract_teardown()

    async def dlq_producer(self, name: str) -> Producer:
        producer = self.connector.create_producer(self.spec(name, "dlq"))
        self._open.append(producer)
        await bounded(producer.start(), self.max_wait_seconds, "Producer.start()")
        return producer

    async def seeded(self, label: str, count: int) -> tuple[str, list[bytes]]:
        name = await self.fresh_queue(label)
        producer = await self.dlq_producer(name)
        messages = [self.outgoing(name, i, key=f"k{i}".encode(), headers={"volley-error-stage": b"handler",
                                                                          "trace": f"t{i}".encode()})
                    for i in range(count)]
        await self.produce_confirmed(producer, messages)
        return name, [m.value for m in messages]

    # ------------------------------------------------------------------ browsing

    async def test_browse_reads_everything_with_key_headers_and_time(self) -> None:
        began = time.time()
        name, values = await self.seeded("browse", self.message_count)
        browser = await self.open_browser(name)
        seen = await self.browse_all(browser)
        assert sorted(e.value for e in seen) == sorted(values), "browse must return each message once"
        assert len({_place(e) for e in seen}) == len(seen), "two browsed messages share a (partition, position)"
        for envelope in seen:
            index = values.index(envelope.value)
            assert envelope.key == f"k{index}".encode(), envelope
            assert (envelope.headers or {}).get("trace") == f"t{index}".encode(), envelope
            if envelope.timestamp is not None:
                assert began - 5 <= envelope.timestamp <= time.time() + 5, f"timestamp out of range: {envelope}"
        for unit in group_by_partition(seen).values():
            assert [values.index(e.value) for e in unit] == sorted(values.index(e.value) for e in unit), \
                "browse must keep the queue's order within a partition"
        assert await browser.browse(self.browse_batch) == [], "browse after the end must stay empty"

    async def test_browse_consumes_nothing(self) -> None:
        name, values = await self.seeded("noconsume", 5)
        browser = await self.open_browser(name)
        browsed = await self.browse_all(browser)
        await self.close_browser(browser)
        again = await self.browse_all(await self.open_browser(name))
        assert {_place(e) for e in again} == {_place(e) for e in browsed}, "a second browser must see it all again"
        consumer = await self.open_consumer(name)
        received = await self.drain(consumer, len(values), ack=True)
        assert {_place(e) for e in received} == {_place(e) for e in browsed}
        if self.counts_attempts:
            assert {e.attempt for e in received} == {1}, "browsing must not count as a delivery"

    async def test_browse_stops_at_the_end_it_saw_at_start(self) -> None:
        name, values = await self.seeded("snapshot", 3)
        browser = await self.open_browser(name)
        producer = await self.dlq_producer(name)
        await self.produce_confirmed(producer, [self.outgoing(name, 99, tag="later")])
        seen = await self.browse_all(browser)
        assert sorted(e.value for e in seen) == sorted(values), "a browse must end at the queue's end at start()"

    # ------------------------------------------------------------------ settling

    async def test_settle_takes_messages_out(self) -> None:
        name, _ = await self.seeded("settle", 6)
        browser = await self.open_browser(name)
        assert isinstance(browser, SettlingBrowser), f"{type(browser).__name__} has no settle()"
        seen = await self.browse_all(browser)
        settled = self.settle_choice(seen)
        await bounded(browser.settle(settled), self.max_wait_seconds, "SettlingBrowser.settle()")
        await self.close_browser(browser)
        left = await self.browse_all(await self.open_browser(name))
        gone = {_place(e) for e in settled}
        assert not gone & {_place(e) for e in left}, "a settled message must not be browsed again"
        expected = {_place(e) for e in seen} - gone
        if browser.removes_each:
            assert {_place(e) for e in left} == expected
            consumer = await self.open_consumer(name)
            received = await self.drain(consumer, len(expected), ack=True)
            assert {_place(e) for e in received} == expected, "a settled message must not be consumed"
        else:
            assert {_place(e) for e in left} == expected

    def settle_choice(self, seen: Sequence[Envelope]) -> list[Envelope]:
        """Some messages to settle: every other one where each can be removed, else the first half of every
        partition (a browser that commits can only pass a prefix)."""
        connector = self.connector
        assert isinstance(connector, BrowsableConnector)
        probe = connector.create_browser(self.spec("probe", "dlq"))
        if not isinstance(probe, SettlingBrowser) or probe.removes_each:
            return list(seen[::2])
        return [e for unit in group_by_partition(seen).values() for e in unit[: len(unit) // 2 + 1]]
