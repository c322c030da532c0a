"""``volley dlq replay``'s journal, found by a second review of session 31's fixes: each test failed on the code
before its fix (or is a strict xfail for what is left open)."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest

from volley.dlq import DeadLetterQueue, Journal, ReplayOptions, replay
from volley.dlq.filters import parse_duration
from volley.dlq.letter import REPLAY_COUNT
from volley.engine import StreamApp
from volley.errors import ConfigurationError
from volley.memory import MemoryBroker
from volley.testing.deadletters import DLQ, INPUT, OUTPUT, Fix, scenario_app

ORDER = "volley.testing.deadletters.Order"
SOURCE = "shop.orders"
DLQ_NAME = "shop.orders.dlq"


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(partitions=1)


@pytest.fixture
def app(broker: MemoryBroker) -> StreamApp:
    where = {"broker": broker}
    config: dict[str, Any] = {
        INPUT: {"value": SOURCE, "profile": "memory", "data_model": ORDER, "config": where},
        OUTPUT: {"value": "shop.shipped", "profile": "memory", "data_model": ORDER, "config": where},
        DLQ: {"value": DLQ_NAME, "profile": "memory-dlq", "config": where}}
    return scenario_app(config, Fix())


def identical_letter(broker: MemoryBroker) -> None:
    broker.publish(DLQ_NAME, json.dumps({"order_id": 7, "key": "dup"}).encode(), b"dup",
                   {"volley-error-stage": b"handler", "volley-error-type": b"ValueError",
                    "volley-error-reason": b"boom", "volley-source-queue": SOURCE.encode()})


@pytest.mark.parametrize("options", [ReplayOptions(batch_size=1), ReplayOptions(rate=10.0)],
                         ids=["batch-size-1", "rate-10"])
def test_identical_letters_in_different_batches_are_not_replays_of_each_other(
        app: StreamApp, broker: MemoryBroker, tmp_path: Path, options: ReplayOptions) -> None:
    """docs/dead-letters-replay.md: "Identical letters ... are not replays of each other: three of them replayed
    once each carry a count of 1, not 3". The fix (a49bb0f) computes each copy's count from the journal's count
    as it is when its *batch* is sent, and ``record_sent`` raises that count: the next batch (``--batch-size``,
    or ``--rate`` which makes batches of rate/10) reads it back. Four identical letters never replayed: the copies
    carry 1, 2, 3 and the fourth is left by the loop guard (listed as looping) though it was never replayed."""
    for _ in range(4):
        identical_letter(broker)
    summary = asyncio.run(replay(DeadLetterQueue(app), Journal(tmp_path / "j.jsonl"), options))
    counts = [e.headers[REPLAY_COUNT] for e in broker.produced_records(SOURCE) if e.headers]
    assert (summary.moved, summary.left_by_loop_guard, counts) == (4, 0, [b"1"] * 4), summary.as_dict()


class Clock:
    """Seconds since the epoch, moved by the test (each reading a millisecond later, so sends are ordered)."""

    def __init__(self) -> None:
        self.now = 1_800_000_000.0

    def __call__(self) -> float:
        self.now += 0.001
        return self.now


def replay_and_fix(app: StreamApp, broker: MemoryBroker, journal: Journal, letters: int) -> None:
    """``letters`` different letters replayed (each recorded with its count), then handled successfully."""
    for n in range(letters):
        broker.publish(DLQ_NAME, json.dumps({"order_id": n, "amount": 1}).encode(), f"k{n}".encode(),
                       {"volley-error-stage": b"handler", "volley-source-queue": SOURCE.encode()})
    assert asyncio.run(replay(DeadLetterQueue(app), journal, ReplayOptions())).moved == letters
    app.run_until_drained(timeout=30, drain_idle_seconds=0.05)  # the fix is in: every replayed order succeeds
    assert broker.depth(DLQ_NAME) == 0


def test_the_journal_forgets_replay_counts_past_their_retention(
        app: StreamApp, broker: MemoryBroker, tmp_path: Path) -> None:
    """DESIGN.md: "memory stays bounded whatever the input rate, and so does everything else that grows with
    traffic". ``Journal.rewrite`` wrote ``self.replays`` back whole and nothing ever removed a digest: every letter
    ever replayed kept a line item for ever, re-read (and held in memory) by every inspect and replay (a strict
    xfail until now). A count is kept for ``count_retention_seconds`` (7 days by default) after its last send."""
    clock = Clock()
    path = tmp_path / "j.jsonl"
    replay_and_fix(app, broker, Journal(path, clock=clock), 300)
    clock.now += 86400.0  # a day later: a complete run keeps them (a letter of that content may still come back)
    assert asyncio.run(replay(DeadLetterQueue(app), Journal(path, clock=clock), ReplayOptions())).moved == 0
    assert len(Journal(path, clock=clock).replays) == 300
    clock.now += 7 * 86400.0  # past the retention: the next complete run forgets them
    assert asyncio.run(replay(DeadLetterQueue(app), Journal(path, clock=clock), ReplayOptions())).moved == 0
    assert len(Journal(path, clock=clock).replays) == 0, "replay counts kept past their retention"


def test_the_journal_keeps_at_most_max_counts_the_most_recent(
        app: StreamApp, broker: MemoryBroker, tmp_path: Path) -> None:
    """However many letters a week brings, the journal keeps at most ``max_counts`` counts: the latest sent. Here
    120 letters go in two batches (100, then 20 later); 50 are kept, every one of the second batch among them."""
    clock = Clock()
    path = tmp_path / "j.jsonl"
    replay_and_fix(app, broker, Journal(path, clock=clock, max_counts=50), 120)
    kept = Journal(path, clock=clock).replayed_at
    assert len(kept) == 50
    times = sorted(set(kept.values()))
    assert len(times) == 2 and sum(at == times[1] for at in kept.values()) == 20, times


def test_counts_written_before_times_were_kept_for_one_more_retention(tmp_path: Path) -> None:
    """A journal of an earlier version has counts without times: they are read as sent now, not dropped at once."""
    path = tmp_path / "j.jsonl"
    path.write_text(json.dumps({"op": "replays", "counts": {"abc": 2}}) + "\n"
                    + json.dumps({"op": "sent", "ids": ["1"], "digests": ["def"], "replays": [1]}) + "\n")
    clock = Clock()
    journal = Journal(path, clock=clock)
    journal.rewrite([])
    assert Journal(path, clock=clock).replays == Counter({"abc": 2, "def": 1})
    clock.now += 8 * 86400.0
    journal = Journal(path, clock=clock)
    journal.rewrite([])
    assert Journal(path, clock=clock).replays == Counter()


def test_keep_counts_takes_a_duration_and_says_what_it_wants_otherwise() -> None:
    assert parse_duration("7d", "--keep-counts") == 7 * 86400.0
    assert parse_duration(" 90s", "--keep-counts") == 90.0
    with pytest.raises(ConfigurationError, match=r"--keep-counts '7x' is not a duration \(90s, 30m, 2h, 7d\)"):
        parse_duration("7x", "--keep-counts")
