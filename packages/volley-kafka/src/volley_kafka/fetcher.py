"""The thin side of the Kafka consumer: the librdkafka client, the one thread that calls it, and its mailbox.

Everything here runs on the fetch thread, except the mailbox's ``ask_*`` and
``want_pauses`` methods, which the event loop calls to leave requests. No
policy lives here: what to commit, when to pause and what a rebalance means
are decided in consumer.py (whose module docstring has the table of which
thread owns what); this module carries the decisions out.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from typing import Any

import confluent_kafka
from confluent_kafka import KafkaError, KafkaException, TopicPartition

from volley.errors import ConfigurationError
from volley_kafka.clients import cluster_metadata, is_fatal, log_client_error, make_client, with_callbacks
from volley_kafka.offsets import TopicPartitionKey
from volley_kafka.settings import ConsumerSettings
from volley_kafka.worker import BlockingWorker

logger = logging.getLogger("volley_kafka")

# How many of the latest releases Fetcher.released_since answers for: an input in flight across more rebalances
# than this is treated as released (an exactly-once commit refuses it; its input comes again).
RELEASES_KEPT = 1_000

POLL_SLICE = 0.2
"""Longest single wait inside librdkafka, so that close and cancellation are served promptly."""
WATERMARK_INTERVAL = 1.0
"""How often the fetch thread copies librdkafka's cached end offsets for lag()."""
ERROR_LOG_INTERVAL = 30.0
SILENT_ERRORS = frozenset({KafkaError._PARTITION_EOF, KafkaError._NO_OFFSET})

Offsets = list[tuple[str, int, int]]
Fetched = tuple[int, frozenset[TopicPartitionKey], int, list[Any]]
"""The seek epoch and the release count the fetch started in, the assignment when it ended, the records."""
CommitSettled = Callable[[KafkaError | None, Offsets, float | None], None]


class KafkaErrors:
    """What librdkafka reports: logged (a message's error at most every 30 s per code), the fatal one kept.

    ``client_error`` is librdkafka's error callback (fetch thread), ``message_error`` runs on the loop for an
    error delivered as a message; ``fatal`` is written by either (or by a failed transaction) and read by the
    loop, which stops the app on it.
    """

    def __init__(self, what: str, topics: tuple[str, ...]) -> None:
        self._what = what
        self._topics = topics
        self._logged: dict[int, float] = {}
        self.fatal: KafkaError | None = None

    def client_error(self, error: KafkaError) -> None:
        if log_client_error(self._what, error):
            self.fatal = error

    def message_error(self, message: Any, error: KafkaError) -> None:
        code = error.code()
        if code in SILENT_ERRORS:
            return
        if is_fatal(error):
            self.fatal = error
            logger.error("%s: fatal error: %s", self._what, error.str())
            return
        now = time.monotonic()
        if now - self._logged.get(code, -ERROR_LOG_INTERVAL) < ERROR_LOG_INTERVAL:
            return
        self._logged[code] = now
        where = message.topic() or ",".join(self._topics)
        if code in (KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION):
            logger.warning("%s: %s: %s (waiting for it to be created)", self._what, where, error.str())
        else:
            logger.error("%s: %s: %s", self._what, where, error.str())


class Fetcher:
    """The librdkafka consumer of one Volley consumer and its fetch thread.

    The loop leaves requests (commits, seeks, the wanted pause state) in the mailbox; the fetch thread carries
    them out at the start and end of each fetch and while it waits. The engine fetches continuously, also while
    paused, so requests are served within one poll interval.
    """

    def __init__(self, settings: ConsumerSettings, what: str, name: str, *, on_error: Callable[[KafkaError], None],
                 on_commit_settled: CommitSettled) -> None:
        self._settings = settings
        self._what = what
        self._name = name
        self._on_commit_settled = on_commit_settled
        config = with_callbacks(settings.librdkafka, on_commit=self._on_commit_result, error_cb=on_error)
        self.client: Any = make_client(config, what, confluent_kafka.Consumer)
        self._worker: BlockingWorker | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        # written by the fetch thread, read anywhere (replaced whole, never mutated)
        self.assigned: frozenset[TopicPartitionKey] = frozenset()
        self.releases = 0  # times partitions left ``assigned`` (counted before they leave: see ``release``)
        # (base, history): history[i] holds the partitions that left at release base + i + 1; the latest
        # RELEASES_KEPT to 2 * RELEASES_KEPT are kept (``released_since``), the tuple is replaced whole when trimmed
        self._released: tuple[int, list[frozenset[TopicPartitionKey]]] = (0, [])
        self.high_watermarks: dict[TopicPartitionKey, int] = {}  # for lag()
        self.rebalancing = False  # a rebalance callback is waiting for the loop: no consumer calls from there
        # written by the loop, read by the fetch thread
        self.closing = False
        # The seek epoch: bumped with a rewind's seeks (``ask_rewind``), read by the fetch thread as it applies them
        # (``serve``), both under ``_seek_lock``: a record read after a rewind's seek always carries its epoch.
        self.epoch = 0
        self._seek_lock = threading.Lock()
        # the mailbox: the loop appends (or sets), the fetch thread takes
        self._commits: deque[tuple[Offsets, float]] = deque()
        self._seeks: deque[TopicPartition] = deque()
        self._pause_dirty = False
        self._hard_paused = False
        self._delayed: frozenset[TopicPartitionKey] = frozenset()
        # the fetch thread's own
        self._commit_started: deque[float] = deque()
        self._next_watermarks = 0.0
        self._committed_cache: dict[TopicPartitionKey, int] = {}

    # ================================================================== lifecycle (the loop)

    @property
    def started(self) -> bool:
        return self._worker is not None

    def submit(self, call: Callable[[], Any]) -> asyncio.Future[Any]:
        assert self._worker is not None
        return self._worker.submit(call)

    async def start(self, on_assign: Callable[[Any, list[TopicPartition]], None],
                    on_revoke: Callable[[Any, list[TopicPartition]], None],
                    on_lost: Callable[[Any, list[TopicPartition]], None]) -> Any:
        """Start the fetch thread, check the topics (returns the metadata, or None when the check is off), and
        subscribe with the rebalance callbacks."""
        self._loop = asyncio.get_running_loop()
        self._worker = BlockingWorker(self._name)
        metadata = None
        timeout = self._settings.startup_timeout
        if timeout > 0:
            metadata = await self._worker.submit(functools.partial(self._metadata, timeout))
        try:
            await self._worker.submit(functools.partial(
                self.client.subscribe, list(self._settings.topics), on_assign=on_assign, on_revoke=on_revoke,
                on_lost=on_lost))
        except KafkaException as exc:
            raise ConfigurationError(f"{self._what}: cannot subscribe: {exc}") from None
        return metadata

    def _metadata(self, timeout: float) -> Any:
        """The start-up check, on a throwaway client: asked on the group member itself, librdkafka would
        notice a topic created later only at its periodic metadata refresh (five minutes by default)."""
        probe: Any = make_client(with_callbacks(self._settings.librdkafka), self._what, confluent_kafka.Consumer)
        try:
            return cluster_metadata(probe, self._what, self._settings.librdkafka.get("bootstrap.servers"), timeout)
        finally:
            try:
                probe.close()
            except (KafkaException, RuntimeError) as exc:
                logger.debug("%s: closing the start-up probe: %s", self._what, exc)

    async def close(self, final: Offsets) -> None:
        """Commit ``final`` (if any), close the client and stop the thread. Queued commits are superseded."""
        worker = self._worker
        if worker is None:  # never started: no thread ever called the client
            self.closing = True
            self.client.close()
            return
        try:
            self._commits.clear()
            if final:
                await worker.submit(functools.partial(self.commit_sync, final, "at close"))
        finally:
            self.closing = True
            try:
                await worker.submit(self.client.close)
            except (KafkaException, RuntimeError) as exc:
                logger.warning("%s: closing: %s", self._what, exc)
            worker.stop()

    def to_loop(self, callback: Callable[..., Any], *args: Any) -> None:
        loop = self._loop
        if loop is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(callback, *args)

    # ================================================================== the mailbox (the loop's side)

    def ask_commit(self, offsets: Offsets, started: float) -> None:
        self._commits.append((offsets, started))

    def ask_seek(self, partition: TopicPartition) -> None:
        self._seeks.append(partition)

    def ask_rewind(self, partitions: list[TopicPartition]) -> int:
        """Seek these partitions back in a new seek epoch, returned: records fetched before the seeks carry an
        earlier one (``PartitionOffsets.stale``)."""
        with self._seek_lock:
            self.epoch += 1
            self._seeks.extend(partitions)
            return self.epoch

    def want_pauses(self, hard: bool, delayed: frozenset[TopicPartitionKey]) -> None:
        """The pause state the loop wants: every partition (hard), else the delayed ones."""
        self._hard_paused = hard
        self._delayed = delayed
        self._pause_dirty = True

    # ================================================================== fetching (the fetch thread)

    def fetch(self, count: int, timeout: float) -> Fetched:
        """What is ready now, else wait for the first message and take what followed it."""
        consumer = self.client
        releases = self.releases  # at the start: a release during this call counts as after it
        epoch = self.serve()  # the seek epoch of the records read from here on
        messages: list[Any] = consumer.consume(count, 0)
        if not messages and timeout > 0:
            deadline = time.monotonic() + timeout
            while not self.closing:
                first = consumer.poll(min(POLL_SLICE, timeout))
                if first is not None:
                    messages = consumer.consume(count - 1, 0) if count > 1 else []
                    messages.insert(0, first)
                    break
                timeout = deadline - time.monotonic()
                if timeout <= 0:
                    break
                # e.g. a resume while waiting; a rewind's seeks too: nothing is read yet, and what comes next is
                # read after them (tagged with the earlier epoch, records past a rewind target that has no record
                # of its own, a transaction marker, were dropped as stale for good)
                epoch = self.serve()
        self.serve()
        now = time.monotonic()
        if now >= self._next_watermarks:
            self._next_watermarks = now + WATERMARK_INTERVAL
            self._refresh_watermarks()
        # Records of partitions given up during this or an earlier call (a rebalance callback ran inside it;
        # librdkafka returns what it had collected before) are dropped by the loop against this assignment.
        return epoch, self.assigned, releases, messages

    def _refresh_watermarks(self) -> None:
        """librdkafka's cached end offsets of the assigned partitions, for lag()."""
        highs: dict[TopicPartitionKey, int] = {}
        for topic, partition in self.assigned:
            try:
                _low, high = self.client.get_watermark_offsets(TopicPartition(topic, partition), cached=True)
            except KafkaException:
                continue
            if high >= 0:
                highs[(topic, partition)] = high
        self.high_watermarks = highs  # replaced whole: the loop reads it without a lock

    def serve(self) -> int:
        """Carry out what the loop asked for (commits, seeks, pause state); returns the seek epoch of what is read
        next."""
        self.send_commits()
        with self._seek_lock:
            epoch = self.epoch
            if self._seeks:
                failed: list[TopicPartition] = []
                while self._seeks:
                    partition = self._seeks.popleft()
                    if (partition.topic, partition.partition) not in self.assigned:
                        continue
                    try:
                        self.client.seek(partition)
                    except KafkaException as exc:  # e.g. not yet fetching after an assignment: try again
                        logger.debug("%s: seek %s deferred: %s", self._what, partition, exc)
                        failed.append(partition)
                self._seeks.extend(failed)
        if self._pause_dirty:
            self._pause_dirty = False
            self._apply_pauses()
        return epoch

    def send_commits(self) -> None:
        while self._commits:
            offsets, started = self._commits.popleft()
            assigned = self.assigned
            if any((t, p) not in assigned for t, p, _ in offsets):  # never commit a partition given up
                offsets = [o for o in offsets if (o[0], o[1]) in assigned]
                if not offsets:
                    continue
            try:
                self.client.commit(offsets=[TopicPartition(t, p, o) for t, p, o in offsets], asynchronous=True)
            except KafkaException as exc:
                self.to_loop(self._on_commit_settled, exc.args[0] if exc.args else None, offsets, None)
            else:
                self._commit_started.append(started)

    def _on_commit_result(self, error: KafkaError | None, partitions: list[TopicPartition]) -> None:
        """librdkafka's commit callback (fetch thread)."""
        # None: a synchronous commit (revoke, close), which is not timed.
        started = self._commit_started.popleft() if self._commit_started else None
        refused = [tp for tp in partitions if tp.error is not None]
        failed = [(tp.topic, tp.partition, tp.offset) for tp in refused]
        if error is not None and error.code() != KafkaError._NO_OFFSET:
            failed = [(tp.topic, tp.partition, tp.offset) for tp in partitions]
        elif error is None and refused:
            error = refused[0].error  # refused per partition only: the loop names the reason (a rebalance, say)
        if started is not None or failed:
            self.to_loop(self._on_commit_settled, error, failed, started)

    def commit_sync(self, offsets: Offsets, why: str) -> bool:
        """Commit and wait: on revoke and at close."""
        started = time.monotonic()
        try:
            result = self.client.commit(offsets=[TopicPartition(t, p, o) for t, p, o in offsets],
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

    def _apply_pauses(self) -> None:
        """Make librdkafka's pause state what the loop wants."""
        assigned = self.assigned
        delayed = self._delayed & assigned
        paused = assigned if self._hard_paused else delayed
        running = assigned - paused
        try:
            if paused:
                self.client.pause([TopicPartition(t, p) for t, p in paused])
            if running:
                self.client.resume([TopicPartition(t, p) for t, p in running])
        except KafkaException as exc:
            logger.warning("%s: pause/resume: %s", self._what, exc)

    # ================================================================== rebalance bookkeeping (the fetch thread)

    def assigned_now(self, keys: set[TopicPartitionKey]) -> None:
        """The first half of an assignment callback: ours from now on."""
        self.assigned = self.assigned | keys
        self._committed_cache.clear()
        # librdkafka keeps a partition's pause across revoke and assign: a partition paused in an earlier
        # assignment would stay paused for good. Make its state the wanted one, whichever it is.
        self._pause_dirty = True

    def release(self, keys: set[TopicPartitionKey]) -> None:
        """The partitions are no longer ours. The history and ``releases`` move first: a reader on the loop that sees
        the smaller ``assigned`` also sees the count moved (an exactly-once commit refuses inputs of these
        partitions fetched before it: transactional.py)."""
        if keys & self.assigned:
            base, history = self._released
            if len(history) >= 2 * RELEASES_KEPT:  # a long-lived worker rebalanced thousands of times: keep it bounded
                base, history = base + len(history) - RELEASES_KEPT, history[-RELEASES_KEPT:]
            history.append(frozenset(keys))  # before the count: a reader of the count finds its entry
            self._released = (base, history)
            self.releases += 1
            self.assigned = self.assigned - keys

    def released_since(self, era: int, releases: int) -> frozenset[TopicPartitionKey] | None:
        """Any thread: the partitions that left after release ``era`` up to release ``releases`` (a value of
        ``self.releases`` read before this call); None when that history is no longer kept (RELEASES_KEPT
        releases or more ago), which a caller must take as "any of them may have left"."""
        base, history = self._released
        if era < base:
            return None
        return frozenset().union(*history[era - base:releases - base])

    def given_up(self, keys: list[TopicPartitionKey], final: Offsets) -> None:
        """The end of a revoke or loss: no longer ours; commit ``final`` (a revoke's last commit).

        What the loop queued for these partitions belongs to an assignment that is over: a commit sent now
        could move the new owner's offset back, and a seek carried out if they come back to us (at once, in an
        incremental rebalance) would skip past the offset committed here.
        """
        gone = set(keys)
        self.release(gone)
        self._drop_requests(gone)
        if final:
            self.commit_sync(final, "on revoke")

    def forget_committed(self) -> None:
        self._committed_cache.clear()

    def _drop_requests(self, gone: set[TopicPartitionKey]) -> None:
        """Remove queued commits and seeks of partitions given up.

        The fetch thread is the only one taking from these queues, and the loop only appends at their right:
        taking what is queued from the left and putting back what is kept loses nothing and keeps the order.
        """
        commits = self._commits
        queued = [commits.popleft() for _ in range(len(commits))]
        kept = [(offsets, started) for original, started in queued
                if (offsets := [o for o in original if (o[0], o[1]) not in gone])]
        commits.extendleft(reversed(kept))
        seeks = self._seeks
        queued_seeks = [seeks.popleft() for _ in range(len(seeks))]
        seeks.extendleft(reversed([tp for tp in queued_seeks if (tp.topic, tp.partition) not in gone]))

    # ================================================================== the broker's view (the fetch thread)

    def read_to_end(self, assigned: frozenset[TopicPartitionKey], positions: Mapping[TopicPartitionKey, int]) -> bool:
        """Every partition read to its end, from the loop's positions (-1: none read)."""
        if self.assigned != assigned or self.rebalancing:
            return False  # the assignment changed since the loop looked
        for (topic, partition), known in positions.items():
            tp = TopicPartition(topic, partition)
            try:
                low, high = self.client.get_watermark_offsets(tp, timeout=5.0, cached=False)
            except KafkaException:
                return False
            position = known if known >= 0 else self._committed_position(tp, low)
            if position < high:
                # A transaction's commit or abort marker takes an offset that is never delivered: librdkafka's
                # own position moves past it (and past aborted records, for read_committed).
                try:
                    fetched = int(self.client.position([tp])[0].offset)
                except KafkaException:
                    return False
                if fetched < high:
                    return False
        return True

    def _committed_position(self, tp: TopicPartition, low: int) -> int:
        """The cache is cleared by the rebalance callbacks (on this thread too)."""
        key = (tp.topic, tp.partition)
        cached = self._committed_cache.get(key)
        if cached is not None:
            return max(cached, low)
        try:
            committed = int(self.client.committed([tp], timeout=5.0)[0].offset)
        except KafkaException:
            return -1
        if committed < 0:
            return low  # nothing committed: auto.offset.reset decides; 'earliest' starts at the low watermark
        self._committed_cache[key] = committed
        return max(committed, low)
