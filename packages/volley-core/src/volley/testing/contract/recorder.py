"""``DeliveryRecorder``: an ``on_delivery`` callback that keeps every delivery report for assertions."""

from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter
from collections.abc import Sequence
from typing import Any

from volley.message import OutgoingMessage
from volley.ports import DeliveryFailure

__all__ = ["DeliveryRecorder"]


class DeliveryRecorder:
    """A thread-safe ``on_delivery`` callback that keeps every report for assertions.

    Producers may report from any thread (librdkafka's delivery thread, a
    redis client's thread), so everything is guarded by a lock; waiting is a
    poll on the event loop with a deadline, which never blocks a producer that
    reports through the loop.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._delivered: list[OutgoingMessage] = []
        self._failed: list[DeliveryFailure] = []
        self._calls = 0
        self._threads: set[int] = set()

    def __call__(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        with self._lock:
            self._delivered.extend(delivered)
            self._failed.extend(failed)
            self._calls += 1
            self._threads.add(threading.get_ident())

    @property
    def delivered(self) -> list[OutgoingMessage]:
        with self._lock:
            return list(self._delivered)

    @property
    def failed(self) -> list[DeliveryFailure]:
        with self._lock:
            return list(self._failed)

    @property
    def calls(self) -> int:
        with self._lock:
            return self._calls

    @property
    def threads(self) -> set[int]:
        """Identities of the threads that reported (for information: any thread is allowed)."""
        with self._lock:
            return set(self._threads)

    def reported(self) -> int:
        """How many records were reported so far, delivered or failed."""
        with self._lock:
            return len(self._delivered) + len(self._failed)

    def delivered_tokens(self) -> list[Any]:
        return [m.token for m in self.delivered]

    def failed_tokens(self) -> list[Any]:
        return [m.token for m, _ in self.failed]

    async def wait_for(self, count: int, deadline: float) -> bool:
        """Wait until at least ``count`` records were reported; False if ``deadline`` passed first."""
        while self.reported() < count:
            if time.monotonic() >= deadline:
                return False
            await asyncio.sleep(0.005)
        return True

    def assert_all_delivered(self, messages: Sequence[OutgoingMessage]) -> None:
        """Every record was reported delivered exactly once (by token), none failed, nothing else reported."""
        failed = self.failed
        assert not failed, f"{len(failed)} record(s) reported as failed, first: {failed[0]!r}"
        expected = Counter(m.token for m in messages)
        got = Counter(self.delivered_tokens())
        missing = sorted((t for t in expected if got[t] < expected[t]), key=repr)
        extra = sorted((t for t in got if got[t] > expected[t]), key=repr)
        summary = (
            f"delivery reports must name every record exactly once (by its token): "
            f"{len(missing)} never or too rarely reported (first: {missing[:5]}), "
            f"{len(extra)} reported too often or unknown (first: {extra[:5]})"
        )
        assert not missing, summary
        assert not extra, summary
