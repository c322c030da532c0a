"""The RSMQ consumer: batched receives, deletes and visibility changes, all off the event loop.

How a message moves:

- ``consume`` receives up to ``max_messages`` visible messages with one Lua
  script on a worker thread, hiding them for the visibility timeout (``vt``),
  and hands them out as envelopes (``attempt`` = RSMQ's receive count);
- ``ack`` queues the ids for deletion; a settler thread deletes them in
  transactions of up to 1000 (PyRSMQ's deleteMessage layout), so a burst of
  acks costs one round trip per thousand. The queue of acknowledged messages
  not deleted yet is bounded (``max_pending_deletes``): at its bound ``ack``
  waits for room (backpressure into the engine's ack path) and ``consume``
  receives nothing, for as long as ``close_timeout_seconds`` (after that an
  ack queues its deletes anyway, with a warning: Redis is failing, and
  ``consume`` still refuses to add to the backlog). Until its delete reaches
  Redis an acknowledged message keeps being extended like a held one, so it
  is never delivered again, whatever ``heartbeat`` says;
- ``nack`` (and ``nack_with_reason``) make the messages visible again after
  the engine's backoff, instead of after the whole ``vt``; the reason is kept
  in Redis and comes back with the next delivery as the ``volley-last-error``
  header, so a message that ends in the dead-letter queue after too many
  deliveries carries its last error;
- ``close`` makes every message still held visible at once and waits (up to
  ``close_timeout_seconds``) for queued deletes. A receive that Redis answers
  after ``close`` stopped waiting for it makes its messages visible again at
  once instead of handing them out.

Visibility-timeout policy (``heartbeat: true``, the default): a message whose
handler still runs when half its ``vt`` has passed gets its visibility
extended by another ``vt``, for at most ``max_extension_seconds`` of handling,
counted from when every message handed out before it was settled or let go
(the consumer cannot see a handler start; the engine begins messages in the
order it receives them), not from its receipt: one that waited in the engine's
buffer behind slower ones keeps its whole budget; past that a warning is logged and the message is left to expire (it
will then be delivered again: at-least-once). With ``heartbeat: false`` no
extension happens and a warning is logged when a held message's ``vt``
expires, since it may then be processed twice.

Redis errors never stop the consumer: a failed receive returns nothing (with
a throttled warning) and is retried on the next call; deletes and visibility
changes that fail with an error that may pass (``client.is_transient``:
connection trouble, READONLY, OOM, BUSY, ...) are retried with backoff until
they succeed or ``close`` gives up on them (those messages are then delivered
again); any other error reply drops them with an error log.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import OrderedDict, deque
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor

import redis

from volley.errors import ConfigurationError
from volley.message import Envelope
from volley.ports import Observer
from volley_rsmq import envelope as envelope_codec
from volley_rsmq._util import ThrottledLog, connect
from volley_rsmq.client import Received, ReceiveResult, RsmqClient, is_transient, sent_time
from volley_rsmq.settings import VT_DEFAULT, RsmqSettings
from volley_rsmq.settler import CHUNK, Delivery, GivenBack, Held, Release, Settler

logger = logging.getLogger("volley.rsmq")

LAST_ERROR_HEADER = "volley-last-error"


class RsmqConsumer(Settler):
    """Consumes one RSMQ queue. Thread-safe settling; every Redis call runs on a worker thread."""

    def __init__(self, qname: str, settings: RsmqSettings) -> None:
        self.qname = qname
        self.settings = settings
        self._client: RsmqClient | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._settler: threading.Thread | None = None
        self._cond = threading.Condition()
        # Keyed by delivery, (id, receive count): the same consumer may receive a message again once its vt
        # expired, and settling the older delivery must not touch the newer one.
        self._held: dict[Delivery, Held] = {}
        # Acknowledged, delete queued or under way: kept hidden by the heartbeat until the delete is done.
        self._deleting: dict[Delivery, Held] = {}
        self._recently_deleted: OrderedDict[str, None] = OrderedDict()  # ids deleted lately (settler._deleted)
        self._to_delete: deque[Delivery] = deque()
        self._to_release: list[Release] = []
        # Given back with a delay not over yet, by id: a receive of this consumer that took one again (its vt
        # passed) before the give-back reached Redis must not hand it out, but give it back for the rest of it.
        self._giving_back: dict[str, GivenBack] = {}
        self._max_pending = settings.max_pending_deletes
        self._room_waiters: list[asyncio.Future[None]] = []  # ack/consume calls waiting for room in _deleting
        self._busy = 0  # settles taken by the settler and not finished yet
        self._stopping = False
        self._stop_deadline = float("inf")
        self._let_go_at = 0.0
        self._closed = False
        self._vt_ms = 0
        self._last_receive_empty = False
        self._receive_backoff = 0.0
        self._last_remaining = -1
        self._unwrap = settings.headers == "envelope"
        self._trouble = ThrottledLog()
        self._backlog_warning = ThrottledLog()  # its own throttle: the settler's retries must not hide it
        self._observer: Observer | None = None
        self._app_name = ""
        self._last_visible = 0
        self._next_depth_report = 0.0
        self.extended = 0  # visibility extensions done (for tests and metrics)
        self.received_again = 0  # messages received again while this consumer still held them (not handed out)
        self.over_bound = 0  # acks queued beyond max_pending_deletes after waiting close_timeout_seconds

    # ------------------------------------------------------------------ lifecycle

    def instrument(self, observer: Observer, app_name: str) -> None:
        """Report the queue's depth (visible messages, as counted by each receive) at most once a second."""
        self._observer = observer
        self._app_name = app_name

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"volley-rsmq-recv-{self.qname}")
        self._client = RsmqClient(self.settings)
        await loop.run_in_executor(self._executor, self._start_blocking)
        self._settler = threading.Thread(target=self._settle_loop, args=(self._client,),
                                         name=f"volley-rsmq-settle-{self.qname}", daemon=True)
        self._settler.start()

    def _start_blocking(self) -> None:
        client = self._require_client()
        connect(client, self.settings.connect_timeout_seconds)
        if client.create_queue(self.qname):
            logger.info("created RSMQ queue %r", self.qname)
        vt = self.settings.vt
        if vt is None:
            vt = client.queue_vt(self.qname)
            if vt is None:  # a queue hash without "vt" (not made by an RSMQ client): RSMQ's default
                vt = VT_DEFAULT
            elif vt <= 0:
                raise ConfigurationError(
                    f"RSMQ queue {self.qname!r} was created with vt={vt:g}: its messages are never hidden once "
                    "received, so every poll would deliver the messages being handled again; set 'vt' (seconds, "
                    "greater than 0) in this queue's config to consume it with a visibility timeout of its own")
        self._vt_ms = max(1, round(vt * 1000))

    def _require_client(self) -> RsmqClient:
        if self._client is None:
            raise RuntimeError("RsmqConsumer.start() was not called")
        return self._client

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.close_timeout_seconds
        if self._executor is not None:  # a receive whose poll was cancelled must land in _held before the release
            shutdown = loop.run_in_executor(None, self._executor.shutdown, True)
            await asyncio.wait({shutdown}, timeout=max(0.0, give_up_at - loop.time()))
        with self._cond:
            self._stopping = True
            self._stop_deadline = time.monotonic() + self.settings.close_timeout_seconds
            abandoned = [(delivery[0], held.rc) for delivery, held in self._held.items() if not held.lost]
            self._held.clear()
            if abandoned:
                # Not finished by the engine: let another consumer have them now rather than after their vt.
                self._to_release.append((0, "", abandoned))
            self._cond.notify_all()
        settler = self._settler
        if settler is not None:  # a call Redis never answers must not hold close past its deadline
            await loop.run_in_executor(None, settler.join, max(0.0, give_up_at - loop.time()) + 0.5)
            if settler.is_alive():
                self._give_up()
        with self._cond:
            self._wake_room_waiters()
        if self._client is not None:
            self._client.close()  # disconnects in-use sockets too: a blocked call ends with an error

    # ------------------------------------------------------------------ consuming

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        loop = asyncio.get_running_loop()
        executor = self._executor
        if executor is None:
            raise RuntimeError("RsmqConsumer.start() was not called")
        deadline = loop.time() + max(timeout, 0.0)
        poll = self.settings.poll_interval_seconds
        pause = min(0.002, poll)
        while True:
            if not await self._wait_for_room(deadline):  # the delete queue is full: do not add to the backlog
                return []
            envelopes = await loop.run_in_executor(executor, self._receive, max(1, max_messages))
            if envelopes is None:  # Redis trouble: back off, doubling across calls up to 1 s
                self._receive_backoff = min(1.0, max(self._receive_backoff * 2, self.settings.retry_backoff_seconds))
                await asyncio.sleep(max(0.0, min(self._receive_backoff, deadline - loop.time())))
                return []
            self._receive_backoff = 0.0
            if self._observer is not None and loop.time() >= self._next_depth_report:
                self._next_depth_report = loop.time() + 1.0
                self._observer.on_depth(self._app_name, self.qname, self._last_visible)
            if envelopes or self._stopping:
                return envelopes
            remaining = deadline - loop.time()
            if remaining <= 0:
                return envelopes
            await asyncio.sleep(min(pause, remaining))
            pause = min(pause * 2, max(poll, pause))

    def _receive(self, max_messages: int) -> list[Envelope] | None:
        client = self._require_client()
        try:
            result = client.receive(self.qname, max_messages, self._vt_ms)
            if result.queue_missing:  # deleted, or a server restarted without persistence
                client.create_queue(self.qname)
                logger.warning("RSMQ queue %r had vanished from Redis and was created again", self.qname)
                result = client.receive(self.qname, max_messages, self._vt_ms)
        except redis.RedisError as exc:
            if not is_transient(exc):
                raise
            self._last_receive_empty = False
            self._trouble.warning("receiving from RSMQ queue %r failed, will retry: %s", self.qname, exc)
            return None
        return self._envelopes(result)

    def _envelopes(self, result: ReceiveResult) -> list[Envelope]:
        now = time.monotonic()
        deadline = now + result.vt_ms / 1000
        qname = self.qname
        unwrap = self._unwrap
        envelopes: list[Envelope] = []
        held: list[tuple[tuple[str, int], Held]] = []
        messages = result.messages
        if any(message.rc > 1 for message in messages):  # received before: maybe by this consumer, still held
            messages = self._not_held(messages, deadline)
        for message in messages:
            value, key, headers = message.body, None, None
            if unwrap:
                value, key, headers = envelope_codec.unwrap(value)
            if message.last_error is not None:
                headers = dict(headers or {})
                headers[LAST_ERROR_HEADER] = message.last_error
            envelopes.append(
                Envelope(value, key, headers, qname, None, message.id, sent_time(message.id), message.rc, message.id)
            )
            held.append(((message.id, message.rc), Held(message.rc, deadline, now)))
        with self._cond:
            late = self._stopping  # close() stopped waiting for this receive and has released what it held
            if not late:
                self._held.update(held)
                self._last_receive_empty = not envelopes
                self._last_remaining = result.remaining
                self._last_visible = result.visible
        if late:
            self._give_back_late([delivery for delivery, _ in held])
            return []
        return envelopes

    def _give_back_late(self, deliveries: list[Delivery]) -> None:
        """Make visible at once the messages of a receive answered after ``close`` gave up waiting for it: nobody
        will hand them out, and they would stay hidden for their whole ``vt``. One attempt, on the receive thread
        (the settler has stopped); if it fails they come back after their ``vt``."""
        if not deliveries:
            return
        try:
            for start in range(0, len(deliveries), CHUNK):
                self._require_client().change_visibility(self.qname, 0, deliveries[start:start + CHUNK])
        except redis.RedisError as exc:
            logger.warning("RSMQ queue %r: %d message(s) received after close could not be made visible again (%s); "
                           "they will be delivered again when their visibility timeout expires", self.qname,
                           len(deliveries), exc)
            return
        logger.info("RSMQ queue %r: %d message(s) received after close were made visible again", self.qname,
                    len(deliveries))

    def _not_held(self, messages: list[Received], deadline: float) -> list[Received]:
        """The messages this consumer does not hold already. One it holds came back because its ``vt`` passed
        while it waited in the engine's buffer or was being handled (``heartbeat: false``, or a heartbeat too
        late): the engine has it, so it is not handed out a second time; the delivery it holds now counts (its
        receive count, and its new ``vt``) for what is done with it next. One it gave back with a delay that has
        not passed (its give-back reached Redis after this receive, and was refused) is given back again, under
        its new receive count, for the rest of that delay."""
        with self._cond:
            holding = {delivery[0]: entry for delivery, entry in self._held.items() if not entry.lost}
            holding.update((delivery[0], entry) for delivery, entry in self._deleting.items() if not entry.lost)
            deleted, giving_back = self._recently_deleted, self._giving_back
            now = time.monotonic()
            fresh = []
            for message in messages:
                entry = holding.get(message.id)
                if entry is None:
                    given = giving_back.pop(message.id, None) if giving_back else None
                    if given is not None and given.visible_at > now and message.rc > given.rc:
                        given.rc = message.rc
                        giving_back[message.id] = given
                        self._to_release.append((max(1, round((given.visible_at - now) * 1000)), given.reason,
                                                 [(message.id, message.rc)]))
                        self._cond.notify()
                    elif message.id not in deleted:  # (acked and deleted while this receive was under way)
                        fresh.append(message)
                    continue
                entry.rc, entry.deadline, entry.warned = message.rc, deadline, False
                self.received_again += 1
            return fresh

    # ------------------------------------------------------------------ settling

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        """Queue the deletes, waiting for room while ``max_pending_deletes`` are queued (see the module doc)."""
        if not envelopes:
            return
        loop = asyncio.get_running_loop()
        give_up_at = loop.time() + self.settings.close_timeout_seconds
        done = 0
        while True:
            with self._cond:
                room = len(envelopes) - done
                if loop.time() < give_up_at and not self._stopping:
                    room = min(room, self._max_pending - len(self._deleting))
                else:
                    self.over_bound += max(0, min(room, len(self._deleting) + room - self._max_pending))
                if room > 0:
                    now = time.monotonic()
                    held, deleting, queue = self._held, self._deleting, self._to_delete
                    for env in envelopes[done:done + room]:
                        delivery = (env.position, env.attempt)
                        entry = held.pop(delivery, None)
                        if entry is None:  # not (or no longer) held here: delete it, nothing to extend
                            entry = Held(env.attempt, now, now)
                            entry.lost = True
                        deleting[delivery] = entry
                        queue.append(delivery)
                    done += room
                    self._let_go_at = now
                    self._cond.notify()
                if done >= len(envelopes):
                    return
            if not await self._wait_for_room(give_up_at):
                self._backlog_warning.warning(
                    "RSMQ queue %r: %d acknowledged message(s) still wait for their delete after %g s "
                    "(close_timeout_seconds); Redis is not keeping up, queuing more deletes beyond "
                    "max_pending_deletes (%d)", self.qname, len(self._deleting), self.settings.close_timeout_seconds,
                    self._max_pending)

    async def _wait_for_room(self, until: float) -> bool:
        """Wait until fewer than ``max_pending_deletes`` deletes are pending, or the loop's time ``until``."""
        loop = asyncio.get_running_loop()
        while True:
            remaining = until - loop.time()
            with self._cond:
                if len(self._deleting) < self._max_pending or self._stopping:
                    return True
                if remaining <= 0:
                    return False
                waiter: asyncio.Future[None] = loop.create_future()
                self._room_waiters.append(waiter)
            try:
                await asyncio.wait_for(waiter, remaining)
            except TimeoutError:
                with self._cond:
                    if waiter in self._room_waiters:
                        self._room_waiters.remove(waiter)

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        await self.nack_with_reason(envelopes, delay, "")

    async def nack_with_reason(self, envelopes: Sequence[Envelope], delay: float, reason: str) -> None:
        """Like ``nack``, and remember ``reason`` (the handler's error) for the next delivery's headers."""
        if not envelopes:
            return
        delay_ms = max(0, round(delay * 1000))
        with self._cond:
            pairs = []
            now = time.monotonic()
            visible_at = now + delay_ms / 1000
            self._let_go_at = now
            for env in envelopes:
                held = self._held.pop((env.position, env.attempt), None)
                if held is not None and not held.lost:
                    pairs.append((env.position, held.rc))
                    if delay_ms:
                        self._giving_back[env.position] = GivenBack(held.rc, visible_at, reason)
            if pairs:
                self._to_release.append((delay_ms, reason, pairs))
                self._cond.notify()

    # ------------------------------------------------------------------ introspection

    def is_drained(self) -> bool:
        """Nothing left now or later: the last receive found nothing, the queue is empty, nothing is unsettled."""
        with self._cond:
            return (
                self._last_receive_empty
                and self._last_remaining == 0
                and not self._held
                and not self._deleting
                and not self._to_delete
                and not self._to_release
                and not self._busy
            )

    def held_count(self) -> int:
        with self._cond:
            return len(self._held)

    def pending_deletes(self) -> int:
        """Acknowledged messages whose delete has not reached Redis yet (at most ``max_pending_deletes``)."""
        with self._cond:
            return len(self._deleting)

    async def depth(self) -> int:
        """Messages visible in the queue now (not counting those held by consumers or delayed)."""
        loop = asyncio.get_running_loop()
        client = self._require_client()
        _, visible = await loop.run_in_executor(self._executor, client.depth, self.qname)
        return visible

    async def settled(self, timeout: float) -> None:
        """Wait until every queued delete and visibility change reached Redis (tests, graceful hand-over)."""

        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(
                    lambda: not (self._deleting or self._to_delete or self._to_release or self._busy), timeout)

        if not await asyncio.get_running_loop().run_in_executor(None, wait):
            raise TimeoutError(f"RSMQ consumer of {self.qname!r} did not settle within {timeout} s")
