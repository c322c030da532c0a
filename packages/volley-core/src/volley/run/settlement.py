"""Settlement: outputs go to their producers, delivery reports come back, inputs end in exactly one state.

An input is acknowledged only once every record it caused is confirmed by its broker. Each input is counted
once, at its final state: acked, nacked (the handler returned False), dead_lettered (once the DLQ confirmed
it), failed (given back after a failure) or abandoned (at shutdown). Delivery reports arrive from any thread,
in any batching; they are handled on the loop, through the callback of the producer slot that sent the record,
so a failed record is produced again through that same producer.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Sequence

from volley.errors import DeliveryError, HandlerFailedError, InvalidRecordError, MessageError, TransactionAbortedError
from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryCallback, DeliveryFailure, Observer, Producer
from volley.queues import ResolvedQueue, classify
from volley.run.acking import Acker
from volley.run.deadletters import announce, letters
from volley.run.report import RunReport
from volley.run.stopping import StopSignal
from volley.run.tokens import (
    AnyToken,
    DeadLetter,
    Group,
    Outcome,
    Poison,
    Token,
    any_revoked,
    describe,
    members_of,
    reason_of,
)
from volley.run.tracing import Tracing

logger = logging.getLogger("volley")

Reports = tuple[int, Sequence[OutgoingMessage], Sequence[DeliveryFailure]]


class Settlement:
    def __init__(self, *, app_name: str, source: str, producers: Sequence[Producer],
                 dlq: tuple[ResolvedQueue, int] | None, acker: Acker, observer: Observer, timed: bool,
                 max_retries: int, backoff: Callable[[int], float], on_failure: str, transactional: bool,
                 stop: StopSignal, request_stop: Callable[[BaseException], None],
                 slot_topics: Sequence[str | None], tracing: Tracing | None = None) -> None:
        self.app_name = app_name
        self.source = source
        self.producers = list(producers)
        self.dlq = dlq
        self.acker = acker
        self.report: RunReport = acker.report
        self.observer = observer
        self.timed = timed
        self.max_retries = max_retries
        self.backoff = backoff
        self.on_failure = on_failure
        self.transactional = transactional
        self.stop = stop
        self.request_stop = request_stop
        self.tracing = tracing
        # Per producer slot, its one topic (None: several share it): the produced metric counts by slot then.
        self._slot_topics = list(slot_topics)
        self.in_flight = 0
        self.last_activity = time.monotonic()
        self.abort_reason = ""  # exactly-once: why the open transaction must abort ("" while it may commit)
        self.closed = False  # past shutdown's last flush: late results and reports change nothing
        self.settled = asyncio.Event()
        self._out: list[list[OutgoingMessage]] = [[] for _ in self.producers]
        self._out_scheduled = False
        self._reports: deque[Reports] = deque()
        self._reports_scheduled = False
        # A record being produced again: record -> (failed attempts, its timer). Keyed by the record itself (the
        # dict holds it, so no other record can share its key) and cleared when it is delivered or given up.
        self._retrying: dict[OutgoingMessage, tuple[int, asyncio.TimerHandle | None]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self.open_letters: list[DeadLetter] = []  # of the open transaction: dropped with it when it aborts
        # Exactly-once: inputs whose output was refused for itself (InvalidRecordError). Their transaction aborts
        # (their other outputs are in it); whenever one comes again, decode sends it to the DLQ unhandled
        # (handling.py), until the transaction holding its dead letter commits (letters_committed).
        self.poisoned: dict[Poison, BaseException] = {}
        # Exactly-once: while a transaction settles and commits, the next one's outcomes wait here (its outputs
        # may not be produced before it begins); an abort drops them and moves the generation on, so that work
        # it gave up, still running, settles nothing (see Outcome.generation and transactions.py).
        self.staged: list[Outcome] | None = None
        self.generation = 0
        self.callbacks: list[DeliveryCallback] = [self._callback(slot) for slot in range(len(self.producers))]

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._loop_thread = threading.get_ident()

    # ------------------------------------------------------------------ outcomes of handling (on the loop)

    def apply(self, out: Outcome) -> None:
        if self.closed or out.generation != self.generation:
            self._drop(out)
            return
        if self.staged is not None:
            self.staged.append(out)
            return
        self._settle(out)

    def _settle(self, out: Outcome) -> None:
        if out.retries:
            self.report.retries += out.retries
            self.observer.on_retry(self.app_name, out.retries)
        buffers = self._out
        for slot, messages in enumerate(out.outs):
            if messages:
                buffers[slot].extend(messages)
        for token in out.acks:
            self.settle_ok(token)
        for token in out.nacks:
            self.give_back(token, "the handler returned False")
        for token, stage, exc in out.failures:
            self.fail(token, stage, exc)
        if out.abandoned:
            self.abandon(out.abandoned)
        if self.timed:
            self._observe(out)
        self.flush_outputs()

    def _observe(self, out: Outcome) -> None:
        observer, name = self.observer, self.app_name
        # A failure is of a token: an input, or a batch handler's group of them (each counts).
        failed = sum(len(members_of(token)) for token, _, _ in out.failures) if out.failures else 0
        ok = out.handled - failed - out.abandoned
        if ok > 0:
            observer.on_consumed(name, "success", ok)
        if failed:
            observer.on_consumed(name, "fail", failed)
        timed = out.timed
        if timed:  # (the seconds of sampled calls are weighted already: handling.SAMPLE_ONE_IN)
            construct, component, deconstruct = out.construct, out.component, out.deconstruct
            observer.on_process_time(name, "component", component, timed)
            observer.on_process_time(name, "cycle", construct + component + deconstruct, timed)
            if construct:
                observer.on_data_model_time("construct", construct, timed)
            if deconstruct:
                observer.on_data_model_time("deconstruct", deconstruct, timed)

    def stage(self) -> None:
        """From now on outcomes wait (a transaction closed: what is handled meanwhile belongs to the next one)."""
        if self.staged is None:
            self.staged = []

    def unstage(self) -> None:
        """Apply what waited, in order (the next transaction has begun)."""
        staged, self.staged = self.staged, None
        for out in staged or ():
            self.apply(out)

    def give_up_work(self) -> None:
        """An aborted transaction: outcomes waiting, and those of work still running, settle nothing."""
        staged, self.staged = self.staged, None
        for out in staged or ():
            self._drop(out)
        self.generation += 1

    def _drop(self, out: Outcome) -> None:
        """An outcome given up on (a call that outlived the shutdown deadline, work of an aborted transaction): its
        inputs come again. The traces of its failures, kept open for settlement, end here."""
        if self.tracing is not None:
            for token, stage, exc in out.failures:
                self.tracing.given_back(token, stage, exc)

    def call_threadsafe(self, callback: Callable[[], None]) -> None:
        """From the handler thread: call ``callback`` on the loop (it applies what the thread finished), in order
        with everything else sent there."""
        loop = self._loop
        if loop is not None:
            with contextlib.suppress(RuntimeError):  # the loop is closed: nothing is acked, all comes again
                loop.call_soon_threadsafe(callback)

    # ------------------------------------------------------------------ producing

    def schedule_flush(self) -> None:
        if not self._out_scheduled and self._loop is not None:
            self._out_scheduled = True
            self._loop.call_soon(self.flush_outputs)

    def flush_outputs(self) -> None:
        self._out_scheduled = False
        for slot, messages in enumerate(self._out):
            if messages:
                self._out[slot] = []
                self._produce(slot, messages, first=True)

    def _produce(self, slot: int, messages: list[OutgoingMessage], *, first: bool) -> None:
        if first:  # a record produced again is counted once, when first handed over (even if that call raised)
            self._count_produced(slot, messages)
            if self.tracing is not None:
                self.tracing.sent(messages)
        try:
            self.producers[slot].produce(messages, self.callbacks[slot])
        except Exception as exc:  # the producer refused the whole call: every record failed
            self.handle_reports(slot, (), [(m, exc) for m in messages])

    def _count_produced(self, slot: int, messages: list[OutgoingMessage]) -> None:
        self.report.produced += len(messages)
        if self.timed:
            topic = self._slot_topics[slot]
            if topic is not None:
                self.observer.on_produced(self.app_name, self.source, topic, len(messages))
                return
            counts: dict[str, int] = {}
            for m in messages:
                counts[m.topic] = counts.get(m.topic, 0) + 1
            for topic, count in counts.items():
                self.observer.on_produced(self.app_name, self.source, topic, count)

    def _callback(self, slot: int) -> DeliveryCallback:
        """The delivery callback of one producer slot: any thread, any batching."""
        reports = self._reports

        def on_delivery(delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
            if threading.get_ident() == self._loop_thread:
                self.handle_reports(slot, delivered, failed)
                return
            reports.append((slot, delivered, failed))
            if not self._reports_scheduled and self._loop is not None:
                self._reports_scheduled = True
                with contextlib.suppress(RuntimeError):
                    self._loop.call_soon_threadsafe(self.drain_reports)

        return on_delivery

    def drain_reports(self) -> None:
        self._reports_scheduled = False
        reports = self._reports
        while reports:
            self.handle_reports(*reports.popleft())

    def handle_reports(self, slot: int, delivered: Sequence[OutgoingMessage],
                       failed: Sequence[DeliveryFailure]) -> None:
        if self.closed:
            return
        if self.timed:
            self._observe_reports(delivered, failed)
        if delivered:
            self._confirmed(delivered)
        for message, exc in failed:
            self._delivery_failed(slot, message, exc)

    def _confirmed(self, delivered: Sequence[OutgoingMessage]) -> None:
        """Records of one report that their broker confirmed: an input whose last record is among them is settled."""
        if self._retrying:
            self._no_longer_retrying(delivered)
        done: list[Envelope] = []  # inputs whose last record this report confirmed: settled together
        for message in delivered:
            token = message.token
            if token is None:
                continue
            if token.pending != 1:  # more records to confirm, or settled already (-1: late reports change nothing)
                token.pending -= 1
                continue
            token.pending = 0
            if isinstance(token, Envelope):
                done.append(token)
            elif type(token) is DeadLetter:
                self._dead_letter_landed(token)
            else:
                self.settle_ok(token)
        if done:
            self._acked(done)

    def _observe_reports(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        """py-volley's delivery_report_status, once per report and status: every record confirmed (outputs and
        dead letters) and every failed attempt (also one produced again later, or refused by ``produce``)."""
        if delivered:
            self.observer.on_delivery(self.app_name, "success", len(delivered))
        if failed:
            self.observer.on_delivery(self.app_name, "fail", len(failed))

    def _no_longer_retrying(self, delivered: Sequence[OutgoingMessage]) -> None:
        """Records produced again after a failed delivery, or waiting to be: delivered now (looked up once per
        report). A retry still waiting is cancelled: a producer whose call raised after it had accepted some of
        the records reports those as delivered after the engine counted them failed."""
        retrying = self._retrying
        for message in delivered:
            entry = retrying.pop(message, None)
            if entry is not None and entry[1] is not None:
                entry[1].cancel()

    def _delivery_failed(self, slot: int, message: OutgoingMessage, exc: BaseException) -> None:
        token: AnyToken | None = message.token
        previous = self._retrying.pop(message, None)
        if previous is not None and previous[1] is not None:  # a retry still waiting is replaced, not doubled
            previous[1].cancel()
        attempts = (previous[0] if previous is not None else 0) + 1
        if token is None or token.pending < 0:
            return
        if type(token) is Group and all(m.pending == -1 for m in token.members):
            return  # given up with its inputs (an aborted transaction marks the inputs, not their groups)
        if self.transactional and isinstance(exc, TransactionAbortedError):
            # Its transaction is over, and the abort rewinds the input to the last commit: not the record's fault,
            # so neither a retry nor a give-back (that would count a delivery against max_deliveries).
            token.pending = -1
            self.abort_reason = self.abort_reason or f"a record of {describe(token)} was unsent: {reason_of(exc)}"
            self.abandon(len(members_of(token.failed if type(token) is DeadLetter else token)))
            return
        # Not in a transaction: the input's other records may be in it already, and its dead letter beside them
        # would make them visible with it; the transaction aborts instead (below), as for any failed record.
        if isinstance(exc, InvalidRecordError) and type(token) is not DeadLetter and not self.transactional:
            token.pending = -1  # the record itself is wrong (a partition the topic lacks): the message's fault
            self.fail(token, "output", exc)  # type: ignore[arg-type]
            return
        # In a transaction a failed record cannot be sent again on its own: the whole batch is aborted (the
        # consumer rewinds) and processed again, so no retry here and no stop. A dead letter the DLQ's broker refused
        # for itself (too large for it) is not produced again either: it would be refused again.
        if attempts <= self.max_retries and not self.transactional and not isinstance(exc, InvalidRecordError):
            if self.stop.is_stopping:  # no retry now, and not a failure for good: it is handled again later
                token.pending = -1
                logger.warning("%s: delivery to %s failed while shutting down (%s); %s is not acknowledged and will "
                               "be delivered again", self.app_name, message.topic, reason_of(exc), describe(token))
                self.abandon(len(members_of(token)))
                return
            delay = self.backoff(attempts)
            logger.warning("%s: delivery to %s failed (%s); retrying in %.2f s (attempt %d of %d)", self.app_name,
                           message.topic, reason_of(exc), delay, attempts, self.max_retries)
            assert self._loop is not None
            timer = self._loop.call_later(delay, self._produce_again, slot, message)
            self._retrying[message] = (attempts, timer)
            return
        token.pending = -1  # later reports of its other records must not settle it
        self._undeliverable(token, message, exc)

    def _undeliverable(self, token: AnyToken, message: OutgoingMessage, exc: BaseException) -> None:
        """``message`` failed for good: its input is given back (and the app stops, or the transaction aborts)."""
        if type(token) is DeadLetter:
            error = DeliveryError(f"the dead letter of {describe(token.failed)} could not be written to "
                                  f"{message.topic!r}: {reason_of(exc)}")
            self._failed_for_good(token.failed, error)
            if isinstance(exc, InvalidRecordError):  # it would be refused again however often it came back
                self.request_stop(error)
        else:
            error = DeliveryError(f"output to {message.topic!r} of input {describe(token)} could not be delivered: "
                                  f"{reason_of(exc)}")
            if isinstance(exc, InvalidRecordError):  # exactly-once (see above): it comes again after the abort
                if self.dlq is None:  # it can neither be committed nor dead-lettered: stop, whatever on_failure says
                    self.request_stop(error)
                else:
                    for env in members_of(token):
                        self.poisoned[(env.source, env.partition, env.position)] = exc
            self._failed_for_good(token, error)  # type: ignore[arg-type]

    def letters_committed(self, letters: Sequence[DeadLetter]) -> None:
        """Exactly-once: the transaction holding these dead letters committed; their inputs are poisoned no more."""
        poisoned = self.poisoned
        if poisoned:
            for letter in letters:
                for env in letter.members:
                    poisoned.pop((env.source, env.partition, env.position), None)

    def _produce_again(self, slot: int, message: OutgoingMessage) -> None:
        if message not in self._retrying:  # delivered meanwhile (see _no_longer_retrying)
            return
        attempts, _ = self._retrying[message]
        token = message.token
        if token is None or token.pending < 0 or self.closed:
            self._retrying.pop(message, None)
            return
        self._retrying[message] = (attempts, None)
        self.report.retries += 1  # counted when made: a retry the shutdown cancelled is none
        self._produce(slot, [message], first=False)

    def _failed_for_good(self, token: Token, error: DeliveryError) -> None:
        logger.error("%s: %s; the input is not acknowledged and will be delivered again", self.app_name, error)
        self.report.add_error(str(error))
        self.give_back(token, f"output: DeliveryError: {error}", failed=True)  # exactly-once: it aborts
        if self.on_failure == "stop" and not self.transactional:
            self.request_stop(error)

    def unsent_for(self, revoked: set[tuple[str, int]]) -> bool:
        """Whether a record of an input of these partitions is buffered or waits to be produced again (a revoke
        waits for it): a retry, or a dead letter, scheduled after a delivery failure. Not a record whose input
        was given up meanwhile (``pending < 0``): its retry is never made."""
        return any(m.token is not None and m.token.pending >= 0 and any_revoked(m.token, revoked)
                   for m in itertools.chain(self._retrying, *self._out))

    def cancel_retries(self) -> None:
        """Shutdown: records waiting to be produced again stay unsent; their inputs are abandoned."""
        for _, timer in self._retrying.values():
            if timer is not None:
                timer.cancel()
        self._retrying.clear()

    # ------------------------------------------------------------------ settling inputs

    def notify(self) -> None:
        self.last_activity = time.monotonic()
        self.settled.set()
        self.acker.wake.set()

    def settle_ok(self, token: Token) -> None:
        if isinstance(token, Envelope):
            self._acked([token])
        else:  # a group; members marked -1 were dropped with an aborted transaction
            self._acked([m for m in token.members if m.pending != -1])

    def _acked(self, envelopes: list[Envelope]) -> None:
        """Inputs done: to be acknowledged, counted once."""
        self.acker.acks.extend(envelopes)
        self.in_flight -= len(envelopes)
        self.report.acked += len(envelopes)
        self.notify()

    def give_back(self, token: Token, reason: str, *, failed: bool = False) -> None:
        """``token``'s inputs are not done: delivered again later (the consumer's nack, with a delay).

        Exactly-once: its transaction aborts. Its partition's offset cannot move past the input, yet the inputs
        after it in the transaction would commit their outputs: an abort, or a restart, rewinds to the input and
        those outputs would become visible twice. The nack goes to the consumer before the abort (``_end``), so the
        delivery still counts against max_deliveries and the input's partition waits out the delay."""
        members = members_of(token)
        if self.transactional:
            self.abort_reason = self.abort_reason or f"{describe(token)} was given back ({reason})"
        self.acker.nacks.extend((env, reason) for env in members)
        self.in_flight -= len(members)
        if failed:
            self.report.failed += len(members)
        else:
            self.report.nacked += len(members)
        self.notify()

    def fail(self, token: Token, stage: str, exc: BaseException) -> None:
        """A message that cannot be processed: to the DLQ, or given back and reported."""
        members = members_of(token)
        if isinstance(exc, MessageError) or stage in ("deserialize", "validate"):
            exc = classify(stage, exc, members[0].value if len(members) == 1 else b"")
        reason = reason_of(exc)
        if self.dlq is not None:
            queue, slot = self.dlq
            token.pending = -1
            letter = DeadLetter(token, stage, reason)
            if self.transactional:
                self.open_letters.append(letter)
            records = letters(letter, type(exc).__qualname__, queue.value)
            if self.tracing is not None:
                self.tracing.dead_letter(token, stage, exc, queue.value, records)
            self._out[slot].extend(records)
            self.schedule_flush()
            return
        if self.tracing is not None:
            self.tracing.given_back(token, stage, exc)
        trace = "".join(traceback.format_exception(exc)) if stage == "handler" else ""
        logger.error("%s: %s failed at %s and there is no dead-letter queue: %s\n%s", self.app_name,
                     describe(token), stage, reason, trace)
        self.report.add_error(f"{describe(token)}: {stage}: {reason}")
        self.give_back(token, f"{stage}: {type(exc).__qualname__}: {reason}", failed=True)
        if self.on_failure == "stop":
            self.request_stop(HandlerFailedError(
                f"{self.app_name}: {describe(token)} failed at {stage} ({reason}) and no dead_letter_queue is "
                "configured; configure one, or pass on_failure='continue' to log and keep going"))

    def _dead_letter_landed(self, letter: DeadLetter) -> None:
        members = letter.members
        self.acker.acks.extend(members)
        self.in_flight -= len(members)
        self.report.dead_lettered += len(members)
        assert self.dlq is not None
        announce(letter, self.app_name, self.dlq[0].value, self.observer)
        self.notify()

    def abandon(self, count: int) -> None:
        """Inputs that will not be handled (revoked, or left at shutdown): they are delivered again."""
        if count:
            self.in_flight -= count
            self.report.abandoned += count
            self.notify()
