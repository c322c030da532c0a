"""``volley dlq``'s journal and command line on the memory broker, found by a review (session 31): each test failed
on the code before its fix and names the defect in its docstring."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from volley import cli
from volley.dlq import DeadLetterQueue, Journal, LetterFilter, ReplayOptions, replay
from volley.dlq import command as dlq_command
from volley.dlq.letter import REPLAY_COUNT
from volley.engine import StreamApp
from volley.errors import ConfigurationError, DeliveryError
from volley.memory import MemoryBroker
from volley.testing.deadletters import DLQ, INPUT, OUTPUT, Fix, scenario_app

ORDER = "volley.testing.deadletters.Order"
SOURCE = "shop.orders"
DLQ_NAME = "shop.orders.dlq"


class CrashError(Exception):
    """Stands for the kill -9 of a replay (raised from the replay's test hook)."""


def memory_config(broker: MemoryBroker) -> dict[str, Any]:
    where = {"broker": broker}
    return {INPUT: {"value": SOURCE, "profile": "memory", "data_model": ORDER, "config": where},
            OUTPUT: {"value": "shop.shipped", "profile": "memory", "data_model": ORDER, "config": where},
            DLQ: {"value": DLQ_NAME, "profile": "memory-dlq", "config": where}}


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(partitions=1)


@pytest.fixture
def app(broker: MemoryBroker) -> StreamApp:
    return scenario_app(memory_config(broker), Fix())


def letter(broker: MemoryBroker, key: str, stage: str, value: bytes | None = None) -> None:
    """A dead letter as the engine writes one, published straight into the DLQ (so the DLQ's order is known)."""
    broker.publish(DLQ_NAME, value if value is not None else json.dumps({"order_id": 1, "key": key}).encode(),
                   key.encode(), {"volley-error-stage": stage.encode(), "volley-error-type": b"ValueError",
                                  "volley-error-reason": b"boom", "volley-source-queue": SOURCE.encode()})


def sent_to_source(broker: MemoryBroker) -> Counter[bytes | None]:
    return Counter(e.key for e in broker.produced_records(SOURCE))


def crash_at(point: str, after: int) -> Any:
    def hook(count: int, at: str) -> None:
        if at == point and count >= after:
            raise CrashError

    return hook


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_letters_journaled_by_a_killed_run_are_not_sent_again_after_a_limited_run_in_between(
        app: StreamApp, broker: MemoryBroker, tmp_path: Path) -> None:
    """A replay killed after the journal recorded h0 as sent (confirmed at its destination, still in the DLQ);
    then a ``--limit 1`` replay of another stage, which stops before it reaches h0, and rewrites the journal as if
    it had seen the whole queue (``rewrite(())``), forgetting h0; then the handler replay again: h0 is sent a
    second time, reported neither as finished from the journal nor as a possible duplicate."""
    for key in ("d0", "v0", "v1"):
        letter(broker, key, "validate" if key.startswith("v") else "deserialize")
    for key in ("h0", "h1"):
        letter(broker, key, "handler")
    dlq = DeadLetterQueue(app)
    path = tmp_path / "journal.jsonl"
    handler_only = ReplayOptions(filter=LetterFilter(stages=("handler",)), batch_size=1)
    with pytest.raises(CrashError):
        run(replay(dlq, Journal(path), handler_only, on_confirmed=crash_at("journaled", 1)))
    assert sent_to_source(broker) == {b"h0": 1}
    assert len(Journal(path).sent) == 1  # h0: confirmed and journaled, not yet taken out

    limited = run(replay(dlq, Journal(path), ReplayOptions(filter=LetterFilter(stages=("validate",)), limit=1)))
    assert limited.moved == 1

    again = run(replay(dlq, Journal(path), ReplayOptions(filter=LetterFilter(stages=("handler",)))))
    assert sent_to_source(broker)[b"h0"] == 1, (
        f"h0 was sent {sent_to_source(broker)[b'h0']} times; summary of the last run: {again.as_dict()}")


def test_letters_in_doubt_are_still_reported_as_possible_duplicates_after_a_limited_run(
        app: StreamApp, broker: MemoryBroker, tmp_path: Path) -> None:
    """A replay killed after its broker confirmed a batch of three, before the journal recorded them: all three
    are in doubt. A ``--limit 1`` rerun sends one again (one possible duplicate) and then rewrites the journal,
    dropping the other two intents; the next run sends them again and reports no possible duplicate, though
    the docs promise the count "so you know how many to look for"."""
    for key in ("h0", "h1", "h2"):
        letter(broker, key, "handler")
    dlq = DeadLetterQueue(app)
    path = tmp_path / "journal.jsonl"
    with pytest.raises(CrashError):
        run(replay(dlq, Journal(path), ReplayOptions(batch_size=3), on_confirmed=crash_at("confirmed", 3)))
    first = run(replay(dlq, Journal(path), ReplayOptions(limit=1)))
    assert first.possible_duplicates == 1
    rest = run(replay(dlq, Journal(path), ReplayOptions()))
    assert rest.moved == 2
    assert first.possible_duplicates + rest.possible_duplicates == 3, rest.as_dict()


def test_a_replay_uses_the_journal_as_it_is_when_it_takes_the_lock_not_as_it_was_when_opened(
        app: StreamApp, broker: MemoryBroker, tmp_path: Path) -> None:
    """``Journal(path)`` reads the file when it is built; ``lock()`` comes later (``volley dlq replay`` builds the
    journal, then on a terminal reads the whole DLQ to size its progress bar, then locks). A replay that ran
    and was killed in between (lock released by the kill) is invisible to it: letters that run confirmed and
    journaled are sent a second time, and not reported as possible duplicates."""
    for key in ("h0", "h1", "h2"):
        letter(broker, key, "handler")
    dlq = DeadLetterQueue(app)
    path = tmp_path / "journal.jsonl"
    second = Journal(path)  # the second command has started (and is counting letters for its progress bar)
    with pytest.raises(CrashError):
        run(replay(dlq, Journal(path), ReplayOptions(batch_size=1), on_confirmed=crash_at("journaled", 2)))
    assert sent_to_source(broker) == {b"h0": 1, b"h1": 1}  # h1 is confirmed and journaled, still in the DLQ
    summary = run(replay(dlq, second, ReplayOptions()))
    assert sent_to_source(broker)[b"h1"] == 1, (
        f"h1 sent {sent_to_source(broker)[b'h1']} times; summary: {summary.as_dict()}")


def test_identical_letters_do_not_count_as_replays_of_each_other(app: StreamApp, broker: MemoryBroker,
                                                                 tmp_path: Path) -> None:
    """Three inputs with the same key and value (at-least-once duplicates, or the same event sent thrice) fail
    and are dead-lettered. One replay sends each once; they fail again. The journal counted the content digest
    three times, so the second replay (each letter replayed once, ``--max-replays 2``) leaves all three to the
    loop guard, and the header it would write says 4, not 2."""
    value = json.dumps({"order_id": 300, "amount": -1}).encode()
    for _ in range(3):
        broker.publish(SOURCE, value, b"dup", None)
    app.run_until_drained(timeout=30, drain_idle_seconds=0.05)
    assert broker.depth(DLQ_NAME) == 3
    path = tmp_path / "journal.jsonl"
    options = ReplayOptions(max_replays=2)
    assert run(replay(DeadLetterQueue(app), Journal(path), options)).moved == 3
    app.run_until_drained(timeout=30, drain_idle_seconds=0.05)  # the bug is not fixed: back in the DLQ
    back = broker.browse(DLQ_NAME, -1, 1 << 60, 100)
    assert [e.headers[REPLAY_COUNT] for e in back if e.headers] == [b"1", b"1", b"1"]
    second = run(replay(DeadLetterQueue(app), Journal(path), options))
    assert (second.moved, second.left_by_loop_guard) == (3, 0), second.as_dict()


# ---------------------------------------------------------------------------------------------- the command line


@pytest.fixture
def command(app: StreamApp, broker: MemoryBroker, monkeypatch: pytest.MonkeyPatch) -> StreamApp:
    monkeypatch.setattr(dlq_command, "load_app", lambda target: app)
    letter(broker, "h0", "handler")
    return app


def test_a_journal_with_bytes_that_are_not_utf8_fails_clearly_or_is_read_past(
        command: StreamApp, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A corrupted journal (a torn write, a disk error, someone's editor): ``Journal._load`` skips bad lines, but
    the file is read in strict UTF-8 text mode, so a byte that is not UTF-8 raises UnicodeDecodeError out of
    ``Journal.__init__``: ``volley dlq replay`` (and ``inspect``) die with a traceback."""
    path = tmp_path / "journal.jsonl"
    path.write_bytes(b'{"op": "replays", "counts": {}}\n\xff\xfe\x00garbage\n')
    try:
        code = cli.main(["dlq", "replay", "x:app", "--journal", str(path)])
    except UnicodeDecodeError as exc:
        pytest.fail(f"volley dlq replay died on a corrupted journal: {exc!r}")
    assert code in (0, 2)


def test_a_journal_path_that_cannot_be_written_is_a_clear_error_before_anything_is_sent(
        command: StreamApp, broker: MemoryBroker, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``--journal`` (or $VOLLEY_DLQ_JOURNAL_DIR) on a path that cannot be created (read-only volume, a file where a
    directory should be): the OSError escapes ``cli.main`` as a traceback instead of
    ``volley: configuration error: ...`` and exit status 2."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    try:
        code = cli.main(["dlq", "replay", "x:app", "--journal", str(blocker / "journal.jsonl")])
    except OSError as exc:
        pytest.fail(f"volley dlq replay died with a traceback on an unusable journal path: {exc!r}")
    assert code == 2
    assert "journal" in capsys.readouterr().err
    assert broker.depth(DLQ_NAME) == 1 and not broker.produced_records(SOURCE)


# ------------------------------------------------------------------ from the same review's "suspected" list


def test_a_letter_whose_source_is_the_dead_letter_queue_itself_is_left_not_sent_round(
        app: StreamApp, broker: MemoryBroker, tmp_path: Path) -> None:
    """``--to`` naming the dead-letter queue was refused, but a letter whose ``volley-source-queue`` named it (a
    worker consuming its own dead-letter queue wrote it) was sent into the dead-letter queue again and taken
    out: it went round in place, its replay count raised each time."""
    letter(broker, "h0", "handler")
    broker.publish(DLQ_NAME, b"{}", b"self", {"volley-error-stage": b"handler",
                                               "volley-source-queue": DLQ_NAME.encode()})
    summary = run(replay(DeadLetterQueue(app), Journal(tmp_path / "j"), ReplayOptions()))
    assert (summary.moved, summary.left_without_source) == (1, 1)
    assert [e.key for e in broker.browse(DLQ_NAME, -1, 1 << 60, 100)] == [b"self"]


class PartlyFailing:
    """A destination producer that refuses the record of key ``h1`` and confirms the others."""

    def __init__(self, broker: MemoryBroker) -> None:
        self.broker = broker

    async def start(self) -> None:
        return None

    def produce(self, messages: Any, on_delivery: Any) -> None:
        good = [m for m in messages if m.key != b"h1"]
        self.broker.publish_many(good)
        on_delivery(good, [(m, ConnectionError("refused")) for m in messages if m.key == b"h1"])

    async def flush(self, timeout: float) -> None:
        return None

    async def close(self) -> None:
        return None


def test_the_letters_confirmed_in_a_batch_that_partly_failed_are_not_sent_again(
        app: StreamApp, broker: MemoryBroker, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A batch of three of which the destination refused one: the run stopped with a DeliveryError before the
    journal recorded the two it had confirmed, so the next run sent them again (as possible duplicates)."""
    from volley.dlq import target

    for key in ("h0", "h1", "h2"):
        letter(broker, key, "handler")
    path = tmp_path / "journal.jsonl"
    with monkeypatch.context() as patched:
        patched.setattr(target.DeadLetterQueue, "make_producer", lambda self, queue, name: PartlyFailing(broker))
        with pytest.raises(DeliveryError):
            run(replay(DeadLetterQueue(app), Journal(path), ReplayOptions(batch_size=3)))
    assert sent_to_source(broker) == {b"h0": 1, b"h2": 1}
    again = run(replay(DeadLetterQueue(app), Journal(path), ReplayOptions()))
    assert sent_to_source(broker) == {b"h0": 1, b"h1": 1, b"h2": 1}
    # h1 counts as a possible duplicate: a refusal can be ambiguous (a Kafka message timeout may have been stored)
    assert (again.moved, again.finished_from_journal, again.possible_duplicates) == (1, 2, 1)
    assert broker.depth(DLQ_NAME) == 0


def test_an_entry_appended_after_a_line_a_kill_cut_short_is_not_lost(tmp_path: Path) -> None:
    """A run killed while writing leaves half a line without its newline. The next run appended its first entry
    straight after it, so the two made one unreadable line and that entry (an intent) was lost: a third run did
    not count the letters in flight as possible duplicates (found by a review, session 38)."""
    from volley.dlq import Journal

    path = tmp_path / "j.jsonl"
    path.write_text('{"op": "intent", "ids": ["0:1"]}\n{"op": "sent", "ids": ["0:1"], "pri')
    rerun = Journal(path)
    rerun.lock()
    assert rerun.in_doubt("0:1")
    rerun.record_intent(["0:2"])  # the rerun starts sending letter 0:2, and is killed before it is confirmed
    rerun.close()
    third = Journal(path)
    assert third.in_doubt("0:1") and third.in_doubt("0:2"), path.read_text()


class _KilledError(Exception):
    pass


def test_apps_sharing_a_dead_letter_queue_share_its_journal_and_lock(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The journal and its lock were named after the app too: a replay through a second app that dead-letters to
    the same queue could run beside the first, and after the first was killed with three letters confirmed and
    not yet taken out, it sent them again without counting them as possible duplicates (found by a review,
    session 38)."""
    monkeypatch.setenv("VOLLEY_DLQ_JOURNAL_DIR", str(tmp_path))
    broker = MemoryBroker()

    def app(source: str, name: str) -> StreamApp:
        where = {"broker": broker}
        return scenario_app({INPUT: {"value": source, "profile": "memory", "data_model": ORDER, "config": where},
                             OUTPUT: {"value": f"{source}.out", "profile": "memory", "data_model": ORDER,
                                      "config": where},
                             DLQ: {"value": "shared.dlq", "profile": "memory-dlq", "config": where}}, Fix(),
                            app_name=name)

    orders, payments = DeadLetterQueue(app("shop.orders", "orders")), DeadLetterQueue(app("shop.payments", "payments"))
    for n in range(3):
        broker.publish("shared.dlq", json.dumps({"order_id": n, "amount": 1}).encode(), f"k{n}".encode(),
                       {"volley-error-stage": b"handler", "volley-source-queue": b"shop.orders"})
    args = SimpleNamespace(journal=None)
    first, second = dlq_command._journal(args, orders), dlq_command._journal(args, payments)
    assert first.path == second.path
    first.lock()
    try:
        with pytest.raises(ConfigurationError, match="another volley dlq replay"):
            second.lock()
    finally:
        first.close()
        second.close()

    def killed(count: int, at: str) -> None:
        if at == "journaled" and count >= 3:
            raise _KilledError  # after the journal recorded all three as sent, before they left the queue

    with pytest.raises(_KilledError):
        asyncio.run(replay(orders, dlq_command._journal(args, orders),
                           ReplayOptions(batch_size=3), on_confirmed=killed))
    summary = asyncio.run(replay(payments, dlq_command._journal(args, payments),
                                 ReplayOptions()))
    assert Counter(e.key for e in broker.produced_records("shop.orders")) == {b"k0": 1, b"k1": 1, b"k2": 1}
    assert broker.depth("shared.dlq") == 0 and summary.possible_duplicates == 0  # sent before, taken out now


def test_a_replay_that_stops_still_says_what_it_did(app: StreamApp, broker: MemoryBroker, tmp_path: Path,
                                                    monkeypatch: pytest.MonkeyPatch,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """A replay stopped by a letter its destination refused printed the error only: how many letters had been
    moved before it was not said, with or without --json (found by a review, session 38)."""
    from volley.dlq import target

    for key in ("h0", "h1", "h2", "h3"):
        letter(broker, key, "handler")
    monkeypatch.setattr(dlq_command, "load_app", lambda _target: app)
    monkeypatch.setenv("VOLLEY_DLQ_JOURNAL_DIR", str(tmp_path))
    refusing = PartlyFailing(broker)  # refuses h1
    monkeypatch.setattr(target.DeadLetterQueue, "make_producer", lambda self, queue, name: refusing)
    assert cli.main(["dlq", "replay", "x:app", "--batch-size", "1", "--json"]) == 1
    document = json.loads(capsys.readouterr().out)
    assert document["moved"] == 1 and "not confirmed" in document["stopped"], document  # h0, then h1 refused
    assert cli.main(["dlq", "replay", "x:app", "--batch-size", "1"]) == 1
    out = capsys.readouterr().out
    assert "stopped:" in out and "moved 0 letter(s)" in out, out  # h1 first again: refused again


def test_queues_of_one_name_on_two_brokers_keep_journals_of_their_own(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """One journal per connector and queue name (the fix above, first form) merged a prod and a staging queue of
    one name: a full replay of staging's forgot what a killed replay of prod's had confirmed, and prod's rerun
    sent it again, silently (review 38). The journal is named after where the queue lives too
    (volley.ports.LocatingConnector)."""
    monkeypatch.setenv("VOLLEY_DLQ_JOURNAL_DIR", str(tmp_path))
    prod, staging = MemoryBroker(partitions=1), MemoryBroker(partitions=1)

    def app(broker: MemoryBroker, name: str) -> StreamApp:
        where = {"broker": broker}
        return scenario_app({INPUT: {"value": "shop.orders", "profile": "memory", "data_model": ORDER,
                                     "config": where},
                             OUTPUT: {"value": "shop.out", "profile": "memory", "data_model": ORDER, "config": where},
                             DLQ: {"value": "orders.dlq", "profile": "memory-dlq", "config": where}}, Fix(),
                            app_name=name)

    for broker in (prod, staging):
        for n in range(3):
            broker.publish("orders.dlq", json.dumps({"order_id": n, "amount": 1}).encode(), f"k{n}".encode(),
                           {"volley-error-stage": b"handler", "volley-source-queue": b"shop.orders"})
    a, b = DeadLetterQueue(app(prod, "orders-prod")), DeadLetterQueue(app(staging, "orders-staging"))
    args = SimpleNamespace(journal=None)
    assert dlq_command._journal(args, a).path != dlq_command._journal(args, b).path

    def killed(count: int, at: str) -> None:
        if at == "journaled" and count >= 3:
            raise _KilledError  # prod's replay killed: three letters confirmed, journaled, still in its queue

    with pytest.raises(_KilledError):
        asyncio.run(replay(a, dlq_command._journal(args, a), ReplayOptions(batch_size=3), on_confirmed=killed))
    asyncio.run(replay(b, dlq_command._journal(args, b), ReplayOptions()))  # staging's, read to its end
    again = asyncio.run(replay(a, dlq_command._journal(args, a), ReplayOptions()))
    assert Counter(e.key for e in prod.produced_records("shop.orders")) == {b"k0": 1, b"k1": 1, b"k2": 1}
    assert again.finished_from_journal == 3
