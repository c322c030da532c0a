"""``volley dlq replay``: send matching letters back where they came from, then take them out of the queue.

One batch at a time: browse, choose (filter, loop guard, ``--limit``), write the journal's intent, produce, wait
for the broker's confirmation, write the journal's ``sent``, and only then settle the letters (delete, or commit on
Kafka). A kill at any point leaves every letter either still in the queue or confirmed at its destination; the
journal lets the next run finish the settling without sending twice, and count the in-flight window it cannot
know about (see :mod:`volley.dlq.journal`).
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from volley.dlq.filters import LetterFilter
from volley.dlq.journal import Journal
from volley.dlq.letter import DeadLetter
from volley.dlq.progress import Progress
from volley.dlq.target import DeadLetterQueue
from volley.errors import DeliveryError
from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryFailure, Producer, QueueBrowser, SettlingBrowser
from volley.queues import ResolvedQueue

KILL_AFTER_ENV = "VOLLEY_DLQ_TEST_KILL_AFTER"
"""Tests only: ``N`` kills the replay (SIGKILL) right after its broker confirmed the N-th republish; with
``VOLLEY_DLQ_TEST_KILL_AT=confirmed`` before the journal records it, else (``journaled``) after."""
KILL_AT_ENV = "VOLLEY_DLQ_TEST_KILL_AT"


@dataclass
class ReplayOptions:
    filter: LetterFilter = field(default_factory=LetterFilter)
    to: str | None = None
    max_replays: int = 3
    limit: int | None = None
    rate: float | None = None
    dry_run: bool = False
    batch_size: int = 100
    flush_timeout: float = 30.0


@dataclass
class ReplaySummary:
    moved: int = 0
    """Sent, confirmed and taken out of the dead-letter queue (or, on a dry run, would be)."""
    skipped_by_filter: int = 0
    left_by_loop_guard: int = 0
    left_without_source: int = 0
    finished_from_journal: int = 0
    """Confirmed by a run that was killed before it took them out: taken out now, not sent again."""
    already_replayed: int = 0
    """On a broker that cannot drop single letters (Kafka): letters an earlier replay moved, still above the
    replay group's commit; the journal says so, they are not sent again."""
    possible_duplicates: int = 0
    """Sent again because a killed run had them in flight: their destination may hold them twice."""
    by_destination: Counter[str] = field(default_factory=Counter)
    looping: list[dict[str, Any]] = field(default_factory=list)
    dry_run: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {"moved": self.moved, "skipped_by_filter": self.skipped_by_filter,
                "left_by_loop_guard": self.left_by_loop_guard, "left_without_source": self.left_without_source,
                "finished_from_journal": self.finished_from_journal, "already_replayed": self.already_replayed,
                "possible_duplicates": self.possible_duplicates,
                "by_destination": dict(self.by_destination), "looping": self.looping, "dry_run": self.dry_run}

    def lines(self) -> list[str]:
        verb = "would move" if self.dry_run else "moved"
        out = [f"{verb} {self.moved} letter(s)" + "".join(f", {n} to {q}" for q, n in self.by_destination.items()),
               f"skipped by filter: {self.skipped_by_filter}",
               f"left by the loop guard: {self.left_by_loop_guard}"]
        if self.left_without_source:
            out.append(f"left without a source queue (use --to): {self.left_without_source}")
        if self.finished_from_journal:
            out.append(f"finished from the journal of an interrupted run (not sent again): "
                       f"{self.finished_from_journal}")
        if self.already_replayed:
            out.append(f"already replayed earlier (journal), not sent again: {self.already_replayed}")
        if self.possible_duplicates:
            out.append(f"possible duplicates (in flight when a run was killed, sent again): "
                       f"{self.possible_duplicates}")
        out += [f"  looping: {sample['id']} key={sample['key']!r} replayed {sample['replays']} time(s): "
                f"{sample['reason']}" for sample in self.looping]
        return out


class _Confirmations:
    """The delivery reports of one batch (a producer may report from any thread)."""

    def __init__(self) -> None:
        self.delivered: list[OutgoingMessage] = []
        self.failed: list[DeliveryFailure] = []

    def __call__(self, delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
        self.delivered.extend(delivered)
        self.failed.extend(failed)


class ReplayStoppedError(DeliveryError):
    """A replay stopped part-way (a letter its destination did not confirm): ``summary`` is what it did before."""

    def __init__(self, message: str, summary: ReplaySummary) -> None:
        super().__init__(message)
        self.summary = summary


class _Pacer:
    """``--rate``: at most ``rate`` letters per second, a batch at a time. A pause (browsing past letters the filter
    skips, a slow destination) earns no credit: the next batch goes at once and the one after it waits its turn."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.due = 0.0  # when the next batch may go

    async def wait_for(self, count: int) -> None:
        if self.rate is None:
            return
        now = time.monotonic()
        if self.due > now:
            await asyncio.sleep(self.due - now)
        else:
            self.due = now
        self.due += count / self.rate


def _kill_hook() -> Callable[[int, str], None]:
    after = os.environ.get(KILL_AFTER_ENV)
    if not after:
        return lambda _count, _at: None
    limit, point = int(after), os.environ.get(KILL_AT_ENV, "journaled")

    def maybe_kill(count: int, at: str) -> None:
        if at == point and count >= limit:
            os.kill(os.getpid(), signal.SIGKILL)

    return maybe_kill


Chosen = list[tuple[DeadLetter, ResolvedQueue, str]]


async def replay(dlq: DeadLetterQueue, journal: Journal | None, options: ReplayOptions,
                 progress: Progress | None = None,
                 on_confirmed: Callable[[int, str], None] | None = None) -> ReplaySummary:
    """Replay the letters of ``dlq`` that ``options`` choose. ``journal`` may be None only for a dry run.

    ``on_confirmed(count, point)`` is a test hook, called with the number confirmed so far at the points
    ``"confirmed"`` (before the journal knows) and ``"journaled"`` (before the letters are settled)."""
    return await _Replay(dlq, journal, options, progress, on_confirmed or _kill_hook()).run()


class _Replay:
    def __init__(self, dlq: DeadLetterQueue, journal: Journal | None, options: ReplayOptions,
                 progress: Progress | None, hook: Callable[[int, str], None]) -> None:
        self.dlq = dlq
        self.journal = journal
        self.options = options
        self.progress = progress
        self.hook = hook
        self.summary = ReplaySummary(dry_run=options.dry_run)
        self.producers: dict[tuple[int, str], Producer] = {}
        self.pacer = _Pacer(options.rate)
        self.remaining = options.limit
        self.counted: Counter[str] = Counter(journal.replays) if journal is not None else Counter()
        self.read_to_end = False  # browsed until the queue had nothing more (not stopped by --limit)
        self.seen: set[str] = set()  # ids of letters browsed that the journal names
        self.settled: set[str] = set()  # ids of letters this run took out (or committed past)
        self.batch_size = options.batch_size
        if options.rate is not None:  # small batches, about ten a second, so that the rate holds over any second
            self.batch_size = max(1, min(self.batch_size, int(options.rate / 10)))

    def _settling(self, browser: QueueBrowser) -> tuple[SettlingBrowser, Journal] | None:
        """What a real run settles letters with (None on a dry run); refuses what cannot be replayed safely."""
        self.dlq.check_destination(self.options.to)
        if self.options.dry_run:
            return None
        if not isinstance(browser, SettlingBrowser) or self.journal is None:
            raise DeliveryError(f"the connector of {self.dlq.name!r} cannot take letters out of its queue (no "
                                "settle()), so a replay could not avoid sending them twice; use --dry-run to see "
                                "what would be sent")
        self.journal.lock()
        # The replay counts as they were before this run: identical letters sent in different batches of it are
        # not replays of each other (each batch would read the count the one before recorded).
        self.counted = Counter(self.journal.replays)
        return browser, self.journal

    async def run(self) -> ReplaySummary:
        browser = self.dlq.open_browser()
        settling = self._settling(browser)
        try:
            await self._run(browser, settling)
        except DeliveryError as exc:  # what was moved before the stop is worth knowing too
            raise ReplayStoppedError(str(exc), self.summary) from exc
        finally:
            await self._close(browser)
            if self.progress is not None:
                self.progress.done()
        return self.summary

    async def _run(self, browser: QueueBrowser, settling: tuple[SettlingBrowser, Journal] | None) -> None:
        """Browse, choose and move (settle) every batch; on a real run, then keep in the journal what is needed."""
        await browser.start()
        while self.remaining is None or self.remaining > 0:
            asked = self.batch_size if self.remaining is None else min(self.batch_size, self.remaining)
            batch = await browser.browse(asked)
            if not batch:
                self.read_to_end = True
                break
            chosen, finished = self.choose(batch)
            if settling is None:
                self.summary.moved += len(chosen)
                self.summary.by_destination.update(name for _, _, name in chosen)
            else:
                await self.move(*settling, chosen, finished)
            if self.progress is not None:
                self.progress.update(self.summary, len(batch))
        if settling is not None:
            self.compact(*settling)

    def compact(self, browser: SettlingBrowser, journal: Journal) -> None:
        """Keep in the journal what a later run may still need: a ``sent`` entry while its letter may still be in
        the queue (Kafka: above the replay group's commit), an in-doubt intent while its letter was not sent
        again. A letter this run did not see although it read the queue to its end is gone (or, on Kafka, below
        the commit it started from); one it took out of a queue that removes each letter is gone too (on Kafka it
        is kept: a skipped letter before it may hold the commit below it). A run that stopped early (``--limit``)
        keeps everything else."""
        def maybe_there(letter_id: str) -> bool:
            if letter_id in self.settled:  # Kafka: still in the topic, and maybe above the commit
                return not browser.removes_each
            return letter_id in self.seen or not self.read_to_end

        journal.rewrite([i for i in journal.sent if maybe_there(i)],
                        [i for i in journal.intended if i not in journal.sent and maybe_there(i)])

    async def _close(self, browser: QueueBrowser) -> None:
        if self.journal is not None:
            self.journal.close()  # its file and its lock
        try:
            for producer in self.producers.values():
                await producer.close()
        finally:
            await browser.close()

    def choose(self, batch: Sequence[Envelope]) -> tuple[Chosen, list[Envelope]]:
        """The letters to send, and those a killed run already sent (to settle only)."""
        summary, options = self.summary, self.options
        chosen: Chosen = []
        finished: list[Envelope] = []
        for envelope in batch:
            letter = DeadLetter.read(envelope)
            journal = self.journal
            if journal is not None and (letter.id in journal.sent or letter.id in journal.intended):
                self.seen.add(letter.id)
            if journal is not None and journal.is_sent(letter.id, letter.fingerprint):
                finished.append(envelope)
            elif not options.filter.matches(letter):
                summary.skipped_by_filter += 1
            elif (replays := self.replays_of(letter)) >= options.max_replays:
                summary.left_by_loop_guard += 1
                if len(summary.looping) < 20:
                    summary.looping.append({**letter.summary(), "replays": replays})
            elif (where := self.dlq.destination(letter, options.to)) is None:
                summary.left_without_source += 1
            elif self.remaining is None or self.remaining > 0:
                if self.remaining is not None:
                    self.remaining -= 1
                chosen.append((letter, *where))
        return chosen, finished

    def replays_of(self, letter: DeadLetter) -> int:
        """Its replay counter, or the journal's count of its content where a destination dropped the header."""
        return max(letter.replays, self.counted[letter.digest])

    async def move(self, browser: SettlingBrowser, journal: Journal, chosen: Chosen,
                   finished: list[Envelope]) -> None:
        if finished:
            await browser.settle(finished)
            self.settled.update(DeadLetter.read(e).id for e in finished)
            if browser.removes_each:
                self.summary.finished_from_journal += len(finished)
            else:
                self.summary.already_replayed += len(finished)
        if not chosen:
            return
        await self.pacer.wait_for(len(chosen))
        await _send(self.dlq, chosen, self.producers, journal, self.counted, self.summary, self.options, self.hook)
        await browser.settle([letter.envelope for letter, _, _ in chosen])
        self.settled.update(letter.id for letter, _, _ in chosen)
        by_source = Counter(letter.source_queue or name for letter, _, name in chosen)
        for source, count in by_source.items():
            self.dlq.count_replayed(source, count)


async def _send(dlq: DeadLetterQueue, chosen: Chosen, producers: dict[tuple[int, str], Producer], journal: Journal,
                counted: Counter[str], summary: ReplaySummary, options: ReplayOptions,
                hook: Callable[[int, str], None]) -> None:
    ids = [letter.id for letter, _, _ in chosen]
    summary.possible_duplicates += sum(journal.in_doubt(i) for i in ids)
    journal.record_intent(ids)
    confirmations = _Confirmations()
    used: list[Producer] = []
    groups: dict[tuple[int, str], list[OutgoingMessage]] = {}
    # The count each copy carries now: identical letters (the same key and value) are not replays of each other.
    counts = [max(letter.replays, counted[letter.digest]) + 1 for letter, _, _ in chosen]
    for (letter, queue, name), count in zip(chosen, counts, strict=True):
        groups.setdefault((id(queue), name), []).append(
            OutgoingMessage(name, letter.envelope.value, letter.key, letter.replay_headers(count - 1),
                            token=letter.id))
        if (id(queue), name) not in producers:
            producer = dlq.make_producer(queue, name)
            await producer.start()
            producers[(id(queue), name)] = producer
    for key, records in groups.items():
        producer = producers[key]
        producer.produce(records, confirmations)
        used.append(producer)
    for producer in used:
        await producer.flush(options.flush_timeout)
    confirmed = {str(m.token) for m in confirmations.delivered}
    missing = [i for i in ids if i not in confirmed]
    total = summary.moved + len(chosen)
    if not confirmations.failed and not missing:
        hook(total, "confirmed")
    # What was confirmed is journaled (all of the batch, or what a partly failed one got through), so that the next
    # run takes it out instead of sending it again.
    done = [(letter, count) for (letter, _, _), count in zip(chosen, counts, strict=True) if letter.id in confirmed]
    journal.record_sent([d.id for d, _ in done], [d.fingerprint for d, _ in done], [d.digest for d, _ in done],
                        [c for _, c in done])
    if confirmations.failed:
        record, error = confirmations.failed[0]
        raise DeliveryError(f"{len(confirmations.failed)} replayed letter(s) were not confirmed by their broker "
                            f"(first: {record.token} to {record.topic}: {error}); they stay in the dead-letter queue, "
                            "run the replay again once the destination is back")
    if missing:
        raise DeliveryError(f"{len(missing)} replayed letter(s) got no delivery report; they stay in the dead-letter "
                            "queue")
    hook(total, "journaled")
    summary.moved = total
    summary.by_destination.update(name for _, _, name in chosen)
