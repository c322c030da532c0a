"""A single daemon thread that runs blocking librdkafka calls in order and resolves asyncio futures.

Not a ThreadPoolExecutor: its threads are joined at interpreter exit, and one
consumer must always use the same thread (librdkafka serves rebalance callbacks
on whichever thread polls, and they must not overlap with each other).
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


class BlockingWorker:
    def __init__(self, name: str) -> None:
        self._calls: deque[tuple[Callable[[], Any], asyncio.Future[Any], asyncio.AbstractEventLoop] | None] = deque()
        self._ready = threading.Semaphore(0)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()
        self.ident = self._thread.ident

    def submit(self, call: Callable[[], T]) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        self._calls.append((call, future, loop))
        self._ready.release()
        return future

    def _run(self) -> None:
        while True:
            self._ready.acquire()
            item = self._calls.popleft()
            if item is None:
                return
            call, future, loop = item
            if future.cancelled():
                continue
            try:
                result = call()
            except BaseException as exc:  # handed to the awaiting coroutine
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_exception, future, exc)
            else:
                with contextlib.suppress(RuntimeError):
                    loop.call_soon_threadsafe(_set_result, future, result)

    def stop(self) -> None:
        self._calls.append(None)
        self._ready.release()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


def _set_result(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _set_exception(future: asyncio.Future[Any], exc: BaseException) -> None:
    if not future.done():
        future.set_exception(exc)
