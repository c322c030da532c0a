"""Per-partition offset bookkeeping: what may be committed is the contiguous prefix of finished messages.

Messages of one partition are consumed in offset order but may finish in any
order (concurrent handlers, outputs confirmed out of order, a slow second
output). Committing the offset of the latest finished message would skip an
earlier one that is still running, and a crash would lose it. So each
partition keeps the offsets it handed out, in order, and the set of those that
finished ahead of their turn; the committable position (the "watermark") is
the lowest unfinished offset, or one past the last consumed offset when
nothing is outstanding. Offsets need not be contiguous (compaction and
transaction markers leave gaps): only consumed offsets are tracked.

The same per-partition state also holds what else the consumer knows about a
partition it owns: the delivery attempts of nacked offsets and a rewind seek not
yet seen through. It is the one source of truth for them: forgetting a
partition (revoked, lost) drops all of it at once.

Pure Python, no Kafka: the consumer feeds it and asks it what to commit. Only
the event loop touches it (see the table in consumer.py).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

TopicPartitionKey = tuple[str, int]


class PartitionOffsets:
    """One partition: offsets handed out and not yet passed by the watermark, attempts, a pending rewind."""

    __slots__ = ("attempts", "committed", "done", "fence", "fence_until", "first", "next", "outstanding", "redeliver",
                 "sought", "sought_epoch")

    def __init__(self) -> None:
        self.outstanding: deque[int] = deque()  # consumed, in order; the head is the lowest unfinished one
        self.done: set[int] = set()  # finished, but behind an unfinished one
        self.redeliver: set[int] = set()  # nacked, to be handed out again when the partition is read again
        self.next = -1  # one past the last consumed offset; -1 before the first
        self.first = -1  # the first offset consumed since the partition was assigned
        self.committed = -1  # the last watermark committed (or sent in a transaction)
        self.attempts: dict[int, int] = {}  # nacked offset -> the attempt number of its next delivery
        self.sought = -1  # a rewind (aborted transaction) sought back to this offset ...
        self.sought_epoch = 0  # ... in this seek epoch; 0: none pending
        # Exactly-once: an input given back at this offset (-1: none). Records from it on are not handed out until
        # what came before it is committed and its redelivery delay (until ``fence_until``, loop time) is over.
        self.fence = -1
        self.fence_until = 0.0

    def register(self, offsets: list[int]) -> None:
        """Offsets consumed for the first time, in order (``consumed`` for a run of new offsets at once)."""
        if self.first < 0:
            self.first = offsets[0]
        self.outstanding.extend(offsets)
        self.next = offsets[-1] + 1

    def consumed(self, offset: int) -> bool:
        """Register a message read from the broker; False if it must not be handed out again.

        Reading an offset below ``next`` means the partition was sought back to redeliver a nacked
        message: only the nacked ones go out again; finished or still running ones are skipped.
        """
        if offset < self.next:
            if offset in self.redeliver:
                self.redeliver.discard(offset)
                return True
            return False
        if self.first < 0:
            self.first = offset
        self.outstanding.append(offset)
        self.next = offset + 1
        return True

    def finished(self, offset: int) -> None:
        if self.attempts:
            self.attempts.pop(offset, None)
        outstanding = self.outstanding
        if not outstanding:
            return
        head = outstanding[0]
        if offset == head:
            outstanding.popleft()
            done = self.done
            if done:
                while outstanding and outstanding[0] in done:
                    done.remove(outstanding.popleft())
                if not outstanding:
                    done.clear()
        elif head < offset < self.next:
            self.done.add(offset)
        else:
            return  # already passed, or from an earlier assignment
        if self.redeliver:
            self.redeliver.discard(offset)

    def nacked(self, offset: int) -> bool:
        """Mark an unfinished offset for redelivery; False if it is not one (already finished, or unknown)."""
        if not self.outstanding or not self.outstanding[0] <= offset < self.next or offset in self.done:
            return False
        self.redeliver.add(offset)
        return True

    def rewind(self, offset: int) -> None:
        """Forget everything from ``offset`` on, finished or not: all of it is consumed and handled again.

        For an aborted transaction, whose finished messages' outputs were thrown away.
        """
        outstanding = self.outstanding
        while outstanding and outstanding[-1] >= offset:
            outstanding.pop()
        if self.done:
            self.done = {o for o in self.done if o < offset}
        if self.redeliver:
            self.redeliver = {o for o in self.redeliver if o < offset}
        if self.next == -1 or offset < self.next:
            self.next = offset

    def rewound(self, offset: int, epoch: int) -> None:
        """Forget everything from ``offset`` on (see ``rewind``) and expect the partition to be read again
        from there: records fetched before the seek (seek epoch below ``epoch``) are stale until it is."""
        self.rewind(offset)
        self.sought = offset
        self.sought_epoch = epoch

    def stale(self, offset: int, epoch: int) -> bool:
        """A record fetched in seek epoch ``epoch``, read before the pending rewind's seek was applied (a fetch tags
        its records with the epoch of the seeks it applied before reading them: Fetcher.serve). Records above X, the
        rewind's target, are dropped; one at X starts a contiguous run (what follows it is read again, and skipped as
        below ``next``), so it goes out and the rewind counts as seen. ``sought_epoch`` may stay set when X has no
        record (a transaction marker): harmless, no later fetch carries an earlier epoch."""
        if self.sought_epoch <= epoch:
            return False
        if offset == self.sought:
            self.sought_epoch = 0
            return False
        return offset > self.sought

    def fenced_at(self, offset: int, until: float) -> None:
        """An input at ``offset`` was given back, to come again no earlier than ``until`` (see ``fence``)."""
        if self.fence < 0 or offset < self.fence:
            self.fence = offset
        self.fence_until = max(self.fence_until, until)

    def fence_passable(self, now: float, committing: int = -1) -> bool:
        """Whether the fence may be lifted: its delay is over, and everything before it is committed or in the
        transaction being committed (``committing``: the offset it sends). What is read past the fence then belongs
        to a later transaction; if this one aborts, the rewind goes back before the fence anyway."""
        return now >= self.fence_until and max(self.restart, committing) >= self.fence

    @property
    def restart(self) -> int:
        """Where reading must start again to redo everything not committed: -1 when nothing was consumed."""
        return self.committed if self.committed >= 0 else self.first

    @property
    def watermark(self) -> int:
        """The offset to commit: the next message to read after a restart. -1 when nothing was consumed."""
        if self.outstanding:
            return self.outstanding[0]
        return self.next

    @property
    def pending(self) -> int:
        return len(self.outstanding) - len(self.done)


class OffsetTracker:
    """All partitions of one consumer. Not thread-safe: the consumer calls it from the event loop only."""

    __slots__ = ("partitions",)

    def __init__(self) -> None:
        self.partitions: dict[TopicPartitionKey, PartitionOffsets] = {}

    def partition(self, topic: str, partition: int) -> PartitionOffsets:
        key = (topic, partition)
        state = self.partitions.get(key)
        if state is None:
            state = self.partitions[key] = PartitionOffsets()
        return state

    def consumed(self, topic: str, partition: int, offset: int) -> bool:
        return self.partition(topic, partition).consumed(offset)

    def finished(self, topic: str, partition: int, offset: int) -> None:
        state = self.partitions.get((topic, partition))
        if state is not None:
            state.finished(offset)

    def watermark(self, topic: str, partition: int) -> int:
        state = self.partitions.get((topic, partition))
        return -1 if state is None else state.watermark

    def committable(self, only: Iterable[TopicPartitionKey] | None = None) -> list[tuple[str, int, int]]:
        """(topic, partition, watermark) for every partition whose watermark moved past its last commit."""
        out: list[tuple[str, int, int]] = []
        keys = self.partitions.keys() if only is None else only
        for key in keys:
            state = self.partitions.get(key)
            if state is None:
                continue
            mark = state.watermark
            if mark > state.committed and mark > state.first:  # at `first`, nothing finished since assignment
                out.append((key[0], key[1], mark))
        return out

    def final(self, keys: Iterable[TopicPartitionKey]) -> list[tuple[str, int, int]]:
        """What to commit before giving partitions up: every watermark that moved since the assignment.

        Unlike ``committable`` it ignores earlier asynchronous commits, which may not have gone through.
        """
        out: list[tuple[str, int, int]] = []
        for key in keys:
            state = self.partitions.get(key)
            if state is not None and state.watermark > max(state.first, -1):
                out.append((key[0], key[1], state.watermark))
        return out

    def mark_committed(self, offsets: Iterable[tuple[str, int, int]]) -> None:
        for topic, partition, offset in offsets:
            state = self.partitions.get((topic, partition))
            if state is not None and offset > state.committed:
                state.committed = offset

    def commit_failed(self, offsets: Iterable[tuple[str, int, int]]) -> None:
        """A commit did not go through: make those partitions committable again."""
        for topic, partition, offset in offsets:
            state = self.partitions.get((topic, partition))
            if state is not None and state.committed >= offset:
                state.committed = -1

    def rewind(self, topic: str, partition: int, offset: int) -> None:
        state = self.partitions.get((topic, partition))
        if state is not None:
            state.rewind(offset)

    def forget(self, keys: Iterable[TopicPartitionKey]) -> None:
        for key in keys:
            self.partitions.pop(key, None)

    def clear(self) -> None:
        self.partitions.clear()

    def pending(self) -> int:
        """Messages consumed and not finished, over all partitions."""
        return sum(state.pending for state in self.partitions.values())
