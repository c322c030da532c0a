"""The Kafka consumer's policy: what to hand out, what to commit, pause and nack delays.

Four modules make the consumer: ``fetcher.py`` (the librdkafka client, the one
thread that calls it, and the mailbox through which the loop asks it for
things), ``offsets.py`` (one typed state per partition, the single source of
truth for offsets, attempts and pending rewinds), ``rebalance.py`` (what
happens when partitions are assigned, revoked or lost: the callbacks on the
fetch thread and the revoke's half on the loop, in ``RebalanceMixin``) and this
one, which decides everything else: ``KafkaConsumer`` holds the state of all
of them (its ``__init__`` sets what the mixin declares) and is the port.
``transactional.py`` adds exactly-once on top.

Who owns what. A librdkafka consumer call may block while another thread polls
(``assignment()``) or while a rebalance callback runs (``commit()``), and the
rebalance callbacks wait for the event loop: so the loop never calls the client.

======================================  ==================  ===============================================
State                                   Owner (writes)      How it crosses threads
======================================  ==================  ===============================================
the librdkafka client, every call       fetch thread        the loop submits work to the fetch thread; the
                                                            rebalance callbacks run inside its poll
``PartitionOffsets`` per partition      loop                never; the fetch thread's assignment callback
(tracker: watermarks, commits,                              (rebalance.py) asks the loop to forget
attempts, pending rewind seeks)                             (``call_soon``, FIFO: before that fetch's
                                                            records are registered)
mailbox: queued commits and seeks       loop appends,       deques: the loop appends at the right, the
                                        fetch thread takes  fetch thread takes from the left and drops
                                                            those of partitions given up
mailbox: wanted pause state (hard       loop                ``Fetcher.want_pauses`` sets it and a dirty
pause, delayed and fenced partitions'                       flag; the fetch thread applies it
frozenset)
seek epoch (``Fetcher.epoch``)          loop                bumped with its seeks, read by the fetch thread
                                                            as it applies them, under one lock (``serve``)
engine pause (``_paused``), delay       loop                only as the wanted pause state above
timers (``_delayed``), fences (held)
assignment (``Fetcher.assigned``)       fetch thread        a frozenset the rebalance callbacks replace
                                        (rebalance.py)      whole; each fetch returns it with its records,
                                                            and the loop drops records of partitions not
                                                            in it (given up: stale); ``Fetcher.releases``
                                                            counts shrinks (``released_since``: what left),
                                                            moved first (``release``), so an exactly-once
                                                            commit that reads the smaller set sees the count
                                                            moved; each envelope carries the count of its
                                                            fetch (``era``)
end offsets for ``lag()``,              fetch thread        replaced whole / a flag; read by the loop
``rebalancing``
``closing``                             loop                a flag the fetch thread reads
commit results                          fetch thread        ``on_commit`` callback -> ``call_soon_threadsafe``
the fatal error (``KafkaErrors``)       either              librdkafka's error callback (fetch thread), an
                                                            error record or a failed commit (loop) sets it;
                                                            the next ``consume`` raises ConsumerFailedError
the revoke handler's work               loop                the revoke callback (fetch thread) runs
(``_releasing`` while it runs)          (rebalance.py)      ``_release`` on the loop and waits for it;
                                                            given up, it is cancelled, and records fetched
                                                            later wait for it to end (``_wait_released``)
``is_drained()``                        caller's thread     asks the loop for the tracker's view, which asks
                                                            the fetch thread for the broker's
exactly-once transaction calls          txn thread          submitted by the loop (``transactional.py``)
======================================  ==================  ===============================================

One exception to "only the fetch thread calls the client", on the exactly-once transaction thread:
``consumer_group_metadata()``, taken right before each ``send_offsets_to_transaction`` (the member epoch
changes without a callback under KIP-848). It only copies the member's identity under librdkafka's lock and
never waits for a poll; going through the fetch thread would deadlock while a revoke waits for the open
transaction to end. The start-up metadata check uses a throwaway client of its own.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Mapping, Sequence
from typing import Any

from confluent_kafka import KafkaError, TopicPartition

from volley.errors import ConsumerFailedError
from volley.message import Envelope
from volley.ports import Observer, PartitionId, QueueSpec, RevokeHandler
from volley_kafka.clients import is_fatal
from volley_kafka.envelope import KafkaEnvelope
from volley_kafka.fetcher import Fetcher, KafkaErrors, Offsets
from volley_kafka.offsets import OffsetTracker, TopicPartitionKey
from volley_kafka.rebalance import RebalanceMixin
from volley_kafka.settings import ConsumerSettings

logger = logging.getLogger("volley_kafka")

REBALANCE_REFUSALS = frozenset({KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
                                KafkaError.REBALANCE_IN_PROGRESS, KafkaError.FENCED_MEMBER_EPOCH,
                                KafkaError.STALE_MEMBER_EPOCH})
"""Commit errors that mean the group moved on without this member's generation (both group protocols)."""

HARD_PAUSE_AFTER = 1.0
"""A pause shorter than this only stops handing out messages; a longer one pauses the partitions in librdkafka.

librdkafka's pause throws away everything it prefetched for the partitions, and a resume starts fetching
again from the broker: for the short stalls of ordinary backpressure that costs far more than it saves.
Memory stays bounded meanwhile by librdkafka's own prefetch limits (queued.max.messages.kbytes).
"""
LAG_INTERVAL = 5.0
DRAIN_CHECK_TIMEOUT = 30.0


class KafkaConsumer(RebalanceMixin):
    """Consumes one topic (or a comma-separated list) as a member of a consumer group. See the module docstring."""

    def __init__(self, queue: QueueSpec, settings: ConsumerSettings) -> None:
        self._queue = queue
        self._settings = settings
        self._what = f"Kafka consumer of queue {queue.name!r} ({queue.value})"
        self._errors = KafkaErrors(self._what, settings.topics)
        self._fetcher = Fetcher(settings, self._what, f"volley-kafka-fetch-{queue.name}",
                                on_error=self._errors.client_error, on_commit_settled=self._commit_settled)
        self._tracker = OffsetTracker()
        self._only_topic = settings.topics[0] if len(settings.topics) == 1 else None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._revoke_handler: RevokeHandler | None = None
        self._observer: Observer | None = None
        self._app_name = queue.app_name
        self._ever_assigned = False
        self._paused = False  # the engine asked for a pause
        self._paused_at = 0.0
        self._hard_paused = False  # ... and it lasted long enough to pause the partitions in librdkafka
        self._delayed: dict[TopicPartitionKey, asyncio.TimerHandle] = {}
        self._held: set[TopicPartitionKey] = set()  # paused at their fence (exactly-once give-backs, offsets.py)
        self._releasing: asyncio.Task[Any] | None = None  # the loop half of a revoke, while it runs
        self._next_commit = 0.0
        self._next_lag = 0.0
        self._closed = False

    # ================================================================== capabilities

    # Ready (``/readyz``) once the group has given this member its assignment, not merely on subscribe;
    # withdrawn when partitions are lost (session timeout, fenced) until the next assignment.
    reports_readiness = True

    @property
    def transactional(self) -> bool:
        return False

    def set_revoke_handler(self, handler: RevokeHandler) -> None:
        self._revoke_handler = handler

    def instrument(self, observer: Observer, app_name: str) -> None:
        self._observer = observer
        self._app_name = app_name

    # ================================================================== lifecycle

    async def start(self) -> None:
        self._loop = asyncio.get_running_loop()
        metadata = await self._fetcher.start(self._on_assign, self._on_revoke, self._on_lost)
        if metadata is not None:
            topics = getattr(metadata, "topics", {})
            missing = [t for t in self._settings.topics if t not in topics or topics[t].error is not None]
            if missing:
                logger.warning("%s: topic(s) %s do not exist (yet); consuming will start once they are created",
                               self._what, ", ".join(missing))
        self._next_commit = time.monotonic() + self._settings.commit_interval
        logger.info("%s: subscribed to %s as group %r", self._what, ", ".join(self._settings.topics),
                    self._settings.group_id)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self._delayed.values():
            handle.cancel()
        self._delayed.clear()
        final: Offsets = []
        try:
            if self._fetcher.started:
                await self._before_close()
                if not self.transactional:
                    final = self._tracker.final(self._fetcher.assigned)
        finally:
            await self._fetcher.close(final)

    async def _before_close(self) -> None:
        return None

    # ================================================================== consuming

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        if self._errors.fatal is not None:
            raise self._failed(self._errors.fatal)
        fetcher = self._fetcher
        if not fetcher.started:
            raise RuntimeError(f"{self._what} is not started")
        now = time.monotonic()
        if now >= self._next_commit:
            self._commit_async(now)
        if self._paused:
            if not self._hard_paused:
                if now - self._paused_at < HARD_PAUSE_AFTER:
                    return []
                self._hard_paused = True
                self._want_pauses()
            timeout = 0.0  # only serve the group protocol; the engine resumes us as soon as there is room
        epoch, assigned, era, messages = await fetcher.submit(functools.partial(fetcher.fetch, max(1, max_messages),
                                                                           timeout))
        if not messages:
            return []
        releasing = self._releasing
        if releasing is not None and not releasing.done():
            await self._wait_released(releasing)  # a revoke given up on is still unwinding (rebalance.py)
        return self._envelopes(messages, epoch, assigned, era)

    def _failed(self, fatal: KafkaError) -> ConsumerFailedError:
        """librdkafka's consumer is dead (it consumes and commits nothing more): the run must end, so that a
        fresh process takes over from the last commit. Staying alive would look healthy and do nothing."""
        hint = ""
        if self._settings.librdkafka.get("group.instance.id"):
            hint = (" This is a static member (group.instance.id): another consumer joined with the same id (give "
                    "each worker its own), or a request of this one that was under way while the group coordinator "
                    "moved or restarted fenced it; a restarted process rejoins with the same id.")
        return ConsumerFailedError(
            f"{self._what}: fatal Kafka error: {fatal.str()}. librdkafka's consumer can neither consume nor commit "
            f"any more, so the run stops; restart the process (a supervisor, or volley run --workers, does). "
            f"Messages not committed are delivered again.{hint}")

    def _envelopes(self, messages: list[Any], epoch: int, assigned: frozenset[TopicPartitionKey],
                   era: int) -> list[Envelope]:
        """On the loop: envelopes for the engine, and every offset registered with the tracker.

        This is the per-message hot path: the offset bookkeeping of PartitionOffsets.consumed is inlined,
        offsets are registered once per run of messages of the same partition, and the checks that rarely
        apply (a partition given up, a pending rewind) are made when a run starts: while one applies, every
        message starts a run (``last_partition = -1``), so the common path has no check of its own.
        """
        out: list[Envelope] = []
        append = out.append
        partition_state = self._tracker.partition
        seeking = epoch != self._fetcher.epoch  # a rewind was asked for after this fetch began
        only_topic = self._only_topic
        message_error = self._errors.message_error
        new = object.__new__
        last_topic: str | None = None
        last_partition = -1
        state: Any = None
        attempts: dict[int, int] = {}
        expected = 0  # the next new offset of the current partition
        run: list[int] = []  # offsets seen for the first time, in the current run of one partition
        for m in messages:
            error = m.error()
            if error is not None:
                message_error(m, error)
                continue
            topic = only_topic or m.topic()
            partition = m.partition()
            offset = m.offset()
            if partition != last_partition or topic != last_topic:
                if run:
                    state.register(run)
                    run = []
                if (topic, partition) not in assigned:
                    last_partition = -1
                    continue  # given up during this fetch or before it: its new owner reads it
                state = partition_state(topic, partition)
                expected = state.next
                attempts = state.attempts
                last_topic = topic
                last_partition = partition
                if seeking and state.sought_epoch > epoch:
                    if state.stale(offset, epoch):
                        last_partition = -1
                        continue
                    if state.sought_epoch > epoch:
                        last_partition = -1  # still pending: check the next message too
                if state.fence >= 0:
                    last_partition = -1  # every record of the partition is checked against its fence
                    if offset >= state.fence:
                        self._hold((topic, partition))
                        continue
            if offset < expected:
                # Read again after a seek for a nacked message: only what was nacked goes out again.
                if offset not in state.redeliver:
                    continue
                state.redeliver.discard(offset)
            else:
                run.append(offset)
                expected = offset + 1
            # KafkaEnvelope(...)'s fields, set in place: a class call costs an __init__ frame per record, about 2 % of
            # a message's instructions here (test_races checks that both build the same envelope).
            env = new(KafkaEnvelope)
            env.value = m.value() or b""
            env.source = topic
            env.partition = partition
            env.position = offset
            env.attempt = attempts.get(offset, 1) if attempts else 1
            env.handle = m
            env.pending = 0
            env.era = era
            append(env)
        if run:
            state.register(run)
        return out

    # ================================================================== settling

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        self._finish(envelopes)
        now = time.monotonic()
        if now >= self._next_commit:
            self._commit_async(now)

    def _finish(self, envelopes: Sequence[Envelope]) -> int:
        """Mark the inputs finished; returns how many belonged to partitions no longer tracked (released)."""
        partitions = self._tracker.partitions
        unknown = 0
        last_topic: str | None = None
        last_partition: int | None = -1
        state: Any = None
        outstanding: Any = None
        in_order = False  # nothing finished ahead of its turn, nacked or retried in the current partition
        for e in envelopes:
            if e.partition != last_partition or e.source != last_topic:
                last_topic = e.source
                last_partition = e.partition
                state = partitions.get((last_topic, last_partition))  # type: ignore[arg-type]  # always an int here
                outstanding = None if state is None else state.outstanding
                in_order = state is not None and not state.done and not state.redeliver and not state.attempts
            if outstanding is None:
                unknown += 1
                continue
            position = e.position
            if in_order and outstanding and outstanding[0] == position:
                outstanding.popleft()  # the common case, in order: PartitionOffsets.finished inlined
            else:
                state.finished(position)
                in_order = not state.done and not state.redeliver and not state.attempts
        return unknown

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        """Give messages back: seek each partition to its earliest nacked offset and hand out only those again.

        Messages after it that finished or are still running are read again by the seek but skipped.
        """
        partitions = self._tracker.partitions
        targets: dict[TopicPartitionKey, int] = {}
        for e in envelopes:
            key = (e.source, int(e.partition or 0))
            state = partitions.get(key)
            offset = int(e.position)
            if state is None or not state.nacked(offset):
                continue
            state.attempts[offset] = e.attempt + 1
            targets[key] = min(state.redeliver)  # an earlier nack still waiting must not be skipped
        if self._fetcher.closing:
            return  # close commits below the nacked offsets; the next owner reads them again
        assigned = self._fetcher.assigned
        for key, offset in targets.items():
            if key not in assigned:
                continue
            if delay > 0:
                self._pause_for(key, delay)
            self._fetcher.ask_seek(TopicPartition(key[0], key[1], offset))

    # ================================================================== commits

    def _commit_async(self, now: float) -> None:
        """On the loop: decide what to commit; the fetch thread sends it (asynchronously) on its next round."""
        self._next_commit = now + self._settings.commit_interval
        # Not while a rebalance is changing the assignment: lag() has nothing to say then, and an empty report
        # would withdraw every partition's series until the next one (flicker). Due again once it is over.
        if now >= self._next_lag and self._observer is not None and not self._fetcher.rebalancing:
            self._next_lag = now + LAG_INTERVAL
            self._observer.on_lag(self._app_name, self.lag())
        if self.transactional or self._fetcher.closing:
            return
        offsets = self._tracker.committable(self._fetcher.assigned)
        if not offsets:
            return
        self._tracker.mark_committed(offsets)
        self._fetcher.ask_commit(offsets, now)

    def _commit_settled(self, error: KafkaError | None, failed: Offsets, started: float | None) -> None:
        """On the loop: an asynchronous commit's result (from the fetch thread)."""
        if started is not None and self._observer is not None and not failed:
            self._observer.on_commit(self._app_name, time.monotonic() - started)
        if failed:
            self._tracker.commit_failed(failed)
            if isinstance(error, KafkaError) and is_fatal(error):
                self._errors.client_error(error)  # the next consume() ends the run
                return
            reason = error.str() if isinstance(error, KafkaError) else "partition errors"
            if isinstance(error, KafkaError) and error.code() in REBALANCE_REFUSALS:
                logger.warning("%s: commit failed (%s): the group is rebalancing or removed this member. It is "
                               "retried for the partitions this member still owns once the rebalance is done; "
                               "those it lost are read again by their new owner from their last committed offset",
                               self._what, reason)
            else:
                logger.warning("%s: commit failed (%s); it is retried with the next one", self._what, reason)

    # ================================================================== flow control

    def pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._paused_at = time.monotonic()

    def resume(self) -> None:
        if self._paused:
            self._paused = False
            if self._hard_paused:
                self._hard_paused = False
                self._want_pauses()

    def _want_pauses(self) -> None:
        self._fetcher.want_pauses(self._hard_paused, frozenset(self._delayed) | self._held)

    def _hold(self, key: TopicPartitionKey) -> None:
        """A record at or past its partition's fence was fetched: only the exactly-once consumer fences partitions
        (transactional.py)."""

    def _pause_for(self, key: TopicPartitionKey, delay: float) -> None:
        loop = self._loop
        if loop is None:
            return
        previous = self._delayed.pop(key, None)
        if previous is not None:
            previous.cancel()
        self._delayed[key] = loop.call_later(delay, self._end_delay, key)
        self._want_pauses()

    def _end_delay(self, key: TopicPartitionKey) -> None:
        if self._delayed.pop(key, None) is not None:
            self._want_pauses()

    # ================================================================== reporting

    def lag(self) -> Mapping[PartitionId, int]:
        """On the loop: messages behind the end of each assigned partition, from end offsets the fetch thread
        copied from librdkafka's cache at most a second ago."""
        out: dict[PartitionId, int] = {}
        fetcher = self._fetcher
        if fetcher.rebalancing:
            return out
        highs = fetcher.high_watermarks
        for key in fetcher.assigned:
            high = highs.get(key)
            state = self._tracker.partitions.get(key)
            if high is None or state is None or state.next < 0:
                continue
            out[key] = max(0, high - state.next)
        return out

    def is_drained(self) -> bool:
        """Assigned, nothing outstanding, and every assigned partition read to its end (asks the broker).

        Called off the event loop (the engine uses a worker thread): the loop answers for the tracker, the
        fetch thread asks the broker.
        """
        loop = self._loop
        if loop is None or loop.is_closed() or not self._fetcher.started or self._fetcher.closing:
            return False
        try:
            running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            running = None
        if running is loop:  # it would wait for the loop it blocks
            raise RuntimeError(f"{self._what}: is_drained() asks the broker; call it off the event loop "
                               "(asyncio.to_thread)")
        future = asyncio.run_coroutine_threadsafe(self._drained(), loop)
        try:
            return future.result(DRAIN_CHECK_TIMEOUT)
        except concurrent.futures.TimeoutError:
            future.cancel()
            return False

    async def _drained(self) -> bool:
        """On the loop: what the tracker says, then the broker's ends through the fetch thread."""
        fetcher = self._fetcher
        assigned = fetcher.assigned
        if (not self._ever_assigned or not assigned or self._tracker.pending() or self._delayed or self._held
                or fetcher.rebalancing or not fetcher.started
                or any(state.fence >= 0 for state in self._tracker.partitions.values())):
            return False
        positions: dict[TopicPartitionKey, int] = {}
        for key in assigned:
            state = self._tracker.partitions.get(key)
            positions[key] = state.next if state is not None and state.next >= 0 else -1
        result: bool = await fetcher.submit(functools.partial(fetcher.read_to_end, assigned, positions))
        return result

    def __repr__(self) -> str:
        return f"KafkaConsumer({self._queue.name!r} <- {self._queue.value!r}, group={self._settings.group_id!r})"

