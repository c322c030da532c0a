"""``volley dlq purge``: take matching letters out of the dead-letter queue for good, or, on a broker that cannot
drop single records (Kafka), everything before an offset or a time."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping

from volley.dlq.filters import LetterFilter
from volley.dlq.letter import DeadLetter
from volley.dlq.progress import Progress
from volley.dlq.target import DeadLetterQueue
from volley.errors import ConfigurationError
from volley.message import Envelope
from volley.ports import PurgeableBefore, QueueBrowser, SettlingBrowser


class CannotPurgeSingleLettersError(ConfigurationError):
    """The broker keeps records until they expire or everything before them is deleted (Kafka)."""


def removing_browser(dlq: DeadLetterQueue) -> tuple[QueueBrowser, SettlingBrowser]:
    """A browser that deletes single letters (as both its ports), or the error that says this broker has none."""
    browser = dlq.open_browser()
    if not isinstance(browser, SettlingBrowser) or not browser.removes_each:
        raise CannotPurgeSingleLettersError(
            f"the broker of {dlq.name!r} cannot drop single records (a Kafka topic keeps them until retention "
            "expires), so a purge by filter is not possible: purge --before OFFSET or --before TIME deletes every "
            "letter before that point, on every partition")
    return browser, browser


async def purge(dlq: DeadLetterQueue, letter_filter: LetterFilter, limit: int | None = None,
                progress: Progress | None = None, batch_size: int = 500) -> int:
    """Delete every matching letter (up to ``limit``); returns how many."""
    browser, settling = removing_browser(dlq)
    purged = 0
    by_source: Counter[str] = Counter()
    await browser.start()
    try:
        while limit is None or purged < limit:
            batch = await browser.browse(batch_size)
            if not batch:
                break
            chosen: list[Envelope] = []
            for envelope in batch:
                letter = DeadLetter.read(envelope)
                if letter_filter.matches(letter) and (limit is None or purged + len(chosen) < limit):
                    chosen.append(envelope)
                    by_source[letter.source_queue or "(unknown)"] += 1
            if chosen:
                await settling.settle(chosen)
                purged += len(chosen)
            if progress is not None:
                progress.update(_Moved(purged), len(batch))
    finally:
        await browser.close()
        for source, count in by_source.items():
            dlq.count_purged(source, count)
    if progress is not None:
        progress.done()
    return purged


async def purge_before(dlq: DeadLetterQueue, *, offset: int | None = None,
                       timestamp: float | None = None) -> Mapping[int, int]:
    """Drop everything before ``offset`` (per partition) or ``timestamp``; returns the count per partition."""
    browser = dlq.open_browser()
    if not isinstance(browser, PurgeableBefore):
        raise ConfigurationError(f"the broker of {dlq.name!r} has no purge --before (it can delete single letters: "
                                 "use the filters, --stage, --since, ...)")
    await browser.start()
    try:
        dropped = await browser.purge_before(offset=offset, timestamp=timestamp)
    finally:
        await browser.close()
    dlq.count_purged("(all)", sum(dropped.values()))
    return dropped


class _Moved:
    def __init__(self, moved: int) -> None:
        self.moved = moved
