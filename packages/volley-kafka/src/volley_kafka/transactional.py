"""Exactly-once: the consumer whose input offsets commit in the same transaction as the outputs they caused.

The transactional producer is the one every Kafka output of the app uses (the
connector hands it to them). Transactions run on a thread of their own, so a
slow commit never holds up fetching; the one call into the librdkafka consumer
made from there is ``consumer_group_metadata()`` (see the table in consumer.py).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import operator
import time
from collections.abc import Mapping, Sequence
from typing import NoReturn, cast

from confluent_kafka import KafkaError, KafkaException, TopicPartition

from volley.errors import ConfigurationError, DeliveryError, TransactionAbortedError, VolleyError
from volley.message import Envelope
from volley.ports import QueueSpec
from volley_kafka.consumer import KafkaConsumer
from volley_kafka.envelope import KafkaEnvelope
from volley_kafka.offsets import TopicPartitionKey
from volley_kafka.producer import ProducerClient
from volley_kafka.settings import ConsumerSettings
from volley_kafka.worker import BlockingWorker

logger = logging.getLogger("volley_kafka")
_ERA = operator.attrgetter("era")  # KafkaEnvelope.era

ABORT_ATTEMPTS = 10
"""How many times an exactly-once abort is tried before the app gives up (the next begin then stops it)."""
ABORT_BACKOFF = 0.1
ABORT_BACKOFF_MAX = 5.0


class _ReleasedDuringCommitError(Exception):
    """Partitions whose offsets a commit was to send were released before it sent them (see commit)."""


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
        self._committing = False  # a commit's offsets are computed and it is being sent
        self._aborting = False  # an abort() is in progress
        self._doomed = False  # aborted at a revoke's deadline: the engine's commit of it must fail
        self._revoke_abort: asyncio.Task[None] | None = None  # that abort, until it is done (it outlives the revoke)

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
        if self._revoke_abort is not None:
            await self._revoke_aborted()
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

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        """Given back: the engine aborts the transaction next (ports.Transactional), and the rewind reads every
        partition from its last commit again. The input's offset cannot be committed, so neither can the outputs of
        the inputs after it: its partition is fenced there (offsets.PartitionOffsets.fence). It is handed out up to
        the fence, so that the next transaction commits what came before the input, and from the fence on once that
        commit is under way and the delay is over. However often inputs are given back, each abort is followed by
        progress; without the fence a random give-back in every transaction would abort all of them."""
        loop = asyncio.get_running_loop()
        partitions = self._tracker.partitions
        until = loop.time() + delay
        fenced: set[TopicPartitionKey] = set()
        for e in envelopes:
            key = (e.source, int(e.partition or 0))
            state = partitions.get(key)
            offset = int(e.position)
            if state is None or not state.restart <= offset < state.next:
                continue  # not handed out in this assignment (a late nack of an earlier one)
            state.attempts[offset] = e.attempt + 1
            state.fenced_at(offset, until)
            fenced.add(key)
        for key in fenced:
            loop.call_later(delay, self._fence_timer, key)

    def _hold(self, key: TopicPartitionKey) -> None:
        """A record at or past the partition's fence was fetched: dropped, and the partition paused until the fence
        lifts (then it is read again from the fence). No record lies between what was handed out and that record
        (records come in offset order), so the fence comes down to ``next``: offsets missing before it (transaction
        markers, compaction) must not keep what came before it from counting as committed. The lift is tried
        after this fetch's records are dealt with: a seek in the middle of them would let the rest through."""
        state = self._tracker.partitions.get(key)
        if state is not None and 0 <= state.next < state.fence:
            state.fence = state.next
        if key not in self._held:
            self._held.add(key)
            self._want_pauses()
            if self._loop is not None:
                self._loop.call_soon(self._lift_fence, key)

    def _fence_timer(self, key: TopicPartitionKey) -> None:
        """A fence's delay is over (a timer may fire a little early: then it waits the rest)."""
        state = self._tracker.partitions.get(key)
        if self._loop is not None and state is not None and state.fence >= 0:
            remaining = state.fence_until - self._loop.time()
            if remaining > 0:
                self._loop.call_later(remaining, self._fence_timer, key)
                return
        self._lift_fence(key)

    def _lift_fence(self, key: TopicPartitionKey, committing: int = -1) -> None:
        """Lift the partition's fence if it may be (offsets.PartitionOffsets.fence_passable): tried when a record
        hits it, when a commit sends the partition's offset (``committing``) and once it is done, and when its
        delay is over."""
        state = self._tracker.partitions.get(key)
        if state is None or state.fence < 0:  # forgotten (revoked), or lifted already
            if key in self._held:
                self._held.discard(key)
                self._want_pauses()
            return
        if self._loop is None or self._closed or not state.fence_passable(self._loop.time(), committing):
            return
        fence, state.fence = state.fence, -1
        if key in self._held:  # records from the fence on were dropped: read them again
            self._held.discard(key)
            state.rewound(fence, self._fetcher.ask_rewind([TopicPartition(key[0], key[1], fence)]))
            self._want_pauses()

    async def commit(self, envelopes: Sequence[Envelope]) -> None:
        """Send the finished inputs' watermarks with the transaction and commit it."""
        assert self._txn_worker is not None
        # Read before the release count (the fetch thread moves the count first): the partitions these offsets
        # cover are either still ours, or the count shows that some left.
        assigned = self._fetcher.assigned
        if self._doomed or self._released_since_fetched(envelopes):
            await self._refuse()
        if not self._open:
            await self.begin()
        if self._finish(envelopes):  # released, and forgotten by the loop, before the fetch thread counted it
            await self._refuse()
        offsets = self._tracker.committable(assigned)
        producer = self._client.producer
        fetcher = self._fetcher
        group_metadata = fetcher.client.consumer_group_metadata
        timeout = self._settings.revoke_timeout
        releases = fetcher.releases
        keys = {(t, p) for t, p, _ in offsets}

        def work() -> None:
            if offsets:
                # The member's current generation / epoch, not the one of the assignment: see consumer.py's docstring.
                metadata = group_metadata()
                # Unless the partitions were released since the commit began (a commit can outlive a revoke's
                # deadline, and start late on this thread): the metadata of the next generation would make the
                # broker take offsets this member no longer owns, while their next owner (this one again, maybe)
                # already read the old ones: their outputs would be visible twice. Read after the metadata: a
                # generation that began after a release shows the release counted (Fetcher.release).
                now = fetcher.releases
                if now != releases:
                    gone = fetcher.released_since(releases, now)
                    if gone is None or gone & keys:
                        raise _ReleasedDuringCommitError
                producer.send_offsets_to_transaction([TopicPartition(t, p, o) for t, p, o in offsets],
                                                     metadata, timeout)
            for attempt in range(5):
                try:
                    producer.commit_transaction(timeout)
                    return
                except KafkaException as exc:
                    error = exc.args[0] if exc.args else None
                    if isinstance(error, KafkaError) and error.retriable() and attempt < 4:
                        continue
                    raise

        partitions = self._tracker.partitions
        for topic, partition, offset in offsets:  # fences this commit passes: read on for the next transaction
            if partitions[(topic, partition)].fence >= 0:
                self._lift_fence((topic, partition), offset)
        started = time.monotonic()
        self._committing = True
        try:
            await self._txn_worker.submit(work)
        except _ReleasedDuringCommitError:
            self._committing = False  # nothing was sent: a revoke meanwhile must not wait for it as for a commit
            await self._refuse()
        except KafkaException as exc:
            error = exc.args[0] if exc.args else None
            if isinstance(error, KafkaError) and error.fatal():
                self._errors.fatal = error
                self._closed_transaction()
                raise VolleyError(f"{self._what}: fatal error committing a transaction: {error.str()}") from exc
            logger.warning("%s: committing the transaction failed (%s); aborting it", self._what, exc)
            await self.abort()
            raise DeliveryError(f"{self._what}: the transaction was aborted: {exc}; its inputs will be consumed "
                                "again") from exc
        finally:
            self._committing = False
        self._tracker.mark_committed(offsets)
        self._closed_transaction()
        for topic, partition, _ in offsets:  # a fence whose delay ended while this commit was sent
            state = partitions.get((topic, partition))  # (or forgotten meanwhile: revoked)
            if state is not None and state.fence >= 0:
                self._lift_fence((topic, partition))
        if self._observer is not None:
            self._observer.on_commit(self._app_name, time.monotonic() - started)

    async def _refuse(self) -> NoReturn:
        """Inputs of partitions released since they were fetched: their outputs are in the transaction (this one,
        or the one begun after the release with what was handled while the last one committed), but their offsets
        can no longer be sent. Committed, those outputs would become visible while the partitions' new owner
        handles the same inputs again: abort it instead, and the engine processes its inputs again."""
        logger.warning("%s: partitions were revoked before the transaction committed; aborting it", self._what)
        await self.abort()
        raise DeliveryError(f"{self._what}: the transaction was aborted: partitions were revoked before it "
                            "committed; its inputs will be consumed again")

    def _released_since_fetched(self, envelopes: Sequence[Envelope]) -> bool:
        """Whether the partition of any of these inputs was released after the input was fetched."""
        fetcher = self._fetcher
        current = fetcher.releases
        if not envelopes or not current:
            return False
        inputs = cast("Sequence[KafkaEnvelope]", envelopes)
        if min(map(_ERA, inputs)) == current:  # the common case: no release since the oldest was fetched
            return False
        gone_since: dict[int, frozenset[TopicPartitionKey]] = {}
        for e in inputs:
            era = e.era
            if era == current:
                continue
            gone = gone_since.get(era)
            if gone is None:
                left = fetcher.released_since(era, current)
                if left is None:  # fetched more rebalances ago than the fetcher remembers: refuse, to be safe
                    return True
                gone = gone_since[era] = left
            if (e.source, e.partition) in gone:
                return True
        return False

    async def abort(self) -> None:
        """Abort the open transaction and rewind every partition to its last committed offset."""
        self._doomed = False
        self._aborting = True
        try:
            if self._revoke_abort is not None:
                await self._revoke_aborted()
            await self._abort_open(flush=True)
        finally:
            self._aborting = False
            self._doomed = False  # a revoke's deadline met while it ran: this abort was that one too
            targets = {key: state.restart for key, state in self._tracker.partitions.items() if state.restart >= 0}
            self._rewind(targets)
            self._closed_transaction()

    async def _abort_open(self, *, flush: bool) -> None:
        """Abort the open transaction on the broker (nothing to do when none is open); ``flush``: let what was
        accepted be delivered into it first."""
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
            # Let what was accepted be delivered first (into the doomed transaction), so that its reports come
            # in now rather than as purges; at a revoke's deadline there is no time for that.
            if flush:
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
                self._errors.fatal = error
            logger.error("%s: aborting the transaction failed: %s", self._what, exc)

    def _rewind(self, targets: Mapping[TopicPartitionKey, int]) -> None:
        """Forget everything from each target on, finished or not, and seek there (an aborted transaction)."""
        if not targets:
            return
        fetcher = self._fetcher
        assigned = fetcher.assigned
        ours = {key: offset for key, offset in targets.items()
                if key in assigned and key in self._tracker.partitions}  # else its new owner starts from the commit
        epoch = fetcher.ask_rewind([TopicPartition(key[0], key[1], offset) for key, offset in ours.items()])
        for key, offset in ours.items():
            self._tracker.partitions[key].rewound(offset, epoch)
            self._held.discard(key)  # read again from before its fence (if any): it stops there again
        self._want_pauses()

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
            return
        except TimeoutError:
            pass
        if self._aborting:  # the engine is aborting it already (and gives its work up)
            return
        if self._revoke_abort is not None:  # an earlier revoke is aborting it already
            await asyncio.shield(self._revoke_aborted())
            return
        if self._committing:  # its offsets were taken while the partitions were ours: it may go on
            logger.warning("%s: the transaction was still committing at the revoke deadline", self._what)
            return
        # Committed after the partitions went, it would carry their inputs' outputs without their offsets (see
        # commit): abort it now, while they are ours. The engine's commit of it then fails, and its inputs come
        # again (the rewind happens then, when the engine gives their work up).
        logger.warning("%s: the open transaction did not finish before the revoke deadline; aborting it, its inputs "
                       "will be processed again", self._what)
        self._doomed = True
        task = self._revoke_abort = asyncio.ensure_future(self._abort_at_revoke())
        await asyncio.shield(task)  # if the fetch thread stops waiting, the abort still finishes

    async def _abort_at_revoke(self) -> None:
        try:
            await self._abort_open(flush=False)
        except Exception as exc:  # still doomed: the engine's commit fails; a failed abort stops the next begin
            logger.error("%s: aborting the transaction at the revoke deadline failed: %s", self._what, exc)
        finally:
            self._closed_transaction()

    async def _revoke_aborted(self) -> None:
        """Until the abort at a revoke's deadline is done: nothing else may run a transaction meanwhile."""
        task = self._revoke_abort
        if task is not None:
            await asyncio.wait({task})
            if self._revoke_abort is task:
                self._revoke_abort = None

    async def _before_close(self) -> None:
        task = self._revoke_abort
        if task is not None:  # an abort begun at a revoke's deadline: the producer must outlive it
            done, _ = await asyncio.wait({task}, timeout=self._settings.revoke_timeout + ABORT_BACKOFF_MAX)
            if not done:  # it closes the transaction itself; another abort would only wait for it
                logger.warning("%s: the abort begun at a revoke is still running at close", self._what)
                return
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
