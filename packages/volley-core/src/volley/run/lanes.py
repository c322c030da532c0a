"""Where an async handler runs: lanes on the event loop, one per ordering key, at most ``max_in_flight`` at once.

A lane handles its messages in order (a partition's, a key's, or a single message's when ordering is "none");
lanes beyond the limit wait their turn. Closing cancels every running lane and starts no waiting one, so no
handler call begins once shutdown has given up on the work that is left.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Callable, Sequence
from typing import Any

from volley.message import Envelope
from volley.ports import PartitionId
from volley.run.handling import Handling
from volley.run.settlement import Settlement
from volley.run.tokens import FAILED, Outcome, Token, any_revoked, is_revoked, members_of

logger = logging.getLogger("volley")


class AsyncLanes:
    def __init__(self, handling: Handling, settlement: Settlement, *, ordering: str, max_in_flight: int,
                 revoked: set[PartitionId], crash: Callable[[BaseException], None]) -> None:
        self.handling = handling
        self.settlement = settlement
        self.ordering = ordering
        self.max_in_flight = max_in_flight
        self.revoked = revoked
        self.crash = crash
        self.slots = len(settlement.producers)
        self.lanes: dict[Any, deque[tuple[Token, Any]]] = {}
        self.waiting: deque[Any] = deque()
        self.calling: dict[Any, Token] = {}  # lane -> the token its task is handling (awaiting its call)
        self.active = 0
        self.tasks: set[asyncio.Task[None]] = set()
        self.closed = False
        self.idle = asyncio.Event()  # no lane has work
        self.idle.set()

    async def run(self, batch: Sequence[Envelope]) -> None:
        """Decode the batch and queue each message on its lane (the lanes run on their own)."""
        out = Outcome(self.slots, 0, self.settlement.generation)
        if self.handling.batch_size:
            for group, chunk in self.handling.decode_groups(batch, out):
                self._enqueue("batch", group, chunk)
        else:
            decode, ordering, lanes = self.handling.decode, self.ordering, self.lanes
            for env in batch:
                message = decode(env, out)
                if message is FAILED:
                    continue
                if ordering == "partition":
                    lane: Any = (env.source, env.partition)
                elif ordering == "key":
                    lane = (env.source, env.key)
                else:
                    lane = object()
                queue = lanes.get(lane)
                if queue is None:
                    self._enqueue(lane, env, message)
                else:
                    queue.append((env, message))
        if out.failures:
            out.handled = len(out.failures)
            self.settlement.apply(out)

    def _enqueue(self, lane: Any, token: Token, message: Any) -> None:
        queue = self.lanes.get(lane)
        if queue is not None:
            queue.append((token, message))
            return
        self.lanes[lane] = deque([(token, message)])
        self.idle.clear()
        if self.active < self.max_in_flight:
            self._start(lane)
        else:
            self.waiting.append(lane)

    def _start(self, lane: Any) -> None:
        self.active += 1
        task = asyncio.ensure_future(self._run_lane(lane))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run_lane(self, lane: Any) -> None:
        queue = self.lanes[lane]
        settlement = self.settlement
        # An aborted transaction moves the generation on and resets the lanes: a task of an earlier generation
        # that outlives the reset (a handler slow to unwind) handles nothing more, and its work settles nothing.
        generation = settlement.generation
        try:
            while queue and not self.closed and settlement.generation == generation:
                token, message = queue[0]
                if self.revoked and _given_up(token, self.revoked):
                    queue.popleft()
                    self._abandon(len(members_of(token)))
                    continue
                self.calling[lane] = token
                try:
                    out = await self._handle(token, message, generation)
                finally:
                    if self.calling.get(lane) is token:  # (a task outliving a reset must not clear a new one's)
                        del self.calling[lane]
                queue.popleft()
                settlement.apply(out)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a bug of ours: stop loudly rather than stall the lane
            logger.exception("volley: an async lane failed")
            self.crash(exc)
        finally:
            if settlement.generation == generation:  # else reset() did the bookkeeping of the lanes it dropped
                self._lane_ended(lane, queue)

    def _lane_ended(self, lane: Any, queue: deque[tuple[Token, Any]]) -> None:
        if self.lanes.get(lane) is queue and not queue:
            del self.lanes[lane]
        self.active -= 1
        while self.waiting and self.active < self.max_in_flight and not self.closed:
            waiting = self.waiting.popleft()
            if waiting in self.lanes:
                self._start(waiting)
        if not self.lanes:
            self.idle.set()

    def working(self) -> bool:
        """Whether a lane has work: the lanes run on their own tasks, so it is finished without the process task."""
        return not self.idle.is_set()

    async def quiesce(self) -> None:
        """Until every message handed over so far is handled (a transaction closes: its inputs' work is done)."""
        await self.idle.wait()

    async def _handle(self, token: Token, message: Any, generation: int) -> Outcome:
        """Call, interpret, time one message (or group) of a lane (a task of ``generation``)."""
        out = Outcome(self.slots, len(members_of(token)), generation)
        try:
            await self.handling.process_async(token, message, out)
        except asyncio.CancelledError as exc:
            if self.closed or self.settlement.generation != generation:  # ours: shutdown or an aborted transaction
                raise
            _forget_cancellation()
            out.failures.append((token, "handler", exc))  # the handler cancelled its own task
        return out

    async def close(self, timeout: float) -> None:
        """Cancel every lane; no waiting lane starts after this."""
        self.closed = True
        self.waiting.clear()
        for task in list(self.tasks):
            task.cancel()
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)

    def holds(self, revoked: set[PartitionId]) -> bool:
        """Whether a lane is handling a message of these partitions, or holds a batch handler's group with one and
        with a member of a partition kept (a group is handled whole, never split: the revoke waits for it, as
        ``drop_queued`` keeps it; a queued group of revoked partitions only is dropped)."""
        if any(any_revoked(token, revoked) for token in self.calling.values()):
            return True
        return any(not isinstance(token, Envelope) and any_revoked(token, revoked) and not _given_up(token, revoked)
                   for queue in self.lanes.values() for token, _ in queue)

    def drop_queued(self, revoked: set[PartitionId]) -> None:
        """Drop queued messages (and batch groups) of partitions being revoked, all but the one each lane is
        handling (in its call): a lane started but not yet running, or waiting to start, drops its first one too."""
        dropped = 0
        waiting = set(self.waiting)
        for lane, queue in list(self.lanes.items()):
            calling = self.calling.get(lane)
            kept: list[tuple[Token, Any]] = []
            for index, item in enumerate(queue):
                if (index == 0 and item[0] is calling) or not _given_up(item[0], revoked):
                    kept.append(item)
                else:
                    dropped += len(members_of(item[0]))
            if len(kept) != len(queue):
                queue.clear()
                queue.extend(kept)
            if not queue and lane in waiting:  # it never starts (a started lane's task ends an empty one)
                del self.lanes[lane]
                self.waiting.remove(lane)
        if not self.lanes:
            self.idle.set()
        self._abandon(dropped)

    def _abandon(self, count: int) -> None:
        """Handed-over inputs dropped (their partition revoked): counted through an outcome, which waits with
        the others while a transaction ends."""
        if count:
            out = Outcome(self.slots, 0, self.settlement.generation)
            out.abandoned = count
            self.settlement.apply(out)

    async def reset(self, timeout: float) -> None:
        """Drop all queued and running work (its transaction aborted), then take new work again. The queues are
        emptied before the wait for the cancelled lanes: a revoke meanwhile must not drop (and count abandoned a
        second time) what the abort already gave up."""
        self.lanes.clear()
        self.waiting.clear()
        await self.close(timeout)
        self.lanes.clear()
        self.waiting.clear()
        self.calling.clear()
        self.active = 0
        self.closed = False
        self.idle.set()


def _given_up(token: Token, revoked: set[PartitionId]) -> bool:
    """Whether ``token`` is skipped, not handled: a message of a partition being revoked, or a batch handler's group
    whose every member is one (a group with a member of a partition kept is handled whole)."""
    if isinstance(token, Envelope):
        return is_revoked(token, revoked)
    return all(is_revoked(member, revoked) for member in token.members)


def _forget_cancellation() -> None:
    """The lane goes on after a cancellation that was not ours: clear the task's cancel request."""
    task = asyncio.current_task()
    if task is not None:
        while task.cancelling():
            task.uncancel()
