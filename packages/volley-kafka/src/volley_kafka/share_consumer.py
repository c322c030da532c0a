"""The share-group consumer (Kafka queues, KIP-932): records acquired under a lock, settled one by one.

A share consumer hands out a batch of records per poll and must have every one of them acknowledged before it
polls again; a handle is not thread-safe. So this consumer keeps a small pool of members (``volley.share.consumers``,
3 by default), each a librdkafka share consumer owned by one thread, each with its own batch in flight: while one
member waits for a slow record, the others fetch and hand out more, and async handlers run up to
``max_in_flight`` at once. A member polls again as soon as its whole batch is settled.

Settling: ack = ACCEPT, nack = RELEASE (the broker redelivers the record, to any member, and counts the delivery);
a record past ``max_deliveries`` goes to the dead-letter queue first and is ACCEPTed once the DLQ confirmed it
(the engine acks it then). REJECT, which archives (drops) a record, is never used. ``Envelope.attempt`` is the
broker's delivery count.

Records whose lock expires before they are settled (a handler slower than the group's
``share.record.lock.duration.ms``) go back to the group: the broker hands them out again, to this worker or
another, and the first copy's outputs are produced all the same: a duplicate. Nothing is lost. The late
acknowledgement is refused by the broker when another member holds the record by then, and accepted when it was
settled meanwhile; so the consumer also compares, per batch, the time since its poll with the group's lock
duration (read at start). Both are counted (``late_acks``, ``refused_acks``) and logged as possible duplicates.

A member gives up its batch once the group's lock has certainly expired on it (the time since its poll returned is
past the lock duration): the broker no longer counts those records as the member's, and a member stuck waiting
for a slow record's ack could not poll again. Every copy of a slow record the broker hands out again would hold up
one more member, until none consumed anything. So, before members are polled, such a member drops its records
(a later ack or nack of one is a no-op), sends RELEASE for them on its thread (usually refused: the broker took
them back already) and polls again. Records it had not handed out yet are never handed out (the broker has them
again); the ones handed out are counted in ``late_acks`` and logged as possible duplicates.

Closing releases every record still unsettled, so that another member gets it at once instead of after its lock.

Threads: each member's client is only called on its own thread (polls, acknowledgements, commits, close). The
event loop owns the bookkeeping (which records each member holds, which wait to be handed out).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import confluent_kafka
from confluent_kafka import AcknowledgeType, KafkaError, KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported without __all__ in 2.16
    AdminClient,
    ConfigResource,
    ResourceType,
)

from volley.errors import ConfigurationError, ConsumerFailedError
from volley.message import Envelope
from volley.ports import QueueSpec
from volley_kafka.clients import admin_config, cluster_metadata, is_fatal, log_client_error, make_client, with_callbacks
from volley_kafka.share_settings import ShareSettings
from volley_kafka.worker import BlockingWorker

logger = logging.getLogger("volley_kafka")

POLL_SLICE = 0.2
"""Longest single wait inside librdkafka, so that close is served promptly."""
LOG_INTERVAL = 30.0
CLOSE_TIMEOUT = 4.0
"""How long close waits for one member's librdkafka close (it runs for every member at once)."""
RecordKey = tuple[str, int, int]


class _Member:
    """One share consumer and the thread that calls it; its batch in flight is kept on the event loop."""

    def __init__(self, index: int, client: Any, name: str) -> None:
        self.index = index
        self.client = client
        self.worker = BlockingWorker(name)
        self.held: dict[RecordKey, Any] = {}  # acquired and not yet settled (handed out or not)
        self.waiting: deque[Envelope] = deque()  # acquired, not yet handed out
        self.poll: asyncio.Future[list[Any]] | None = None
        self.polled_at = 0.0  # when the poll slice that acquired the records held began (their locks began no earlier)
        self.acquired_at = 0.0  # when that poll returned (their locks began no later)
        self.closed = False

    @property
    def idle(self) -> bool:
        return not self.held and self.poll is None and not self.closed


class ShareKafkaConsumer:
    """Consumes one topic (or a comma-separated list) as members of a share group. See the module docstring."""

    def __init__(self, queue: QueueSpec, settings: ShareSettings) -> None:
        self._queue = queue
        self._settings = settings
        self._what = f"Kafka share consumer of queue {queue.name!r} ({queue.value})"
        self._members: list[_Member] = []
        for index in range(settings.consumers):
            config = with_callbacks(settings.librdkafka, error_cb=self._on_error)
            client = make_client(config, self._what, confluent_kafka.ShareConsumer)
            client.set_acknowledgement_commit_callback(self._on_acknowledged)
            self._members.append(_Member(index, client, f"volley-kafka-share-{queue.name}-{index}"))
        self._changed: asyncio.Event | None = None
        self._fatal: KafkaError | None = None
        self._closing = False
        self._closed = False
        self._started = False
        self._logged: dict[str, float] = {}
        self._lock_seconds: float | None = None  # the group's share.record.lock.duration.ms, read at start
        self._delivery_limit = settings.delivery_limit  # the group's share.delivery.count.limit (read at start)
        self.archived = 0
        """Records given back (RELEASE) on their last delivery: the broker archives them, so they are lost."""
        self.late_acks = 0
        """Records settled after their lock had expired: the broker had handed them out again (or will), so
        each is a possible duplicate. Counted on the loop, when the group's lock duration is known."""
        self.refused_acks = 0
        """Records whose acknowledgement the broker refused (their lock had expired and another member holds
        them): each is a possible duplicate. Counted on the members' threads."""

    # ================================================================== lifecycle

    async def start(self) -> None:
        self._changed = asyncio.Event()
        timeout = self._settings.startup_timeout
        if timeout > 0:
            await asyncio.to_thread(self._check_brokers, timeout)
        for member in self._members:
            try:
                await member.worker.submit(functools.partial(member.client.subscribe, list(self._settings.topics)))
            except KafkaException as exc:
                raise ConfigurationError(f"{self._what}: cannot subscribe: {exc}") from None
        self._started = True
        logger.info("%s: subscribed to %s as share group %r with %d members", self._what,
                    ", ".join(self._settings.topics), self._settings.group_id, len(self._members))

    def _check_brokers(self, timeout: float) -> None:
        """A throwaway admin client: no broker answering is a start-up error, a missing topic a warning; then the
        group's own settings (see _check_group)."""
        admin = make_client(with_callbacks(admin_config(self._settings.librdkafka)), self._what, AdminClient)
        metadata = cluster_metadata(admin, self._what, self._settings.librdkafka.get("bootstrap.servers"), timeout)
        missing = [t for t in self._settings.topics if t not in metadata.topics or metadata.topics[t].error]
        if missing:
            logger.warning("%s: topic(s) %s do not exist (yet); consuming will start once they are created",
                           self._what, ", ".join(missing))
        self._check_group(admin, timeout)

    def _check_group(self, admin: Any, timeout: float) -> None:
        """The group's effective settings (its own, else the broker's): a delivery count limit below the one the
        queue declares (volley.share.delivery.limit) would archive records before the engine dead-letters them,
        so it fails the start; the lock duration is kept to spot records settled after their lock expired."""
        group = self._settings.group_id
        try:
            future = admin.describe_configs([ConfigResource(ResourceType.GROUP, group)])
            configs = next(iter(future.values())).result(timeout)
        except Exception as exc:  # an ACL, an older broker: the group's settings stay unknown
            logger.info("%s: cannot read share group %r's settings (%s); the delivery count limit is taken to be "
                        "%d (volley.share.delivery.limit)", self._what, group, exc, self._settings.delivery_limit)
            return
        values = {name: entry.value for name, entry in configs.items()}
        lock_ms = _integer(values.get("share.record.lock.duration.ms"))
        self._lock_seconds = lock_ms / 1000.0 if lock_ms is not None else None
        limit = _integer(values.get("share.delivery.count.limit"))
        declared = self._settings.delivery_limit
        if limit is not None:
            self._delivery_limit = limit
        if limit is not None and limit < declared:
            raise ConfigurationError(
                f"{self._what}: share group {group!r} gives up on a record after {limit} deliveries (its "
                f"share.delivery.count.limit), but the queue declares {declared} (volley.share.delivery.limit): "
                f"the broker would archive a failing record before the dead-letter queue gets it. Set "
                f"volley.share.delivery.limit to {limit}, or raise the group's limit (docs: Kafka share groups)"
            )
        if str(values.get("share.auto.offset.reset", "")).lower() == "latest":
            logger.info("%s: share group %r starts at the end of its topics (share.auto.offset.reset=latest): "
                        "records written before it first fetched are not delivered", self._what, group)

    async def close(self) -> None:
        """Release what is unsettled (another member gets it at once), then close every member."""
        if self._closed:
            return
        self._closed = True
        self._closing = True
        if not self._started:
            for member in self._members:
                await asyncio.to_thread(self._close_member, member)
                member.worker.stop()
            return
        polls = [m.poll for m in self._members if m.poll is not None]
        if polls:
            await asyncio.wait(polls, timeout=POLL_SLICE + 5.0)
        # Members holding nothing leave first: a member still in the group when another releases its records
        # could acquire them in a fetch of its own and release them again as it closes, counting a delivery
        # that no handler saw.
        holding = [m for m in self._members if m.held]
        idle = [m for m in self._members if not m.held]
        for group in (idle, holding):
            await asyncio.gather(*(self._close_on_thread(m) for m in group))

    async def _close_on_thread(self, member: _Member) -> None:
        unsettled = list(member.held.values())
        member.held.clear()
        member.waiting.clear()
        member.closed = True
        try:
            if unsettled:
                await member.worker.submit(functools.partial(self._release, member, unsettled))
            closing = member.worker.submit(functools.partial(self._close_member, member))
            try:
                await asyncio.wait_for(asyncio.shield(closing), CLOSE_TIMEOUT)
            except TimeoutError:
                # librdkafka 2.16's share consumer (a preview) can hang in close() when it closes right after it
                # joined. Its records were released above; the broker drops the member when its session ends.
                logger.warning("%s: member %d did not close within %.0f s; leaving it behind (the broker ends its "
                               "session)", self._what, member.index, CLOSE_TIMEOUT)
        finally:
            member.worker.stop()

    def _archived(self, messages: list[Any]) -> None:
        """Records released on their last delivery are archived by the broker: say they are lost, loudly."""
        last = [m for m in messages if (m.delivery_count() or 1) >= self._delivery_limit]
        if not last:
            return
        self.archived += len(last)
        logger.error("%s: %d record(s) given back on their last delivery (the group's share.delivery.count.limit "
                     "is %d): the broker archives them, so they are lost and were not dead-lettered: %s",
                     self._what, len(last), self._delivery_limit,
                     ", ".join(f"{m.topic()}[{m.partition()}]@{m.offset()}" for m in last[:10]))

    def _release(self, member: _Member, unsettled: list[Any]) -> None:
        """On the member's thread: give back what it holds, and wait (briefly) for the broker to take it."""
        self._archived(unsettled)
        self._acknowledge(member, unsettled, AcknowledgeType.RELEASE)
        try:
            member.client.commit_sync(CLOSE_TIMEOUT)
        except (confluent_kafka.IllegalStateException, KafkaException) as exc:
            logger.warning("%s: member %d: releasing %d record(s) at close: %s; they come back when their lock "
                           "expires", self._what, member.index, len(unsettled), exc)

    def _close_member(self, member: _Member) -> None:
        """On the member's thread. librdkafka's close sends pending acknowledgements and leaves the group."""
        try:
            member.client.close()
        except (KafkaException, RuntimeError) as exc:
            logger.warning("%s: closing member %d: %s", self._what, member.index, exc)

    # ================================================================== consuming

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        """Hand out what members hold; else poll every idle member and wait (up to ``timeout``) for records
        or for a member to become idle. A poll that outlives this call is collected by the next one."""
        if self._fatal is not None:
            raise ConsumerFailedError(f"{self._what}: fatal Kafka error: {self._fatal.str()}; the consumer cannot "
                                      "work any more: restart the process")
        if not self._started or self._changed is None:
            raise RuntimeError(f"{self._what} is not started")
        count = max(1, max_messages)
        deadline = time.monotonic() + max(0.0, timeout)
        while True:
            self._give_up_expired()
            out = self._hand_out(count)
            if out or self._closing:
                return out
            self._changed.clear()
            for member in self._members:
                if member.idle:
                    self._start_poll(member, max(0.0, deadline - time.monotonic()))
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return self._hand_out(count)
            try:
                await asyncio.wait_for(self._changed.wait(), remaining)
            except TimeoutError:
                return self._hand_out(count)

    def _give_up_expired(self) -> None:
        """Members whose batch's lock has expired give it up and may poll again (see the module docstring)."""
        lock = self._lock_seconds
        if lock is None or self._closing:
            return
        now = time.monotonic()
        for member in self._members:
            if member.poll is not None or member.closed or not member.held or now - member.acquired_at <= lock:
                continue
            records = list(member.held.values())
            unsent = len(member.waiting)
            handed_out = len(records) - unsent
            member.held.clear()
            member.waiting.clear()
            self.late_acks += handed_out
            self._archived(records)  # past their lock on their last delivery: the broker archived them
            self._log_once("expired", "%s: member %d gave up %d record(s) %.1f s after it acquired them, past the "
                           "group's record lock (%.1f s), so that it polls again; the broker hands them out again: "
                           "%d still being handled are possible duplicates (a handler slower than "
                           "share.record.lock.duration.ms), %d not handed out yet are left to the group",
                           self._what, member.index, len(records), now - member.acquired_at, lock, handed_out,
                           unsent)
            # Queued on the member's thread before its next poll: release first, then poll.
            release = member.worker.submit(functools.partial(self._acknowledge, member, records,
                                                             AcknowledgeType.RELEASE))
            release.add_done_callback(functools.partial(self._released, member))

    def _released(self, member: _Member, release: asyncio.Future[None]) -> None:
        if not release.cancelled() and release.exception() is not None:
            self._log_once("expired-release", "%s: member %d: releasing records past their lock failed: %s",
                           self._what, member.index, release.exception())

    def _hand_out(self, count: int) -> list[Envelope]:
        out: list[Envelope] = []
        for member in self._members:
            waiting = member.waiting
            while waiting and len(out) < count:
                out.append(waiting.popleft())
            if len(out) >= count:
                break
        return out

    def _start_poll(self, member: _Member, timeout: float) -> None:
        member.polled_at = time.monotonic()
        poll = member.worker.submit(functools.partial(self._poll, member, timeout))
        member.poll = poll
        poll.add_done_callback(functools.partial(self._polled, member))

    def _poll(self, member: _Member, timeout: float) -> list[Any]:
        """On the member's thread: the first batch within ``timeout`` (which also sends pending acknowledgements)."""
        deadline = time.monotonic() + timeout
        client = member.client
        while True:
            # The records a slice acquires are locked from within it: their lock began no earlier than this (the
            # late-ack check compares with it; the start of the whole poll would make a quick ack look late).
            member.polled_at = time.monotonic()
            batch = client.poll(min(POLL_SLICE, max(0.0, deadline - time.monotonic())))
            if batch or self._closing or time.monotonic() >= deadline:
                return list(batch)

    def _polled(self, member: _Member, poll: asyncio.Future[list[Any]]) -> None:
        """On the loop: the member's new batch becomes its records held and waiting."""
        member.poll = None
        member.acquired_at = time.monotonic()
        if self._changed is not None:
            self._changed.set()
        if poll.cancelled():
            return
        error = poll.exception()
        if error is not None:
            self._log_once("poll", "%s: member %d: polling failed: %s", self._what, member.index, error)
            return
        topic = self._settings.topics[0] if len(self._settings.topics) == 1 else None
        held, waiting = member.held, member.waiting
        index = member.index
        for m in poll.result():
            problem = m.error()
            if problem is not None:
                self._message_error(problem)
                continue
            source = topic or m.topic()
            key = (source, m.partition(), m.offset())
            held[key] = m
            kind, stamp = m.timestamp()
            headers = m.headers()
            waiting.append(Envelope(
                m.value() or b"",
                m.key(),
                dict(headers) if headers else None,
                source,
                key[1],
                key[2],
                stamp / 1000.0 if kind else None,
                m.delivery_count() or 1,
                (index, m),
            ))

    def _message_error(self, error: KafkaError) -> None:
        if is_fatal(error):
            self._fatal = error
            logger.error("%s: fatal error: %s", self._what, error.str())
            return
        if error.code() in (KafkaError._PARTITION_EOF, KafkaError._NO_OFFSET):
            return
        self._log_once(f"message-{error.code()}", "%s: %s", self._what, error.str())

    # ================================================================== settling

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        await self._settle(envelopes, AcknowledgeType.ACCEPT)

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        """RELEASE: the broker hands the records out again at once (a share group has no delayed redelivery),
        to any member, with their delivery count raised."""
        await self._settle(envelopes, AcknowledgeType.RELEASE)

    async def _settle(self, envelopes: Sequence[Envelope], kind: Any) -> None:
        by_member: dict[int, list[Any]] = {}
        members = self._members
        for env in envelopes:
            index, message = env.handle
            member = members[index]
            key = (env.source, env.partition, env.position)
            if member.held.get(key) is message:
                del member.held[key]
                by_member.setdefault(index, []).append(message)
        calls = []
        lock = self._lock_seconds
        now = time.monotonic()
        for index, messages in by_member.items():
            member = members[index]
            if member.closed:
                continue
            if kind == AcknowledgeType.RELEASE:
                self._archived(messages)
            if lock is not None and now - member.polled_at > lock:
                self.late_acks += len(messages)
                self._log_once("late", "%s: %d record(s) settled %.1f s after they were acquired, past the group's "
                               "record lock (%.1f s): possible duplicates. The broker has handed them out again (a "
                               "handler slower than share.record.lock.duration.ms), so their outputs may be produced "
                               "twice", self._what, len(messages), now - member.polled_at, lock)
            calls.append(member.worker.submit(functools.partial(self._acknowledge, member, messages, kind)))
            if not member.held and self._changed is not None:
                self._changed.set()  # the member may poll again
        if calls:
            await asyncio.gather(*calls)

    def _acknowledge(self, member: _Member, messages: list[Any], kind: Any) -> None:
        """On the member's thread: record the acknowledgements and send them (the result comes to
        ``_on_acknowledged`` with a later call on this thread)."""
        client = member.client
        refused = 0
        for message in messages:
            try:
                client.acknowledge(message, kind)
            except (confluent_kafka.IllegalStateException, KafkaException) as exc:
                refused += 1
                self._log_once("acknowledge", "%s: member %d: acknowledging a record failed (%s)", self._what,
                               member.index, exc)
        if refused:
            self._late(refused)
        try:
            client.commit_async()
        except (confluent_kafka.IllegalStateException, KafkaException) as exc:
            self._log_once("commit", "%s: member %d: sending acknowledgements failed: %s", self._what,
                           member.index, exc)

    def _on_acknowledged(self, offsets: Any, error: Any) -> None:
        """librdkafka's acknowledgement-commit callback, on a member's thread."""
        if error is None:
            return
        count = sum(len(v) for v in offsets.values()) if isinstance(offsets, dict) else 1
        self._late(count)
        self._log_once("refused", "%s: the broker refused the acknowledgement of %d record(s) (%s): possible "
                       "duplicates. Their lock had most likely expired (a handler slower than the group's "
                       "share.record.lock.duration.ms), so they are delivered again and their outputs may be "
                       "produced twice", self._what, count, error)

    def _late(self, count: int) -> None:
        self.refused_acks += count

    # ================================================================== reporting

    def _on_error(self, error: KafkaError) -> None:
        if log_client_error(self._what, error):
            self._fatal = error

    def _log_once(self, kind: str, message: str, *args: Any) -> None:
        """At most one line per kind and LOG_INTERVAL: a flood of failures must not flood the log."""
        now = time.monotonic()
        if now - self._logged.get(kind, -LOG_INTERVAL) < LOG_INTERVAL:
            return
        self._logged[kind] = now
        logger.warning(message, *args)

    def __repr__(self) -> str:
        return f"ShareKafkaConsumer({self._queue.name!r} <- {self._queue.value!r}, group={self._settings.group_id!r})"


def _integer(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None
