"""The Kafka consumer: batched fetching off the event loop, watermark commits, rebalance and pause handling.

Threads, and who touches what:

* Every call into the librdkafka consumer happens on one dedicated fetch thread
  (subscribe, fetches, commits, seeks, pause/resume, the broker queries of
  ``is_drained`` and the cached end offsets behind ``lag``). Some calls block
  while another thread polls (``assignment()``), some block while a rebalance
  callback runs (``commit()``), and rebalance callbacks wait for the event loop:
  so the loop never calls the consumer itself. It leaves requests (commits,
  seeks, the wanted pause state) that the fetch thread carries out at the start
  and end of each fetch; the engine fetches continuously, also while paused, so
  requests are served within one poll interval. The start-up metadata check
  uses a throwaway client of its own.
* Rebalance callbacks fire inside librdkafka's poll, on the fetch thread; they
  hand the work that touches Volley's state to the event loop and wait for it.
  The fetch thread owns ``_assigned`` (the loop reads it, a frozenset replaced
  whole) and drops queued requests of partitions given up.
* The offset tracker, delays, seeks-in-progress and attempts are only touched on
  the event loop: building envelopes, acks, nacks, the commit decisions, the loop
  half of a rebalance, ``lag()``. ``is_drained()`` is called off the loop: it
  asks the loop for the tracker's view and the fetch thread for the broker's.
  The fetch thread sees the delays as a frozenset copy (``_delayed_keys``).
* One exception, on the exactly-once transaction thread: ``consumer_group_metadata()``,
  taken right before each ``send_offsets_to_transaction`` (the member epoch changes
  without a callback under KIP-848). It only copies the member's identity under
  librdkafka's lock and never waits for a poll; going through the fetch thread would
  deadlock while a revoke waits for the open transaction to end.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from volley.errors import ConfigurationError, DeliveryError, VolleyError
from volley.message import Envelope
from volley.ports import Observer, PartitionId, QueueSpec, RevokeHandler
from volley_kafka.offsets import OffsetTracker, TopicPartitionKey
from volley_kafka.producer import ProducerClient, TransactionAbortedError, make_client, rdkafka_logger
from volley_kafka.settings import ConsumerSettings
from volley_kafka.worker import BlockingWorker

logger = logging.getLogger("volley_kafka")

POLL_SLICE = 0.2
"""Longest single wait inside librdkafka, so that close and cancellation are served promptly."""
HARD_PAUSE_AFTER = 1.0
"""A pause shorter than this only stops handing out messages; a longer one pauses the partitions in librdkafka.

librdkafka's pause throws away everything it prefetched for the partitions, and a resume starts fetching
again from the broker: for the short stalls of ordinary backpressure that costs far more than it saves.
Memory stays bounded meanwhile by librdkafka's own prefetch limits (queued.max.messages.kbytes).
"""
ABORT_ATTEMPTS = 10
"""How many times an exactly-once abort is tried before the app gives up (the next begin then stops it)."""
ABORT_BACKOFF = 0.1
ABORT_BACKOFF_MAX = 5.0
REVOKE_GRACE = 5.0
"""How much longer than the revoke timeout the fetch thread waits for the loop's half of a revoke."""
ERROR_LOG_INTERVAL = 30.0
LAG_INTERVAL = 5.0
WATERMARK_INTERVAL = 1.0
"""How often the fetch thread copies librdkafka's cached end offsets for lag()."""
DRAIN_CHECK_TIMEOUT = 30.0
SILENT_ERRORS = frozenset({KafkaError._PARTITION_EOF, KafkaError._NO_OFFSET})

Fetched = tuple[int, list[Any]]


class KafkaConsumer:
    """Consumes one topic (or a comma-separated list) as a member of a consumer group. See the module docstring."""

    def __init__(self, queue: QueueSpec, settings: ConsumerSettings) -> None:
        self._queue = queue
        self._settings = settings
        self._what = f"Kafka consumer of queue {queue.name!r} ({queue.value})"
        config = dict(settings.librdkafka)
        config["on_commit"] = self._on_commit_result
        config["error_cb"] = self._on_error
        config["logger"] = rdkafka_logger
        self._consumer: Any = make_client(config, self._what, confluent_kafka.Consumer)
        self._tracker = OffsetTracker()
        self._only_topic = settings.topics[0] if len(settings.topics) == 1 else None
        self._worker: BlockingWorker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._revoke_handler: RevokeHandler | None = None
        self._observer: Observer | None = None
        self._app_name = queue.app_name
        self._assigned: frozenset[TopicPartitionKey] = frozenset()
        self._ever_assigned = False
        self._paused = False  # the engine asked for a pause
        self._paused_at = 0.0
        self._hard_paused = False  # ... and it lasted long enough to pause the partitions in librdkafka
        self._delayed: dict[TopicPartitionKey, asyncio.TimerHandle] = {}  # loop only
        self._delayed_keys: frozenset[TopicPartitionKey] = frozenset()  # its keys, for the fetch thread
        self._high_watermarks: dict[TopicPartitionKey, int] = {}  # refreshed by the fetch thread, for lag()
        self._next_watermarks = 0.0
        self._attempts: dict[tuple[str, int, int], int] = {}
        self._seek_epoch = 0
        self._seeks: dict[TopicPartitionKey, tuple[int, int]] = {}  # partition -> (epoch, offset sought)
        self._seek_requests: deque[TopicPartition] = deque()  # loop -> fetch thread
        self._commit_requests: deque[tuple[list[tuple[str, int, int]], float]] = deque()  # loop -> fetch thread
        self._pause_dirty = False  # the wanted pause state changed; the fetch thread applies it
        self._gone_in_fetch: set[TopicPartitionKey] = set()  # revoked or lost during the current fetch
        self._assigned_in_fetch: set[TopicPartitionKey] = set()
        self._commit_started: deque[float] = deque()
        self._next_commit = 0.0
        self._next_lag = 0.0
        self._error_logged: dict[int, float] = {}
        self._fatal: KafkaError | None = None
        self._committed_cache: dict[TopicPartitionKey, int] = {}
        self._closing = False
        self._closed = False
        self._rebalancing = False  # a rebalance callback is waiting for the loop: no consumer calls from there

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
        self._worker = BlockingWorker(f"volley-kafka-fetch-{self._queue.name}")
        timeout = self._settings.startup_timeout
        if timeout > 0:
            metadata = await self._worker.submit(functools.partial(self._metadata, timeout))
            topics = getattr(metadata, "topics", {})
            missing = [t for t in self._settings.topics if t not in topics or topics[t].error is not None]
            if missing:
                logger.warning("%s: topic(s) %s do not exist (yet); consuming will start once they are created",
                               self._what, ", ".join(missing))
        try:
            await self._worker.submit(functools.partial(
                self._consumer.subscribe, list(self._settings.topics), on_assign=self._on_assign,
                on_revoke=self._on_revoke, on_lost=self._on_lost))
        except KafkaException as exc:
            raise ConfigurationError(f"{self._what}: cannot subscribe: {exc}") from None
        self._next_commit = time.monotonic() + self._settings.commit_interval
        logger.info("%s: subscribed to %s as group %r", self._what, ", ".join(self._settings.topics),
                    self._settings.group_id)

    def _metadata(self, timeout: float) -> Any:
        """The start-up check, on a throwaway client: asked on the group member itself, librdkafka would
        notice a topic created later only at its periodic metadata refresh (five minutes by default)."""
        config = dict(self._settings.librdkafka)
        config["logger"] = rdkafka_logger
        probe: Any = make_client(config, self._what, confluent_kafka.Consumer)
        try:
            return probe.list_topics(timeout=timeout)
        except KafkaException as exc:
            brokers = self._settings.librdkafka.get("bootstrap.servers")
            raise ConfigurationError(
                f"{self._what}: no Kafka broker of {brokers} answered within {timeout:.0f} s "
                f"({exc.args[0] if exc.args else exc}); check bootstrap.servers / KAFKA_BROKERS, or raise "
                "volley.startup.timeout.seconds"
            ) from None
        finally:
            try:
                probe.close()
            except (KafkaException, RuntimeError) as exc:
                logger.debug("%s: closing the start-up probe: %s", self._what, exc)

    async def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for handle in self._delayed.values():
            handle.cancel()
        self._delayed.clear()
        self._delayed_keys = frozenset()
        worker = self._worker
        if worker is None:  # never started
            self._closing = True
            self._consumer.close()
            return
        try:
            await self._before_close()
            self._commit_requests.clear()  # superseded by the final commit
            if not self.transactional:
                offsets = self._tracker.final(self._assigned)
                if offsets:
                    await worker.submit(functools.partial(self._commit_sync, offsets, "at close"))
        finally:
            self._closing = True
            try:
                await worker.submit(self._consumer.close)
            except (KafkaException, RuntimeError) as exc:
                logger.warning("%s: closing: %s", self._what, exc)
            worker.stop()

    async def _before_close(self) -> None:
        return None

    # ================================================================== consuming

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        if self._fatal is not None:
            raise VolleyError(f"{self._what}: fatal Kafka error: {self._fatal.str()}")
        worker = self._worker
        if worker is None:
            raise RuntimeError(f"{self._what} is not started")
        now = time.monotonic()
        if now >= self._next_commit:
            self._commit_async(now)
        if self._paused:
            if not self._hard_paused:
                if now - self._paused_at < HARD_PAUSE_AFTER:
                    return []
                self._hard_paused = True
                self._pause_dirty = True
            timeout = 0.0  # only serve the group protocol; the engine resumes us as soon as there is room
        epoch, messages = await worker.submit(functools.partial(self._fetch, max(1, max_messages), timeout))
        if not messages:
            return []
        return self._envelopes(messages, epoch)

    def _fetch(self, count: int, timeout: float) -> Fetched:
        """On the fetch thread: what is ready now, else wait for the first message and take what followed it."""
        consumer = self._consumer
        epoch = self._seek_epoch
        self._gone_in_fetch.clear()
        self._assigned_in_fetch.clear()
        self._serve_requests()
        messages: list[Any] = consumer.consume(count, 0)
        if not messages and timeout > 0:
            deadline = time.monotonic() + timeout
            while not self._closing:
                first = consumer.poll(min(POLL_SLICE, timeout))
                if first is not None:
                    messages = consumer.consume(count - 1, 0) if count > 1 else []
                    messages.insert(0, first)
                    break
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                self._serve_requests()  # e.g. a resume while waiting
        if self._gone_in_fetch and messages:
            # A rebalance callback ran inside this call: librdkafka returns what it had collected before it,
            # and those messages belong to partitions we no longer own. Their new owner reads them again.
            gone = self._gone_in_fetch - self._assigned_in_fetch
            messages = [m for m in messages if (m.topic(), m.partition()) not in gone]
        self._serve_requests()
        now = time.monotonic()
        if now >= self._next_watermarks:
            self._next_watermarks = now + WATERMARK_INTERVAL
            self._refresh_watermarks()
        return epoch, messages

    def _refresh_watermarks(self) -> None:
        """On the fetch thread: librdkafka's cached end offsets of the assigned partitions, for lag()."""
        highs: dict[TopicPartitionKey, int] = {}
        for topic, partition in self._assigned:
            try:
                _low, high = self._consumer.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                highs[(topic, partition)] = high
        self._high_watermarks = highs  # replaced whole: the loop reads it without a lock

    def _serve_requests(self) -> None:
        """On the fetch thread: carry out what the loop asked for (commits, seeks, pause state)."""
        self._send_commits()
        consumer = self._consumer
        if self._seek_requests:
            failed: list[TopicPartition] = []
            while self._seek_requests:
                partition = self._seek_requests.popleft()
                if (partition.topic, partition.partition) not in self._assigned:
                    continue
                try:
                    consumer.seek(partition)
                except KafkaException as exc:  # e.g. not yet fetching after an assignment: try again
                    logger.debug("%s: seek %s deferred: %s", self._what, partition, exc)
                    failed.append(partition)
            self._seek_requests.extend(failed)
        if self._pause_dirty:
            self._pause_dirty = False
            self._apply_pauses()

    def _send_commits(self) -> None:
        while self._commit_requests:
            offsets, started = self._commit_requests.popleft()
            assigned = self._assigned
            if any((t, p) not in assigned for t, p, _ in offsets):  # never commit a partition given up
                offsets = [o for o in offsets if (o[0], o[1]) in assigned]
                if not offsets:
                    continue
            try:
                self._consumer.commit(offsets=[TopicPartition(t, p, o) for t, p, o in offsets], asynchronous=True)
            except KafkaException as exc:
                self._to_loop(self._commit_settled, exc.args[0] if exc.args else None, offsets, None)
            else:
                self._commit_started.append(started)

    def _to_loop(self, callback: Any, *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, *args)

    def _envelopes(self, messages: list[Any], epoch: int) -> list[Envelope]:
        """On the loop: envelopes for the engine, and every offset registered with the tracker.

        This is the per-message hot path: the offset bookkeeping of PartitionOffsets.consumed is inlined,
        and offsets are registered once per run of messages of the same partition.
        """
        out: list[Envelope] = []
        append = out.append
        tracker = self._tracker
        attempts = self._attempts
        stale = self._seeks if epoch != self._seek_epoch else None
        only_topic = self._only_topic
        last_topic: str | None = None
        last_partition = -1
        state: Any = None
        expected = 0  # the next new offset of the current partition
        run: list[int] = []  # offsets seen for the first time, in the current run of one partition
        for m in messages:
            error = m.error()
            if error is not None:
                self._message_error(m, error)
                continue
            topic = only_topic or m.topic()
            partition = m.partition()
            offset = m.offset()
            if stale is not None and self._is_stale(topic, partition, offset, epoch):
                continue
            if partition != last_partition or topic != last_topic:
                if run:
                    _register(state, run)
                    run = []
                last_topic = topic
                last_partition = partition
                state = tracker.partition(topic, partition)
                expected = state.next
            if offset < expected:
                # Read again after a seek for a nacked message: only what was nacked goes out again.
                if offset not in state.redeliver:
                    continue
                state.redeliver.discard(offset)
            else:
                run.append(offset)
                expected = offset + 1
            kind, stamp = m.timestamp()
            headers = m.headers()
            append(Envelope(
                m.value() or b"",
                m.key(),
                dict(headers) if headers else None,
                topic,
                partition,
                offset,
                stamp / 1000.0 if kind else None,
                attempts.get((topic, partition, offset), 1) if attempts else 1,
                m,
            ))
        if run:
            _register(state, run)
        return out

    def _is_stale(self, topic: str, partition: int, offset: int, epoch: int) -> bool:
        """A message fetched before its partition was rewound (an abort) that librdkafka could not purge.

        After a seek to X the partition restarts at X, and everything fetched before the seek has offsets
        above X: drop those until X itself comes back.
        """
        key = (topic, partition)
        sought = self._seeks.get(key)
        if sought is None or sought[0] <= epoch:
            return False
        if offset == sought[1]:
            del self._seeks[key]
            return False
        return offset > sought[1]

    def _message_error(self, message: Any, error: KafkaError) -> None:
        code = error.code()
        if code in SILENT_ERRORS:
            return
        if error.fatal():
            self._fatal = error
            logger.error("%s: fatal error: %s", self._what, error.str())
            return
        now = time.monotonic()
        if now - self._error_logged.get(code, -ERROR_LOG_INTERVAL) < ERROR_LOG_INTERVAL:
            return
        self._error_logged[code] = now
        where = message.topic() or ",".join(self._settings.topics)
        if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION):
            logger.warning("%s: %s: %s (waiting for it to be created)", self._what, where, error.str())
        else:
            logger.error("%s: %s: %s", self._what, where, error.str())

    # ================================================================== settling

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        self._finish(envelopes)
        now = time.monotonic()
        if now >= self._next_commit:
            self._commit_async(now)

    def _finish(self, envelopes: Sequence[Envelope]) -> None:
        partitions = self._tracker.partitions
        last_topic: str | None = None
        last_partition: int | None = -1
        state: Any = None
        outstanding: Any = None
        for e in envelopes:
            if e.partition != last_partition or e.source != last_topic:
                last_topic = e.source
                last_partition = e.partition
                state = partitions.get((last_topic, last_partition))  # type: ignore[arg-type]  # always an int here
                outstanding = None if state is None else state.outstanding
            if outstanding is None:
                continue
            position = e.position
            if outstanding and outstanding[0] == position and not state.done and not state.redeliver:
                outstanding.popleft()  # the common case, in order: PartitionOffsets.finished inlined
            else:
                state.finished(position)
        if self._attempts:
            for e in envelopes:
                self._attempts.pop((e.source, e.partition, e.position), None)  # type: ignore[arg-type]

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
            self._attempts[(key[0], key[1], offset)] = e.attempt + 1
            targets[key] = min(state.redeliver)  # an earlier nack still waiting must not be skipped
        if self._closing:
            return  # close commits below the nacked offsets; the next owner reads them again
        for key, offset in targets.items():
            if key not in self._assigned:
                continue
            if delay > 0:
                self._pause_for(key, delay)
            self._seek(TopicPartition(key[0], key[1], offset))

    def _seek(self, partition: TopicPartition) -> None:
        self._seek_requests.append(partition)

    def _rewind(self, targets: Mapping[TopicPartitionKey, int]) -> None:
        """Forget everything from each target on, finished or not, and seek there (an aborted transaction)."""
        if not targets:
            return
        self._seek_epoch += 1
        for key, offset in targets.items():
            state = self._tracker.partitions.get(key)
            if state is None or key not in self._assigned:
                continue  # no longer ours: its new owner starts from the last commit
            state.rewind(offset)
            self._seeks[key] = (self._seek_epoch, offset)
            self._seek(TopicPartition(key[0], key[1], offset))

    # ================================================================== commits

    def _commit_async(self, now: float) -> None:
        """On the loop: decide what to commit; the fetch thread sends it (asynchronously) on its next round."""
        self._next_commit = now + self._settings.commit_interval
        if now >= self._next_lag and self._observer is not None:
            self._next_lag = now + LAG_INTERVAL
            self._observer.on_lag(self._app_name, self.lag())
        if self.transactional or self._closing:
            return
        offsets = self._tracker.committable(self._assigned)
        if not offsets:
            return
        self._tracker.mark_committed(offsets)
        self._commit_requests.append((offsets, now))

    def _on_commit_result(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit callback (fetch thread)."""
        # None: a synchronous commit (revoke, close), which is not timed.
        started = self._commit_started.popleft() if self._commit_started else None
        failed = [(tp.topic, tp.partition, tp.offset) for tp in partitions if tp.error is not None]
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            failed = [(tp.topic, tp.partition, tp.offset) for tp in partitions]
        if started is not None or failed:
            self._to_loop(self._commit_settled, error, failed, started)

    def _commit_settled(self, error: KafkaError | None, failed: list[tuple[str, int, int]],
                        started: float | None) -> None:
        if started is not None and self._observer is not None and not failed:
            self._observer.on_commit(self._app_name, time.monotonic() - started)
        if failed:
            self._tracker.commit_failed(failed)
            logger.warning("%s: commit failed (%s); it is retried with the next one", self._what,
                           error.str() if isinstance(error, KafkaError) else "partition errors")

    def _commit_sync(self, offsets: list[tuple[str, int, int]], why: str) -> bool:
        """Commit and wait (fetch thread): on revoke and at close."""
        started = time.monotonic()
        try:
            result = self._consumer.commit(offsets=[TopicPartition(t, p, o) for t, p, o in offsets],
                                           asynchronous=False)
        except KafkaException as exc:
            logger.warning("%s: commit %s failed: %s; messages finished since the last commit will be delivered "
                           "again", self._what, why, exc)
            return False
        errors = [tp for tp in result or () if tp.error is not None]
        if errors:
            logger.warning("%s: commit %s failed for %s", self._what, why, errors)
            return False
        logger.debug("%s: committed %s %s in %.3f s", self._what, why, offsets, time.monotonic() - started)
        return True

    # ================================================================== rebalance (fetch thread)

    def _on_assign(self, _consumer: Any, partitions: list[TopicPartition]) -> None:
        keys = {(tp.topic, tp.partition) for tp in partitions}
        self._assigned = self._assigned | keys
        self._assigned_in_fetch.update(keys)
        self._ever_assigned = True
        self._committed_cache.clear()
        # librdkafka keeps a partition's pause across revoke and assign: a partition paused in an earlier
        # assignment would stay paused for good. Make its state the wanted one, whichever it is.
        self._pause_dirty = True
        # Runs on the loop before this fetch's messages are registered (call_soon is FIFO).
        self._to_loop(self._tracker.forget, keys)
        logger.info("%s: assigned %s", self._what, _describe(keys))
        self._report_ready(True)

    def _report_ready(self, ready: bool) -> None:
        """Tell the observer (fetch thread; the engine's MultiObserver isolates observer failures)."""
        if self._observer is not None and not self._closing:
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
        try:
            keys = [(tp.topic, tp.partition) for tp in partitions]
            self._gone_in_fetch.update(keys)
            self._committed_cache.clear()
            if not keys:
                return
            logger.info("%s: partitions %s %s", self._what, _describe(keys), "lost" if lost else "revoked")
            loop = self._loop
            if self._closing or loop is None or loop.is_closed():
                return  # close() made the final commit
            if not lost:
                self._send_commits()  # older than the final commit below, so they must go first
            # The partitions stay in self._assigned until released: an exactly-once commit made while the
            # engine finishes their work must still carry their offsets.
            self._rebalancing = True
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
                self._to_loop(self._forget, keys)
            gone = set(keys)
            self._assigned = self._assigned - gone
            # What the loop queued for these partitions belongs to an assignment that is over: a commit sent now
            # could move the new owner's offset back, and a seek carried out if they come back to us (at once,
            # in an incremental rebalance) would skip past the offset committed here.
            self._drop_requests(gone)
            if offsets:
                self._commit_sync(offsets, "on revoke")
        except Exception:
            logger.exception("%s: handling the rebalance failed", self._what)
        finally:
            self._rebalancing = False
            self._assigned = self._assigned - {(tp.topic, tp.partition) for tp in partitions}

    def _drop_requests(self, gone: set[TopicPartitionKey]) -> None:
        """On the fetch thread: remove queued commits and seeks of partitions given up.

        The fetch thread is the only one taking from these queues, and the loop only appends at their right:
        taking what is queued from the left and putting back what is kept loses nothing and keeps the order.
        """
        commits = self._commit_requests
        queued = [commits.popleft() for _ in range(len(commits))]
        kept = [(offsets, started) for original, started in queued
                if (offsets := [o for o in original if (o[0], o[1]) not in gone])]
        commits.extendleft(reversed(kept))
        seeks = self._seek_requests
        queued_seeks = [seeks.popleft() for _ in range(len(seeks))]
        seeks.extendleft(reversed([tp for tp in queued_seeks if (tp.topic, tp.partition) not in gone]))

    async def _release(self, keys: list[TopicPartitionKey], lost: bool,
                       abandoned: threading.Event) -> list[tuple[str, int, int]]:
        """The loop half of a revoke: run the engine's handler, then collect the final offsets and forget.

        ``abandoned``: the fetch thread stopped waiting (and forgets the partitions by itself); the partitions
        may be ours again by now, so nothing of theirs may be touched from here.
        """
        handler = self._revoke_handler
        deadline = time.monotonic() + self._settings.revoke_timeout
        if handler is not None:
            try:
                await asyncio.wait_for(handler(keys), self._settings.revoke_timeout)
            except TimeoutError:
                logger.warning("%s: in-flight work of %s did not finish within %.0f s; committing what did",
                               self._what, _describe(keys), self._settings.revoke_timeout)
            except Exception:
                logger.exception("%s: the engine's revoke handler failed", self._what)
        await self._before_release(max(0.0, deadline - time.monotonic()))
        if abandoned.is_set():
            return []
        offsets = [] if lost or self.transactional else self._tracker.final(keys)
        self._forget(keys)
        return offsets

    def _forget(self, keys: list[TopicPartitionKey]) -> None:
        """On the loop: drop everything about partitions that are no longer ours (their queued requests are
        dropped by the fetch thread, see _drop_requests)."""
        self._tracker.forget(keys)
        gone = set(keys)
        for key in keys:
            handle = self._delayed.pop(key, None)
            if handle is not None:
                handle.cancel()
            self._seeks.pop(key, None)
        self._delayed_keys = frozenset(self._delayed)
        if self._attempts:
            self._attempts = {k: v for k, v in self._attempts.items() if (k[0], k[1]) not in gone}

    async def _before_release(self, timeout: float) -> None:
        return None

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
                self._pause_dirty = True

    def _apply_pauses(self) -> None:
        """On the fetch thread: make librdkafka's pause state what the loop wants."""
        assigned = self._assigned
        delayed = self._delayed_keys & assigned
        paused = assigned if self._hard_paused else delayed
        running = assigned - paused
        try:
            if paused:
                self._consumer.pause([TopicPartition(t, p) for t, p in paused])
            if running:
                self._consumer.resume([TopicPartition(t, p) for t, p in running])
        except KafkaException as exc:
            logger.warning("%s: pause/resume: %s", self._what, exc)

    def _pause_for(self, key: TopicPartitionKey, delay: float) -> None:
        loop = self._loop
        if loop is None:
            return
        previous = self._delayed.pop(key, None)
        if previous is not None:
            previous.cancel()
        self._delayed[key] = loop.call_later(delay, self._end_delay, key)
        self._delayed_keys = frozenset(self._delayed)
        self._pause_dirty = True

    def _end_delay(self, key: TopicPartitionKey) -> None:
        if self._delayed.pop(key, None) is not None:
            self._delayed_keys = frozenset(self._delayed)
            self._pause_dirty = True

    # ================================================================== reporting

    def lag(self) -> Mapping[PartitionId, int]:
        """On the loop: messages behind the end of each assigned partition, from end offsets the fetch thread
        copied from librdkafka's cache at most a second ago."""
        out: dict[PartitionId, int] = {}
        if self._rebalancing:
            return out
        highs = self._high_watermarks
        for key in self._assigned:
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
        if loop is None or loop.is_closed() or self._worker is None or self._closing:
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
        if (not self._ever_assigned or not self._assigned or self._tracker.pending() or self._delayed
                or self._rebalancing or self._worker is None):
            return False
        assigned = self._assigned
        positions: dict[TopicPartitionKey, int] = {}
        for key in assigned:
            state = self._tracker.partitions.get(key)
            positions[key] = state.next if state is not None and state.next >= 0 else -1
        return await self._worker.submit(functools.partial(self._read_to_end, assigned, positions))

    def _read_to_end(self, assigned: frozenset[TopicPartitionKey], positions: Mapping[TopicPartitionKey, int]) -> bool:
        """On the fetch thread: every partition read to its end, from the loop's positions (-1: none read)."""
        if self._assigned != assigned or self._rebalancing:
            return False  # the assignment changed since the loop looked
        for (topic, partition), known in positions.items():
            tp = TopicPartition(topic, partition)
            try:
                low, high = self._consumer.get_watermark_offsets(tp, timeout=5.0, cached=False)
            except KafkaException:
                return False
            position = known if known >= 0 else self._committed_position(tp, low)
            if position < high:
                # A transaction's commit or abort marker takes an offset that is never delivered: librdkafka's
                # own position moves past it (and past aborted records, for read_committed).
                try:
                    fetched = int(self._consumer.position([tp])[0].offset)
                except KafkaException:
                    return False
                if fetched < high:
                    return False
        return True

    def _committed_position(self, tp: TopicPartition, low: int) -> int:
        """On the fetch thread (the cache is cleared by the rebalance callbacks, there too)."""
        key = (tp.topic, tp.partition)
        cached = self._committed_cache.get(key)
        if cached is not None:
            return max(cached, low)
        try:
            committed = int(self._consumer.committed([tp], timeout=5.0)[0].offset)
        except KafkaException:
            return -1
        if committed < 0:
            return low  # nothing committed: auto.offset.reset decides; 'earliest' starts at the low watermark
        self._committed_cache[key] = committed
        return max(committed, low)

    def _on_error(self, error: KafkaError) -> None:
        if error.fatal():
            self._fatal = error
            logger.error("%s: fatal error: %s", self._what, error.str())
        elif error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
            logger.warning("%s: %s", self._what, error.str())
        else:
            logger.info("%s: %s", self._what, error.str())

    def __repr__(self) -> str:
        return f"KafkaConsumer({self._queue.name!r} <- {self._queue.value!r}, group={self._settings.group_id!r})"


class TransactionalKafkaConsumer(KafkaConsumer):
    """Exactly-once: inputs' offsets are committed in the same transaction as the outputs they caused.

    The transactional producer is the one every Kafka output of the app uses (the connector hands it to
    them). Expected call sequence, per batch: ``begin()``, produce the batch's outputs (and dead letters),
    wait for their delivery reports, then ``commit(envelopes)``, or ``abort()`` if any output failed.
    """

    def __init__(self, queue: QueueSpec, settings: ConsumerSettings, client: ProducerClient) -> None:
        super().__init__(queue, settings)
        self._client = client
        self._txn_worker: BlockingWorker | None = None
        self._open = False
        self._idle: asyncio.Event | None = None
        self._acquired = False

    @property
    def transactional(self) -> bool:
        return True

    @property
    def client(self) -> ProducerClient:
        return self._client

    async def start(self) -> None:
        self._idle = asyncio.Event()
        self._idle.set()
        if not self._client.acquire():
            raise VolleyError(f"{self._what}: the transactional producer was closed before the consumer started")
        self._acquired = True
        self._txn_worker = BlockingWorker(f"volley-kafka-txn-{self._queue.name}")
        timeout = max(self._settings.startup_timeout, 10.0)
        if not self._client.transactions_ready:
            try:
                await self._txn_worker.submit(functools.partial(self._client.producer.init_transactions, timeout))
            except KafkaException as exc:
                raise ConfigurationError(
                    f"{self._what}: cannot start transactions ({exc.args[0] if exc.args else exc}); exactly-once "
                    "needs a reachable Kafka cluster with transactions enabled"
                ) from None
            self._client.transactions_ready = True
        await super().start()

    async def begin(self) -> None:
        if self._open:
            return
        try:
            self._client.producer.begin_transaction()
        except KafkaException as exc:
            raise VolleyError(f"{self._what}: cannot begin a transaction: {exc}") from exc
        self._open = True
        self._client.in_transaction = True
        assert self._idle is not None
        self._idle.clear()

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        """Send the finished inputs' watermarks with the transaction and commit it."""
        assert self._txn_worker is not None
        if not self._open:
            await self.begin()
        self._finish(envelopes)
        offsets = self._tracker.committable(self._assigned)
        producer = self._client.producer
        group_metadata = self._consumer.consumer_group_metadata
        timeout = self._settings.revoke_timeout

        def work() -> None:
            if offsets:
                # The member's current generation / epoch, not the one of the assignment: see the module docstring.
                producer.send_offsets_to_transaction([TopicPartition(t, p, o) for t, p, o in offsets],
                                                     group_metadata(), timeout)
            for attempt in range(5):
                try:
                    producer.commit_transaction(timeout)
                    return
                except KafkaException as exc:
                    error = exc.args[0] if exc.args else None
                    if isinstance(error, KafkaError) and error.retriable() and attempt < 4:
                        continue
                    raise

        started = time.monotonic()
        try:
            await self._txn_worker.submit(work)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.fatal():
                self._fatal = error
                self._closed_transaction()
                raise VolleyError(f"{self._what}: fatal error committing a transaction: {error.str()}") from exc
            logger.warning("%s: committing the transaction failed (%s); aborting it", self._what, exc)
            await self.abort()
            raise DeliveryError(f"{self._what}: the transaction was aborted: {exc}; its inputs will be consumed "
                                "again") from exc
        self._tracker.mark_committed(offsets)
        self._closed_transaction()
        if self._observer is not None:
            self._observer.on_commit(self._app_name, time.monotonic() - started)

    async def abort(self) -> None:
        """Abort the open transaction and rewind every partition to its last committed offset."""
        assert self._txn_worker is not None
        producer = self._client.producer
        timeout = self._settings.revoke_timeout
        client = self._client
        client.in_transaction = False  # from now on, records of this batch are refused, not sent

        def abort() -> None:
            # Records still waiting for room never reached librdkafka: fail them now, or the poller would
            # send them later, into the next transaction.
            client.discard_backlog(TransactionAbortedError(
                "the record's transaction was aborted before it was sent; its input is consumed again"))
            # Let what was accepted be delivered first (into the doomed transaction): purged records would
            # be reported as failures, and a failure is what an engine retries.
            try:
                client.flush_blocking(min(timeout, 10.0))
            except Exception as exc:  # whatever went wrong, the abort must still happen
                logger.warning("%s: flushing before the abort: %s; aborting anyway", self._what, exc)
            # librdkafka expects a failed or timed-out abort to be called again; until one succeeds, no
            # transaction can begin.
            for attempt in range(1, ABORT_ATTEMPTS + 1):
                try:
                    producer.abort_transaction(timeout)
                    return
                except KafkaException as exc:
                    error = exc.args[0] if exc.args else None
                    if (isinstance(error, KafkaError) and error.fatal()) or attempt == ABORT_ATTEMPTS:
                        raise
                    backoff = min(ABORT_BACKOFF_MAX, ABORT_BACKOFF * 2 ** (attempt - 1))
                    logger.warning("%s: aborting the transaction failed (%s); trying again in %.1f s (attempt %d "
                                   "of %d)", self._what, exc, backoff, attempt, ABORT_ATTEMPTS)
                    time.sleep(backoff)  # a backoff: nothing to wait for but the broker

        try:
            if self._open:
                await self._txn_worker.submit(abort)
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.fatal():
                self._fatal = error
            logger.error("%s: aborting the transaction failed: %s", self._what, exc)
        finally:
            targets = {key: state.restart for key, state in self._tracker.partitions.items() if state.restart >= 0}
            self._rewind(targets)
            self._closed_transaction()

    def _closed_transaction(self) -> None:
        self._open = False
        self._client.in_transaction = False
        if self._idle is not None:
            self._idle.set()

    async def _before_release(self, timeout: float) -> None:
        """On revoke: the batch in progress must commit (or abort) while the partitions are still ours."""
        if self._idle is None or self._idle.is_set():
            return
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            logger.warning("%s: the open transaction did not finish before the revoke deadline", self._what)

    async def _before_close(self) -> None:
        if self._open:
            logger.info("%s: aborting the unfinished transaction at close", self._what)
            await self.abort()

    async def close(self) -> None:
        try:
            await super().close()
        finally:
            if self._txn_worker is not None:
                self._txn_worker.stop()
            if self._acquired:
                self._acquired = False
                await asyncio.to_thread(self._client.release, 30.0)


def _register(state: Any, offsets: list[int]) -> None:
    """Offsets consumed for the first time, in order, into a partition's state (PartitionOffsets.consumed)."""
    if state.first < 0:
        state.first = offsets[0]
    state.outstanding.extend(offsets)
    state.next = offsets[-1] + 1


def _describe(keys: Any) -> str:
    return ", ".join(f"{t}[{p}]" for t, p in sorted(keys)) or "none"
