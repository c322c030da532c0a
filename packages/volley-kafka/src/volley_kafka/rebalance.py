"""The Kafka consumer's rebalance half: partitions assigned, revoked and lost.

``RebalanceMixin`` is a base of ``KafkaConsumer`` (consumer.py), which owns and
initialises the state declared below; this module holds the code that acts on a
change of assignment:

- the rebalance callbacks ``_on_assign``, ``_on_revoke`` and ``_on_lost``, which
  the fetch thread runs inside librdkafka's poll (``Fetcher.start`` registers
  them), and the readiness they report to the observer;
- ``_partitions_gone``, their common part on the fetch thread: send the queued
  commits, run the loop half and wait for it (bounded by the revoke timeout plus
  ``REVOKE_GRACE``), hand the final commit to the fetcher, forget the partitions;
- the loop half, ``_release``: the engine's revoke handler, the
  ``_before_release`` hook (exactly-once waits for the open transaction there,
  see transactional.py), the final offsets, and ``_forget``;
- ``_wait_released``: ``consume`` waits there while a loop half the fetch thread
  gave up on is still unwinding.

The table of who owns what, and on which thread, is in consumer.py.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from confluent_kafka import TopicPartition

from volley.ports import Observer, RevokeHandler
from volley_kafka.fetcher import Fetcher, Offsets
from volley_kafka.offsets import OffsetTracker, TopicPartitionKey
from volley_kafka.settings import ConsumerSettings

logger = logging.getLogger("volley_kafka")

REVOKE_GRACE = 5.0
"""How much longer than the revoke timeout the fetch thread waits for the loop's half of a revoke."""


class RebalanceMixin:
    """The rebalance callbacks of ``KafkaConsumer`` (fetch thread) and their half on the event loop."""

    # Set by KafkaConsumer.__init__ (and start(), instrument(), set_revoke_handler()); see consumer.py.
    _what: str
    _settings: ConsumerSettings
    _fetcher: Fetcher
    _tracker: OffsetTracker
    _loop: asyncio.AbstractEventLoop | None
    _revoke_handler: RevokeHandler | None
    _observer: Observer | None
    _app_name: str
    _hard_paused: bool
    _delayed: dict[TopicPartitionKey, asyncio.TimerHandle]
    _held: set[TopicPartitionKey]
    # Written only here (KafkaConsumer.__init__ gives them their first values):
    _ever_assigned: bool  # the group assigned this member partitions at least once (is_drained)
    _releasing: asyncio.Task[Any] | None  # the loop half of a revoke, while it runs

    if TYPE_CHECKING:
        @property
        def transactional(self) -> bool: ...  # KafkaConsumer's capability: offsets commit with a transaction

        def _want_pauses(self) -> None: ...  # KafkaConsumer's: tells the fetch thread the pause state wanted

    # ================================================================== fetch thread

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._fetcher.assigned_now(keys)
        self._ever_assigned = True
        # Runs on the loop before this fetch's messages are registered (call_soon is FIFO).
        self._fetcher.to_loop(self._tracker.forget, keys)
        logger.info("%s: assigned %s", self._what, _describe(keys))
        self._report_ready(True)

    def _report_ready(self, ready: bool) -> None:
        """Tell the observer (fetch thread; the engine's MultiObserver isolates observer failures)."""
        if self._observer is not None and not self._fetcher.closing:
            self._observer.on_ready(self._app_name, ready)

    def _on_revoke(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._partitions_gone(partitions, lost=False)

    def _on_lost(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        self._report_ready(False)  # until the group assigns partitions again
        self._partitions_gone(partitions, lost=True)

    def _partitions_gone(self, partitions: list[TopicPartition], *, lost: bool) -> None:
        """Let the engine finish (or abandon) the partitions' work, commit what is finished, forget them.

        Runs inside librdkafka's poll on the fetch thread; the partitions stay ours until it returns.
        Never raises: an exception here would surface from consume() in the middle of a rebalance.
        """
        fetcher = self._fetcher
        keys = [(tp.topic, tp.partition) for tp in partitions]
        try:
            fetcher.forget_committed()
            if not keys:
                return
            logger.info("%s: partitions %s %s", self._what, _describe(keys), "lost" if lost else "revoked")
            loop = self._loop
            if fetcher.closing or loop is None or loop.is_closed():
                return  # close() made the final commit
            if not lost:
                fetcher.send_commits()  # older than the final commit below, so they must go first
            # The partitions stay assigned until released: an exactly-once commit made while the engine
            # finishes their work must still carry their offsets.
            fetcher.rebalancing = True
            abandoned = threading.Event()
            future = asyncio.run_coroutine_threadsafe(self._release(keys, lost, abandoned), loop)
            try:
                offsets = future.result(self._settings.revoke_timeout + REVOKE_GRACE)
            except concurrent.futures.TimeoutError:
                abandoned.set()
                future.cancel()
                logger.error("%s: releasing %s took longer than %.0f s; giving them up uncommitted", self._what,
                             _describe(keys), self._settings.revoke_timeout)
                offsets = []
                # The loop half did not get to forget them: it does when it can, before any later assignment
                # of them is registered (call_soon is FIFO).
                fetcher.to_loop(self._forget, keys)
            fetcher.given_up(keys, offsets)
        except Exception:
            logger.exception("%s: handling the rebalance failed", self._what)
        finally:
            fetcher.rebalancing = False
            fetcher.release(set(keys))

    # ================================================================== the loop

    async def _release(self, keys: list[TopicPartitionKey], lost: bool,
                       abandoned: threading.Event) -> Offsets:
        """The loop half of a revoke: run the engine's handler, then collect the final offsets and forget.

        ``abandoned``: the fetch thread stopped waiting (and forgets the partitions by itself); the partitions
        may be ours again by now, so nothing of theirs may be touched from here.
        """
        handler = self._revoke_handler
        deadline = time.monotonic() + self._settings.revoke_timeout
        self._releasing = task = asyncio.current_task()
        try:
            if handler is not None:
                try:
                    await asyncio.wait_for(handler(keys), self._settings.revoke_timeout)
                except TimeoutError:
                    logger.warning("%s: in-flight work of %s did not finish within %.0f s; committing what did",
                                   self._what, _describe(keys), self._settings.revoke_timeout)
                except Exception:
                    logger.exception("%s: the engine's revoke handler failed", self._what)
            await self._before_release(max(0.0, deadline - time.monotonic()))
        finally:
            if self._releasing is task:
                self._releasing = None
        if abandoned.is_set():
            return []
        offsets = [] if lost or self.transactional else self._tracker.final(keys)
        self._forget(keys)
        return offsets

    def _forget(self, keys: list[TopicPartitionKey]) -> None:
        """On the loop: drop everything about partitions that are no longer ours (their offsets, attempts and
        pending rewinds with their state; their queued requests are dropped by the fetch thread)."""
        self._tracker.forget(keys)
        dropped = False
        for key in keys:
            handle = self._delayed.pop(key, None)
            if handle is not None:
                handle.cancel()
                dropped = True
        if self._held.intersection(keys):
            self._held.difference_update(keys)
            dropped = True
        if dropped:
            self._want_pauses()

    async def _before_release(self, timeout: float) -> None:
        return None

    async def _wait_released(self, releasing: asyncio.Task[Any]) -> None:
        """On the loop, from ``consume``: a revoke the fetch thread gave up waiting for (it cancelled the loop
        half) is still unwinding. The engine drops every message of the partitions it releases until it
        returns, and the records just fetched may be of a later assignment of the same partitions: they would
        never be handled, and hold the commits back."""
        await asyncio.wait({releasing}, timeout=REVOKE_GRACE)


def _describe(keys: Iterable[TopicPartitionKey]) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(keys)) or "none"
