"""The in-memory broker itself: named queues split into partitions, with acks, nacks, redelivery and delays.

See :mod:`volley.memory` for what it promises; :mod:`volley.memory.connector` serves it to the engine.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import heapq
import itertools
import math
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from volley.errors import ConfigurationError
from volley.message import Envelope, Headers, OutgoingMessage
from volley.scheduler import Scheduler

# The messages per queue that a broker keeps for produced() / produced_records(); the process-wide default
# broker, which lives as long as the process, keeps fewer.
DEFAULT_LOG_LIMIT = 100_000
DEFAULT_BROKER_LOG_LIMIT = 1_000

# (value, key, headers, queue name, partition, sequence, timestamp, attempt): Envelope's positional arguments,
# so that handing a message out is Envelope(*stored).
_Stored = tuple[bytes, bytes | None, Headers | None, str, int, int, float, int]


class _Queue:
    __slots__ = ("name", "partitions", "owned", "log", "waiters", "delayed", "acked", "next_partition")

    def __init__(self, name: str, partitions: int, log_limit: int | None) -> None:
        self.name = name
        self.partitions: list[deque[_Stored]] = [deque() for _ in range(partitions)]
        # consumer id -> {position: message}: what each consumer holds unacknowledged
        self.owned: dict[int, dict[int, _Stored]] = {}
        self.log: deque[_Stored] = deque(maxlen=log_limit)  # the latest log_limit published messages
        self.waiters: list[tuple[asyncio.AbstractEventLoop, asyncio.Future[None]]] = []
        self.delayed = 0
        self.acked = 0
        self.next_partition = 0

    def ready(self) -> int:
        return sum(len(p) for p in self.partitions)

    def held(self) -> int:
        return sum(len(o) for o in self.owned.values())


class MemoryBroker:
    """Named in-memory queues with partitions, acks, nacks and redelivery.

    ``partitions`` is the number of partitions of every queue created on first
    use; a message with a key always lands in the same partition; one without
    a key goes round-robin. ``keep_log`` keeps the messages published to each
    queue for test assertions (``produced``, ``produced_records``): the latest
    ``log_limit`` of them per queue (``DEFAULT_LOG_LIMIT``, 100,000; ``None``
    for no bound), older ones are forgotten, so a long run holds bounded
    memory. The process-wide ``default_broker()`` keeps only the latest
    ``DEFAULT_BROKER_LOG_LIMIT`` (1,000). Turn ``keep_log`` off for long
    benchmarks.
    """

    def __init__(self, partitions: int = 1, keep_log: bool = True, log_limit: int | None = DEFAULT_LOG_LIMIT) -> None:
        if partitions < 1:
            raise ConfigurationError("MemoryBroker needs at least one partition")
        if log_limit is not None and (isinstance(log_limit, bool) or not isinstance(log_limit, int)
                                      or log_limit < 0):
            raise ConfigurationError(f"MemoryBroker log_limit must be a non-negative integer, got {log_limit!r}")
        self.log_limit = log_limit
        self._lock = threading.Lock()
        # Delayed publishes and delayed nacks: one thread for the whole broker, started when first needed.
        self._scheduler = Scheduler(f"volley-memory-scheduler-{id(self):x}")
        self._queues: dict[str, _Queue] = {}
        self._sequence = itertools.count()
        self._partitions = partitions
        self.keep_log = keep_log

    # ---------------------------------------------------------------- queues

    def _queue(self, name: str) -> _Queue:
        queue = self._queues.get(name)
        if queue is None:
            queue = self._queues[name] = _Queue(name, self._partitions, self.log_limit)
        return queue

    def create_queue(self, name: str, partitions: int | None = None) -> None:
        """Create a queue with its own partition count (queues are otherwise created on first use)."""
        with self._lock:
            if name not in self._queues:
                self._queues[name] = _Queue(name, partitions or self._partitions, self.log_limit)

    def queue_names(self) -> list[str]:
        with self._lock:
            return sorted(self._queues)

    # ---------------------------------------------------------------- producing

    def publish(
        self,
        queue: str,
        value: bytes,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
    ) -> None:
        """Put one message on a queue: the plain API for tests and seeding."""
        self.publish_many([OutgoingMessage(queue, value, key, headers, partition)])

    def publish_many(self, messages: Sequence[OutgoingMessage]) -> None:
        """Store ``messages``, all or nothing: a record whose ``partition`` is not an int in range, whose ``delay``
        is not a non-negative finite number, or whose key is not bytes raises (ValueError or TypeError, naming
        the record) before anything of the call is stored."""
        self._publish(messages, None)

    def _publish(self, messages: Sequence[OutgoingMessage], released: str | None) -> None:
        """Store ``messages``; ``released`` names the queue of a delayed message now due, whose pending
        count drops in the same locked section that stores it, so no drain check sees it in neither place."""
        now = time.time()
        woken: list[_Queue] = []
        delayed: list[OutgoingMessage] = []
        sequence = self._sequence
        keep_log = self.keep_log
        with self._lock:
            if released is not None:
                self._queue(released).delayed -= 1
            self._check_all(messages)
            topic = None
            queue: _Queue | None = None
            single: Callable[[_Stored], None] | None = None  # the append of a one-partition queue
            for message in messages:
                if message.delay:
                    delayed.append(message)
                    self._queue(message.topic).delayed += 1
                    continue
                if message.topic != topic:
                    topic = message.topic
                    queue = self._queue(topic)
                    single = queue.partitions[0].append if len(queue.partitions) == 1 else None
                    if queue.waiters and queue not in woken:
                        woken.append(queue)
                if single is not None and message.partition is None and message.key is None:
                    stored: _Stored = (message.value, None, message.headers, topic, 0, next(sequence), now, 1)
                    single(stored)
                else:
                    assert queue is not None
                    stored = self._store(queue, message, now)
                    queue.partitions[stored[4]].append(stored)
                if keep_log:
                    assert queue is not None
                    queue.log.append(stored)
        for queue in woken:
            self._wake(queue)
        for message in delayed:
            self._publish_later(message)

    def _check_all(self, messages: Sequence[OutgoingMessage]) -> None:
        """All or nothing: check every record's options before any is stored, so that a bad record never leaves
        its call half-stored (the producer reports the whole call as failed, and nothing of it was stored).
        Called under the lock, once per call; a plain record costs one test here."""
        for message in messages:
            if (message.partition is not None or message.delay is not None
                    or (message.key is not None and message.key.__class__ is not bytes)):
                self._check(message, messages)

    def _check(self, message: OutgoingMessage, call: Sequence[OutgoingMessage]) -> None:
        """Raise TypeError or ValueError, naming the record, if its partition, delay or key cannot be stored.
        Called under the lock (the partition count of the queue is read)."""
        # Typed loosely on purpose: records come from user code (output options), whatever their annotations say.
        partition: Any = message.partition
        delay: Any = message.delay
        key: Any = message.key
        problem: str | None = None
        error: type[Exception] = TypeError
        if partition is not None:
            if isinstance(partition, bool) or not isinstance(partition, int):
                problem = f"partition must be an int, got {partition!r}"
            else:
                count = len(self._queue(message.topic).partitions)
                if not 0 <= partition < count:
                    problem, error = f"queue has {count} partition(s) (0 to {count - 1}), not {partition}", ValueError
        if problem is None and delay is not None:
            if isinstance(delay, bool) or not isinstance(delay, (int, float)):
                problem = f"delay must be a number of seconds, got {delay!r}"
            elif not (math.isfinite(delay) and delay >= 0):
                problem, error = f"delay must be a non-negative finite number of seconds, got {delay!r}", ValueError
        if problem is None and key is not None and not isinstance(key, bytes):
            problem = f"key must be bytes or None, got {type(key).__name__}"
        if problem is not None:
            index = next(i for i, m in enumerate(call) if m is message)
            raise error(f"record {index} of {len(call)} to queue {message.topic!r}: {problem}; nothing of the call "
                        "was stored")

    def _store(self, queue: _Queue, message: OutgoingMessage, now: float) -> _Stored:
        count = len(queue.partitions)
        if message.partition is not None:  # checked by _check: in range
            partition = message.partition
        elif message.key is not None:
            partition = zlib.crc32(message.key) % count
        else:
            partition = queue.next_partition
            queue.next_partition = (partition + 1) % count
        return (message.value, message.key, message.headers, queue.name, partition, next(self._sequence), now, 1)

    def _publish_later(self, message: OutgoingMessage) -> None:
        def release() -> None:
            due = OutgoingMessage(message.topic, message.value, message.key, message.headers, message.partition)
            self._publish([due], message.topic)

        self._scheduler.schedule(float(message.delay or 0), release)

    def _wake(self, queue: _Queue) -> None:
        with self._lock:
            waiters, queue.waiters = queue.waiters, []
        for loop, future in waiters:
            with contextlib.suppress(RuntimeError):  # that loop is closed; its consumer is gone
                loop.call_soon_threadsafe(_resolve, future)

    # ---------------------------------------------------------------- consuming

    def take(self, queue_name: str, max_messages: int, owner: int = 0) -> list[Envelope]:
        """Hand out up to ``max_messages`` ready messages, round-robin over partitions, in order within each.

        ``owner`` identifies the consumer that holds them until ack or nack.
        """
        out: list[Envelope] = []
        with self._lock:
            queue = self._queue(queue_name)
            partitions = queue.partitions
            owned = queue.owned.get(owner)
            if owned is None:
                owned = queue.owned[owner] = {}
            if len(partitions) == 1:
                part = partitions[0]
                popleft, append = part.popleft, out.append
                for _ in range(min(max_messages, len(part))):
                    stored = popleft()
                    owned[stored[5]] = stored
                    append(Envelope(*stored))
                return out
            while len(out) < max_messages:
                progressed = False
                for part in partitions:
                    if part:
                        stored = part.popleft()
                        owned[stored[5]] = stored
                        out.append(Envelope(*stored))
                        progressed = True
                        if len(out) >= max_messages:
                            break
                if not progressed:
                    break
        return out

    async def wait(self, queue_name: str, timeout: float) -> None:
        """Wait until the queue may have messages, or ``timeout`` passes; it always yields to the event loop."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[None] = loop.create_future()
        with self._lock:
            queue = self._queue(queue_name)
            ready = queue.ready() > 0
            if not ready:
                queue.waiters.append((loop, future))
        if ready:
            await asyncio.sleep(0)  # still a yield to the loop: the caller may be polling in a loop
            return
        try:
            await asyncio.wait_for(future, timeout)
        except TimeoutError:
            pass
        finally:
            with self._lock:
                queue.waiters = [w for w in queue.waiters if w[1] is not future]

    def ack(self, queue_name: str, positions: Iterable[int], owner: int = 0) -> None:
        with self._lock:
            queue = self._queue(queue_name)
            owned = queue.owned.get(owner, {})
            before = len(owned)
            pop = owned.pop
            for position in positions:
                pop(position, None)
            queue.acked += before - len(owned)

    def nack(self, queue_name: str, positions: Sequence[int] | None, delay: float = 0.0, owner: int = 0) -> None:
        """Give messages back (all the owner's, when ``positions`` is None); after ``delay`` they go to the
        head of their partitions, attempt count raised."""
        with self._lock:
            queue = self._queue(queue_name)
            owned = queue.owned.get(owner, {})
            if positions is None:
                positions = list(owned)
            returned = [owned.pop(p) for p in positions if p in owned]
            if delay > 0:
                queue.delayed += len(returned)
        if not returned:
            return
        if delay > 0:
            self._scheduler.schedule(delay, functools.partial(self._requeue, queue_name, returned, True))
        else:
            self._requeue(queue_name, returned, False)

    def _requeue(self, queue_name: str, returned: list[_Stored], was_delayed: bool) -> None:
        with self._lock:
            queue = self._queue(queue_name)
            if was_delayed:
                queue.delayed -= len(returned)
            # Put back in reverse so that the earliest message ends up first in its partition.
            for stored in sorted(returned, key=lambda s: s[5], reverse=True):
                again = (*stored[:7], stored[7] + 1)
                queue.partitions[stored[4]].appendleft(again)
        self._wake(queue)

    def forget_owner(self, queue_name: str, owner: int) -> None:
        """Drop a closed consumer's (empty) bookkeeping."""
        with self._lock:
            queue = self._queue(queue_name)
            if not queue.owned.get(owner, True):
                del queue.owned[owner]

    def close(self) -> None:
        """Stop the broker's scheduler thread. Delayed publishes and delayed nacks not yet due are made ready at
        once rather than lost; the queues stay usable, and a later delay starts a new scheduler thread.

        Without ``close()`` the thread ends by itself once nothing has been scheduled for a second."""
        for action in self._scheduler.close():
            action()

    # ---------------------------------------------------------------- inspection

    def produced(self, queue_name: str) -> list[bytes]:
        """The values published to the queue, in publication order (needs ``keep_log``): the latest ``log_limit``."""
        with self._lock:
            return [s[0] for s in self._queue(queue_name).log]

    def produced_records(self, queue_name: str) -> list[Envelope]:
        """The messages published to the queue, with key, headers and partition: the latest ``log_limit``."""
        with self._lock:
            return [Envelope(*s[:7]) for s in self._queue(queue_name).log]

    def depth(self, queue_name: str) -> int:
        """Messages waiting to be consumed (not counting those handed out and not yet acked)."""
        with self._lock:
            return self._queue(queue_name).ready()

    def unacked(self, queue_name: str) -> int:
        with self._lock:
            return self._queue(queue_name).held()

    def acked(self, queue_name: str) -> int:
        with self._lock:
            return self._queue(queue_name).acked

    def is_idle(self, queue_name: str | None = None) -> bool:
        """No message ready, handed out, or waiting for a delayed (re)delivery: nothing left to do."""
        with self._lock:
            queues = [self._queue(queue_name)] if queue_name else list(self._queues.values())
            return all(q.ready() == 0 and q.held() == 0 and q.delayed == 0 for q in queues)

    def is_drained_for(self, queue_name: str, owner: int) -> bool:
        """One consumer's view: nothing ready or delayed in the queue, and nothing handed to that consumer."""
        with self._lock:
            queue = self._queue(queue_name)
            return queue.ready() == 0 and queue.delayed == 0 and not queue.owned.get(owner)

    def browse(self, queue_name: str, after: int, upto: int, max_messages: int) -> list[Envelope]:
        """Stored messages (ready or handed out, not yet acked) with ``after < position <= upto``, in position
        order, without taking them: nothing changes (for ``volley dlq``)."""
        with self._lock:
            queue = self._queue(queue_name)
            stored = [s for part in queue.partitions for s in part if after < s[5] <= upto]
            stored += [s for owned in queue.owned.values() for s in owned.values() if after < s[5] <= upto]
        return [Envelope(*s) for s in heapq.nsmallest(max_messages, stored, key=_position_of)]

    def mark(self) -> int:
        """A position no message has: every message stored before has a lower one, every later one a higher."""
        with self._lock:
            return next(self._sequence)

    def delete(self, queue_name: str, positions: Iterable[int]) -> int:
        """Remove these messages for good, wherever they are (ready or handed out); returns how many were found."""
        wanted = set(positions)
        removed = 0
        with self._lock:
            queue = self._queue(queue_name)
            for index, part in enumerate(queue.partitions):
                kept = deque(s for s in part if s[5] not in wanted)
                removed += len(part) - len(kept)
                queue.partitions[index] = kept
            for owned in queue.owned.values():
                for position in wanted & owned.keys():
                    del owned[position]
                    removed += 1
        return removed

    def purge(self, queue_name: str) -> None:
        with self._lock:
            queue = self._queue(queue_name)
            for part in queue.partitions:
                part.clear()
            queue.log.clear()


def _position_of(stored: _Stored) -> int:
    return stored[5]


def _resolve(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


_default_broker: MemoryBroker | None = None
_default_lock = threading.Lock()


def default_broker() -> MemoryBroker:
    """The process-wide broker that ``memory`` queues use unless their config names another.

    It lives as long as the process, so its log is short: ``produced()`` gives the latest
    ``DEFAULT_BROKER_LOG_LIMIT`` messages of each queue."""
    global _default_broker
    with _default_lock:
        if _default_broker is None:
            _default_broker = MemoryBroker(log_limit=DEFAULT_BROKER_LOG_LIMIT)
        return _default_broker


def reset_default_broker(broker: MemoryBroker | None = None) -> MemoryBroker:
    """Start over with an empty (or the given) process-wide broker: for tests and demos."""
    global _default_broker
    with _default_lock:
        _default_broker = broker or MemoryBroker(log_limit=DEFAULT_BROKER_LOG_LIMIT)
        return _default_broker
