"""``volley dlq inspect``: what is in the dead-letter queue, read without consuming anything."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from volley.dlq.filters import LetterFilter
from volley.dlq.journal import Journal
from volley.dlq.letter import DeadLetter
from volley.dlq.target import DeadLetterQueue


@dataclass
class Inspection:
    queue: str
    total: int = 0
    matching: int = 0
    already_replayed: int = 0
    by_stage: Counter[str] = field(default_factory=Counter)
    by_error_type: Counter[str] = field(default_factory=Counter)
    by_source_queue: Counter[str] = field(default_factory=Counter)
    first: float | None = None
    last: float | None = None
    samples: list[dict[str, Any]] = field(default_factory=list)
    limit: int | None = None  # --limit: the breakdown is of the first this many matching letters

    def add(self, letter: DeadLetter, sample_count: int) -> None:
        self.matching += 1
        self.by_stage[letter.stage] += 1
        self.by_error_type[letter.error_type] += 1
        self.by_source_queue[letter.source_queue or "(unknown)"] += 1
        stamp = letter.timestamp
        if stamp is not None:
            self.first = stamp if self.first is None else min(self.first, stamp)
            self.last = stamp if self.last is None else max(self.last, stamp)
        if len(self.samples) < sample_count:
            self.samples.append(letter.summary())

    def as_dict(self) -> dict[str, Any]:
        return {"queue": self.queue, "total": self.total, "matching": self.matching,
                "already_replayed": self.already_replayed, "by_stage": dict(self.by_stage),
                "by_error_type": dict(self.by_error_type), "by_source_queue": dict(self.by_source_queue),
                "first": self.first, "last": self.last, "samples": self.samples, "limit": self.limit}

    def lines(self) -> list[str]:
        matching = f"{self.matching} matching" if self.limit is None else f"the first {self.matching} matching"
        out = [f"dead-letter queue {self.queue}: {self.total} letter(s), {matching}"]
        if self.already_replayed:
            out.append(f"  already replayed (journal), not counted: {self.already_replayed}")
        if self.first is not None and self.last is not None:
            out.append(f"  from {_when(self.first)} to {_when(self.last)}")
        for title, counts in (("stage", self.by_stage), ("error type", self.by_error_type),
                              ("source queue", self.by_source_queue)):
            if counts:
                out.append(f"  by {title}:")
                out += [f"    {count:>8}  {name}" for name, count in counts.most_common()]
        if self.samples:
            out.append("  samples:")
            for sample in self.samples:
                out.append(f"    {sample['id']} key={sample['key']!r} {sample['stage']}/{sample['error_type']}: "
                           f"{sample['reason'][:100]}")
                out.append(f"      {sample['value']!r}")
        return out


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")


async def inspect(dlq: DeadLetterQueue, letter_filter: LetterFilter, journal: Journal | None = None,
                  samples: int = 5, batch_size: int = 500, limit: int | None = None) -> Inspection:
    """Every letter counted in ``total``; the matching ones (at most ``limit``, the first in queue order) broken
    down."""
    result = Inspection(queue=dlq.name, limit=limit)
    browser = dlq.open_browser()
    await browser.start()
    try:
        while True:
            batch = await browser.browse(batch_size)
            if not batch:
                break
            for envelope in batch:
                letter = DeadLetter.read(envelope)
                if journal is not None and journal.is_sent(letter.id, letter.fingerprint):
                    result.already_replayed += 1
                    continue
                result.total += 1
                if (limit is None or result.matching < limit) and letter_filter.matches(letter):
                    result.add(letter, samples)
    finally:
        await browser.close()
    return result
