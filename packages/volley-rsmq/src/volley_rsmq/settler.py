"""The RSMQ consumer's settler: a thread that deletes acknowledged messages, makes nacked ones visible again and
extends the visibility of those still being handled (the heartbeat), in batches, retrying what Redis refuses for
a while (see ``volley_rsmq.consumer`` for the whole policy).

The consumer's side queues the work under the shared condition; everything that talks to Redis for settling is
here, on the settler's own thread.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from collections import OrderedDict, deque

import redis

from volley_rsmq._util import ThrottledLog
from volley_rsmq.client import RsmqClient, is_transient
from volley_rsmq.settings import RsmqSettings

logger = logging.getLogger("volley.rsmq")

CHUNK = 1000  # ids per delete transaction / visibility script
RECENTLY_DELETED = 10_000  # deleted ids remembered against a receive that took one again just before its delete


def _resolve(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class Held:
    """A message this consumer received and has not settled yet."""

    __slots__ = ("deadline", "lost", "rc", "received", "since", "spent", "warned")

    def __init__(self, rc: int, deadline: float, received: float) -> None:
        self.rc = rc
        self.deadline = deadline  # monotonic time at which its visibility timeout expires
        self.received = received  # monotonic time of receipt
        # When its handling began, as far as the consumer can tell (the messages handed out before it were all
        # settled or let go): max_extension_seconds counts from here. None: it still waits behind them.
        self.since: float | None = None
        self.lost = False  # received again by someone else: nothing left to extend
        self.spent = False  # held past max_extension_seconds: no longer extended
        self.warned = False


class GivenBack:
    """A message this consumer gave back with a delay (nack) whose delay has not passed yet."""

    __slots__ = ("rc", "reason", "visible_at")

    def __init__(self, rc: int, visible_at: float, reason: str) -> None:
        self.rc = rc  # the receive count its visibility change is (or was last) meant for
        self.visible_at = visible_at  # monotonic time before which it must not be delivered again
        self.reason = reason


Delivery = tuple[str, int]  # (message id, receive count): one delivery of one message
Release = tuple[int, str, list[Delivery]]  # (visible again in ms, reason, deliveries)


class Settler:
    """The consumer's settling thread and what it shares with the consumer's side (which queues the work)."""

    qname: str
    settings: RsmqSettings
    extended: int
    _cond: threading.Condition
    _held: dict[Delivery, Held]
    _deleting: dict[Delivery, Held]
    _recently_deleted: OrderedDict[str, None]
    _to_delete: deque[Delivery]
    _to_release: list[Release]
    _giving_back: dict[str, GivenBack]
    _room_waiters: list[asyncio.Future[None]]
    _busy: int
    _stopping: bool
    _stop_deadline: float
    _let_go_at: float  # monotonic time a held message was last settled, or let go (lost, or past its budget)
    _vt_ms: int
    _trouble: ThrottledLog

    def _wake_room_waiters(self) -> None:
        """Called with ``_cond`` held, from any thread, when room was made in ``_deleting``."""
        waiters, self._room_waiters = self._room_waiters, []
        for waiter in waiters:
            with contextlib.suppress(RuntimeError):  # its loop is closed: nobody waits any more
                waiter.get_loop().call_soon_threadsafe(_resolve, waiter)

    def _settle_loop(self, client: RsmqClient) -> None:
        heartbeat = min(max(self._vt_ms / 4000, 0.05), 10.0)
        next_beat = time.monotonic() + heartbeat
        backoff = self.settings.retry_backoff_seconds
        while True:
            with self._cond:
                while not (self._to_delete or self._to_release or self._stopping):
                    wait = next_beat - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                # One transaction of deletes per turn, so the heartbeat below runs between them however long
                # the queue of deletes is.
                queue = self._to_delete
                deletes = [queue.popleft() for _ in range(min(CHUNK, len(queue)))]
                releases, self._to_release = self._to_release, []
                self._busy = len(deletes) + len(releases)
            try:
                # The heartbeat first, on its own schedule, so that neither a long queue of deletes nor deletes
                # failing again and again keep it from extending what is held or waits for its delete.
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + heartbeat
                    try:
                        self._watch_visibility(client)
                    except Exception as exc:  # only a transient Redis error is retried with the turn's work
                        if isinstance(exc, redis.RedisError) and is_transient(exc):
                            raise
                        logger.exception("extending the visibility of messages of RSMQ queue %r failed", self.qname)
                if deletes:
                    client.delete(self.qname, [message_id for message_id, _ in deletes])
                    self._deleted(deletes)
                    deletes = []
                while releases:
                    vt_ms, reason, pairs = releases[0]
                    for start in range(0, len(pairs), CHUNK):
                        chunk = pairs[start:start + CHUNK]
                        self._given_back(chunk, client.change_visibility(self.qname, vt_ms, chunk, reason))
                    releases.pop(0)
                backoff = self.settings.retry_backoff_seconds
            except Exception as exc:  # anything but a transient Redis error is given up on: the thread goes on
                if not (isinstance(exc, redis.RedisError) and is_transient(exc)):
                    logger.exception(
                        "settling messages of RSMQ queue %r failed for good; %d message(s) will be delivered again "
                        "when their visibility timeout expires", self.qname,
                        len(deletes) + sum(len(pairs) for _, _, pairs in releases))
                    self._deleted(deletes)  # not deleted, but no longer pending either
                else:
                    with self._cond:  # put back what was not done, in front of anything newer
                        self._to_delete.extendleft(reversed(deletes))
                        self._to_release[:0] = releases
                    if time.monotonic() >= self._stop_deadline:
                        self._give_up()
                        return
                    self._trouble.warning(
                        "settling messages of RSMQ queue %r failed, will retry: %s", self.qname, exc)
                    with self._cond:
                        self._cond.wait(backoff)
                    backoff = min(backoff * 2, 1.0, heartbeat)  # a retry never holds back the heartbeat long
            finally:
                with self._cond:
                    self._busy = 0
                    self._cond.notify_all()
            with self._cond:
                if self._stopping and not (self._to_delete or self._to_release):
                    return

    def _deleted(self, deliveries: list[Delivery]) -> None:
        """Forget deliveries whose delete is done (or abandoned) and let waiting acks and receives go on. Their ids
        are remembered for a while: a receive under way meanwhile may have taken one again just before its delete
        (``consumer._not_held`` drops it)."""
        if not deliveries:
            return
        with self._cond:
            deleting, recent = self._deleting, self._recently_deleted
            for delivery in deliveries:
                deleting.pop(delivery, None)
                recent[delivery[0]] = None
            while len(recent) > RECENTLY_DELETED:
                # (an OrderedDict: a plain dict's next(iter()) walks every slot deleted at its front, ~9 us a message)
                recent.popitem(last=False)
            self._wake_room_waiters()

    def _given_back(self, pairs: list[Delivery], lost: list[Delivery]) -> None:
        """Forget the delays of the give-backs Redis applied. One refused as lost stays remembered until its delay
        has passed: the delivery may have been received again by this consumer, whose receive has not been looked
        at yet (``consumer._not_held`` then gives the new delivery back for what is left of the delay)."""
        giving_back = self._giving_back
        if not giving_back:
            return
        with self._cond:
            refused = set(lost)
            for pair in pairs:
                entry = giving_back.get(pair[0])
                if entry is not None and entry.rc == pair[1] and pair not in refused:
                    del giving_back[pair[0]]
            if refused:  # entries refused earlier whose delay is over: nothing left to keep
                now = time.monotonic()
                for message_id in [i for i, entry in giving_back.items() if entry.visible_at <= now]:
                    del giving_back[message_id]

    def _give_up(self) -> None:
        with self._cond:
            left = len(self._deleting) + sum(len(p) for _, _, p in self._to_release)
            self._to_delete.clear()
            self._deleting.clear()
            self._to_release.clear()
            self._giving_back.clear()
            self._wake_room_waiters()
        logger.error(
            "closing RSMQ consumer of %r with %d message(s) not settled (Redis unreachable); they will be "
            "delivered again when their visibility timeout expires", self.qname, left)

    def _watch_visibility(self, client: RsmqClient) -> None:
        """Extend the visibility of messages still being processed past half their vt, or warn (see module doc).

        Acknowledged messages whose delete has not reached Redis yet are always extended: letting them expire
        would only deliver finished work again.
        """
        now = time.monotonic()
        vt = self._vt_ms / 1000
        # (key, (id, current receive count)): a message received again while held keeps its key, the delivery the
        # engine has, and its entry the receive count Redis knows now (consumer._not_held).
        extend: list[tuple[Delivery, Delivery]] = []
        budget = self.settings.max_extension_seconds
        with self._cond:
            for delivery, pending in self._deleting.items():
                if not pending.lost and pending.deadline - now <= vt / 2:
                    extend.append((delivery, (delivery[0], pending.rc)))
            # Handed out in this order, and handled in it as far as the consumer can tell: a message's budget
            # starts once every message before it is settled or let go, not when it was received (one that
            # waited in the engine's buffer behind slower ones would have spent it before its handler began).
            # Once one is let go past its budget (a stuck handler, most likely), every message waiting behind it
            # starts its budget at once rather than one after another: a full buffer is not held for a budget
            # per message.
            behind = stuck = False
            for (message_id, rc), held in self._held.items():
                if held.lost or held.spent:
                    continue
                if held.since is None and (stuck or not behind):
                    held.since = now if stuck else min(now, max(held.received, self._let_go_at))
                behind = True
                if held.deadline - now > vt / 2:
                    continue
                if not self.settings.heartbeat:
                    if held.deadline <= now and not held.warned:
                        held.warned = True
                        logger.warning(
                            "message %s of RSMQ queue %r is still being processed after its visibility timeout "
                            "(%g s); it may be delivered again and processed twice (raise 'vt', or enable "
                            "'heartbeat')", message_id, self.qname, vt)
                    continue
                if held.since is not None and now - held.since >= budget:
                    held.spent = stuck = True
                    self._let_go_at = now
                    logger.warning(
                        "message %s of RSMQ queue %r has been processed for %.0f s, more than "
                        "max_extension_seconds; its visibility is no longer extended and it will be delivered "
                        "again in %.1f s", message_id, self.qname, now - held.since, max(held.deadline - now, 0))
                    continue
                extend.append(((message_id, rc), (message_id, held.rc)))
        if not extend:
            return
        lost: set[Delivery] = set()
        deadline = time.monotonic() + vt  # taken before the scripts run: Redis counts from a later instant
        pairs = [pair for _, pair in extend]
        for start in range(0, len(pairs), CHUNK):
            lost.update(client.change_visibility(self.qname, self._vt_ms, pairs[start:start + CHUNK]))
        redelivered = 0
        with self._cond:
            for delivery, pair in extend:
                message_id = delivery[0]
                current = self._held.get(delivery)
                if current is None:
                    current = self._deleting.get(delivery)
                    if current is None:  # deleted meanwhile
                        continue
                    if current.rc != pair[1]:  # received again meanwhile (consumer._not_held): newer than this
                        continue
                    if pair in lost:
                        current.lost = True
                        redelivered += 1
                    else:
                        current.deadline = deadline
                        self.extended += 1
                    continue
                if current.rc != pair[1]:
                    continue
                if pair in lost:
                    current.lost = True
                    self._let_go_at = max(self._let_go_at, time.monotonic())
                    logger.warning(
                        "message %s of RSMQ queue %r was delivered again (here or elsewhere) before its visibility "
                        "could be extended; it may be processed twice", message_id, self.qname)
                else:
                    current.deadline = deadline
                    self.extended += 1
        if redelivered:
            logger.warning(
                "%d acknowledged message(s) of RSMQ queue %r were delivered again before their delete reached Redis "
                "(their visibility timeout had expired); they may be processed twice", redelivered, self.qname)
