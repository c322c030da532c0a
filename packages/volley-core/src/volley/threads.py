"""A daemon thread that runs blocking calls one at a time, in order, and resolves asyncio futures.

Used for sync handlers and by connectors whose client must always be called
from the same thread (librdkafka serves rebalance callbacks on whichever
thread polls). Not a ThreadPoolExecutor: its threads are joined at interpreter
exit, so a call stuck past the shutdown deadline would hang the process.

The calls go through a ``queue.SimpleQueue``: put and get are C calls that allocate no lock object per call,
where a ``threading.Semaphore`` runs a Python-level Condition (and a fresh waiter lock) for every call that
waits. The Kafka fetch thread and the handler thread take one call per batch, so this is on the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class SerialThread:
    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop]
                                       | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.ident = self._thread.ident

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        """Queue ``call``; the returned future (of the running loop) gets its result or exception."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.put((call, future, loop))
        return future

    def _run(self) -> None:
        while True:
            item = self._calls.get()
            if item is None:
                return
            call, future, loop = item
            if future.cancelled():
                continue
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting coroutine
                with contextlib.suppress(RuntimeError):  # that loop is closed
                    loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_result, future, result)

    def stop(self) -> None:
        """Finish the calls already queued, then end the thread."""
        self._calls.put(None)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
