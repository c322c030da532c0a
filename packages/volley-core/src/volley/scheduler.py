"""One thread that runs actions when they are due: the memory broker's delayed publishes and delayed nacks.

However many actions are scheduled, they share one daemon thread (a heap of due
times and a Condition), which exists only while there is something to wait for.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from collections.abc import Callable

logger = logging.getLogger("volley.scheduler")

# How long the scheduler thread stays alive with nothing scheduled before it ends (a new delay starts it again).
SCHEDULER_IDLE_SECONDS = 1.0


class Scheduler:
    """Runs actions when they are due, on ONE daemon thread per broker, however many are scheduled.

    The thread starts with the first action scheduled and ends after ``SCHEDULER_IDLE_SECONDS`` with nothing
    scheduled, or at ``close()``. Actions run in due order, one at a time, outside the scheduler's lock.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._condition = threading.Condition()
        self._heap: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()  # ties in due time run in scheduling order, and actions are never compared
        self._thread: threading.Thread | None = None
        self._generation = 0  # close() ends the thread of the current generation

    def schedule(self, delay: float, action: Callable[[], None]) -> None:
        due = time.monotonic() + delay
        with self._condition:
            heapq.heappush(self._heap, (due, next(self._order), action))
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, args=(self._generation,), name=self._name,
                                                daemon=True)
                self._thread.start()
            elif self._heap[0][0] == due:  # the new action is the earliest: the thread must wait less
                self._condition.notify()

    def thread(self) -> threading.Thread | None:
        """The scheduler's thread while it runs (for tests and diagnostics)."""
        with self._condition:
            return self._thread

    def close(self) -> list[Callable[[], None]]:
        """End the thread (waiting for an action in progress) and hand back the actions not yet run."""
        with self._condition:
            pending = [action for _, _, action in sorted(self._heap)]
            self._heap.clear()
            thread, self._thread = self._thread, None
            self._generation += 1
            self._condition.notify_all()
        if thread is not None and thread is not threading.current_thread():
            thread.join()
        return pending

    def _run(self, generation: int) -> None:
        condition = self._condition
        heap = self._heap
        with condition:
            while generation == self._generation:
                if not heap:
                    condition.wait(SCHEDULER_IDLE_SECONDS)
                    if not heap and generation == self._generation:
                        self._thread = None  # idle: end; the next schedule() starts a new thread
                        return
                    continue
                wait = heap[0][0] - time.monotonic()
                if wait > 0:
                    condition.wait(wait)
                    continue
                action = heapq.heappop(heap)[2]
                condition.release()
                try:
                    action()
                except Exception:
                    logger.exception("%s: a scheduled action failed", self._name)
                finally:
                    condition.acquire()
