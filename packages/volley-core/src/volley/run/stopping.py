"""The stop signal of one run, readable from the loop and from the handler thread.

Two stages: ``stopping`` (no new work is fetched and a failing call is not retried any more) and ``abandoned``
(the shutdown deadline passed or shutdown moved on: nothing more is handled, what is left is delivered again).
"""

from __future__ import annotations

import asyncio
import threading


class StopSignal:
    def __init__(self) -> None:
        self.stopping = threading.Event()
        self.abandoned = threading.Event()
        self._loop_event: asyncio.Event | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_event = asyncio.Event()
        if self.stopping.is_set():
            self._loop_event.set()

    def stop(self) -> None:
        """On the loop (or before the run started)."""
        self.stopping.set()
        if self._loop_event is not None:
            self._loop_event.set()

    def abandon(self) -> None:
        self.stop()
        self.abandoned.set()

    @property
    def is_stopping(self) -> bool:
        return self.stopping.is_set()

    async def wait(self, timeout: float) -> bool:
        """On the loop: wait up to ``timeout`` seconds; True if stop was requested meanwhile (or before)."""
        event = self._loop_event
        if event is None or event.is_set():
            return self.stopping.is_set()
        try:
            await asyncio.wait_for(event.wait(), timeout)
        except TimeoutError:
            return False
        return True

    def wait_blocking(self, timeout: float) -> bool:
        """On a thread: the same, blocking."""
        return self.stopping.wait(timeout)
