"""Drain detection and liveness: when a run that should stop once its input is drained may stop, and heartbeats.

The input is drained when everything received is settled and acknowledged, nothing is buffered, no
transaction is open, nothing happened for ``drain_idle_seconds``, and the consumer agrees: a consumer that can
tell (``Drainable``) is asked off the loop, at most ten times a second, once a poll came back empty after the
last batch; one whose answer is exact and instant (``InstantlyDrainable``) is asked on the loop right after the
last ack, without waiting for an empty poll. Without either, the empty poll is taken as drained.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from typing import Protocol

from volley.ports import Consumer, DepthReporter, Drainable, InstantlyDrainable, Observer

logger = logging.getLogger("volley")


class RunState(Protocol):
    """What drain detection reads of the run."""

    @property
    def idle(self) -> bool:
        """Nothing in flight, buffered, unacknowledged or in an open transaction, and not stopping."""

    last_received: float
    last_empty_poll: float
    last_poll: float

    @property
    def last_activity(self) -> float: ...

    @property
    def in_flight(self) -> int: ...

    def request_stop(self, error: BaseException | None = None) -> None: ...


class DrainMonitor:
    def __init__(self, state: RunState, consumer: Consumer, observer: Observer, *, app_name: str, source: str,
                 stop_when_drained: bool, drain_idle_seconds: float, observed: bool) -> None:
        self.state = state
        self.observer = observer
        self.app_name = app_name
        self.source = source
        self.stop_when_drained = stop_when_drained
        self.drain_idle_seconds = drain_idle_seconds
        self.instant: InstantlyDrainable | None = consumer if isinstance(consumer, InstantlyDrainable) else None
        self.drainable: Drainable | None = consumer if isinstance(consumer, Drainable) else None
        self.depth: DepthReporter | None = consumer if observed and isinstance(consumer, DepthReporter) else None
        self._next_check = 0.0
        self.check_idle = threading.Event()  # clear while is_drained() runs on a worker thread
        self.check_idle.set()

    def after_ack(self) -> None:
        """The acker flushed: with an instant check, the run may stop right now."""
        if self.instant is not None and self.stop_when_drained and not self.state.in_flight:
            self._stop_if_drained_now()

    async def run(self) -> None:
        """Heartbeats, in-flight and depth metrics every second; the drain check every tick."""
        tick = min(0.05, max(self.drain_idle_seconds / 5, 0.005))
        last_beat = 0.0
        last_beat_progress = -1.0
        state = self.state
        while True:
            await asyncio.sleep(tick)
            now = time.monotonic()
            if now - last_beat >= 1.0:
                last_beat = now
                # A heartbeat means progress, not just a live loop: an idle app that keeps polling, or a busy
                # one that keeps settling. A stuck handler or a hung poll stops the heartbeats.
                if state.last_activity > last_beat_progress or (state.in_flight == 0
                                                                 and state.last_poll > last_beat_progress):
                    self.observer.on_heartbeat(self.app_name)
                last_beat_progress = now
                self.observer.on_in_flight(self.app_name, state.in_flight)
                if self.depth is not None:
                    with contextlib.suppress(Exception):
                        self.observer.on_depth(self.app_name, self.source, await self.depth.depth())
            if not self.stop_when_drained:
                continue
            if self.instant is not None:
                self._stop_if_drained_now()
            elif self._looks_drained(now) and await self._consumer_drained(now):
                logger.info("%s: input drained", self.app_name)
                state.request_stop()

    def _looks_drained(self, now: float) -> bool:
        state = self.state
        return (state.idle and (self.instant is not None or state.last_empty_poll > state.last_received)
                and now - state.last_activity >= self.drain_idle_seconds)

    def _stop_if_drained_now(self) -> None:
        assert self.instant is not None
        if not self._looks_drained(time.monotonic()):
            return
        try:
            drained = self.instant.is_drained_now()
        except Exception as exc:
            logger.debug("%s: is_drained_now() failed: %s", self.app_name, exc)
            return
        if drained:
            logger.info("%s: input drained", self.app_name)
            self.state.request_stop()

    async def _consumer_drained(self, now: float) -> bool:
        check = self.drainable
        if check is None:
            return True
        if now < self._next_check:
            return False
        self._next_check = now + 0.1
        idle = self.check_idle

        def ask() -> bool:
            try:
                return bool(check.is_drained())
            finally:
                idle.set()

        idle.clear()
        try:
            drained = await asyncio.to_thread(ask)
        except Exception as exc:
            logger.debug("%s: is_drained() failed: %s", self.app_name, exc)
            return False
        return drained and self._looks_drained(time.monotonic())

    async def close(self, task: asyncio.Task[None]) -> None:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        if not self.check_idle.is_set():  # a cancelled is_drained() may still be querying the broker
            await asyncio.to_thread(self.check_idle.wait, 15.0)
