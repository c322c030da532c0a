"""``volley dlq`` on the memory broker: inspect, filtered replay, the loop guard, an interrupted replay, purge."""

from __future__ import annotations

import asyncio
import io
import json
import time
from collections import Counter
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from volley import cli
from volley.dlq import DeadLetterQueue, Journal, LetterFilter, ReplayOptions, inspect, purge, replay
from volley.dlq import command as dlq_command
from volley.dlq.journal import JournalBusyError
from volley.dlq.letter import ERROR_HEADERS, REPLAY_COUNT
from volley.engine import StreamApp
from volley.memory import MemoryBroker
from volley.testing.deadletters import DLQ, INPUT, OUTPUT, STAGES, Fix, scenario_app, seed

ORDER = "volley.testing.deadletters.Order"


class Fixed(Fix):
    fixed = False


def memory_config(broker: MemoryBroker) -> dict[str, Any]:
    where = {"broker": broker}
    return {INPUT: {"value": "shop.orders", "profile": "memory", "data_model": ORDER, "config": where},
            OUTPUT: {"value": "shop.shipped", "profile": "memory", "data_model": ORDER, "config": where},
            DLQ: {"value": "shop.orders.dlq", "profile": "memory-dlq", "config": where}}


@pytest.fixture
def broker() -> MemoryBroker:
    return MemoryBroker(partitions=2)


@pytest.fixture
def fix() -> type[Fixed]:
    Fixed.fixed = False
    return Fixed


@pytest.fixture
def app(broker: MemoryBroker, fix: type[Fixed]) -> StreamApp:
    """The scenario app after one run: every failing input is in the dead-letter queue."""
    app = scenario_app(memory_config(broker), fix)
    for value, key, headers in seed():
        broker.publish("shop.orders", value, key, headers)
    broker.publish("shop.orders", json.dumps({"order_id": 1, "amount": 5}).encode(), b"ok")
    app.run_until_drained(timeout=30, drain_idle_seconds=0.05)
    assert broker.depth("shop.orders.dlq") == sum(STAGES.values())
    return app


def stages_in(broker: MemoryBroker, queue: str = "shop.orders.dlq") -> Counter[str]:
    """The dead letters still in ``queue``, by stage (read without taking them)."""
    return Counter(e.headers["volley-error-stage"].decode() for e in broker.browse(queue, -1, 1 << 60, 1000)
                   if e.headers)


def run(coro: Any) -> Any:
    return asyncio.run(coro)


def test_inspect_counts_by_stage_type_and_source_and_consumes_nothing(app: StreamApp, broker: MemoryBroker) -> None:
    result = run(inspect(DeadLetterQueue(app), LetterFilter(), samples=3))
    assert result.total == result.matching == 12
    assert dict(result.by_stage) == STAGES
    assert dict(result.by_error_type) == {"SerializationError": 4, "DataValidationError": 3, "ValueError": 5}
    assert dict(result.by_source_queue) == {"shop.orders": 12}
    assert result.first is not None and result.last is not None and result.first <= result.last <= time.time()
    assert len(result.samples) == 3
    assert result.samples[0]["key"] == "d0" and result.samples[0]["value"] == "not json 0"
    assert result.samples[0]["reason"].startswith("invalid JSON")
    # nothing was taken, held or redelivered: a consumer still gets every letter, on its first delivery
    assert broker.depth("shop.orders.dlq") == 12 and broker.unacked("shop.orders.dlq") == 0
    taken = broker.take("shop.orders.dlq", 100, owner=99)
    assert len(taken) == 12 and {e.attempt for e in taken} == {1}


def test_inspect_filters(app: StreamApp) -> None:
    dlq = DeadLetterQueue(app)
    assert run(inspect(dlq, LetterFilter(stages=("validate", "handler")))).matching == 8
    assert run(inspect(dlq, LetterFilter(error_types=("ValueError",)))).matching == 5
    assert run(inspect(dlq, LetterFilter(reason_contains="order 203"))).matching == 1
    assert run(inspect(dlq, LetterFilter(keys=("h1", "d2")))).matching == 2
    assert run(inspect(dlq, LetterFilter(since=time.time() + 60))).matching == 0
    assert run(inspect(dlq, LetterFilter(until=time.time() + 60))).matching == 12


def test_a_filtered_replay_moves_exactly_the_matching_letters_and_the_app_then_processes_them(
    app: StreamApp, broker: MemoryBroker, fix: type[Fixed], tmp_path: Path
) -> None:
    fix.fixed = True  # the bug fix that the replay follows
    journal = Journal(tmp_path / "journal.jsonl")
    summary = run(replay(DeadLetterQueue(app), journal, ReplayOptions(filter=LetterFilter(stages=("handler",)))))
    assert (summary.moved, summary.skipped_by_filter, summary.left_by_loop_guard) == (5, 7, 0)
    assert dict(summary.by_destination) == {"shop.orders": 5}
    assert stages_in(broker) == {"deserialize": 4, "validate": 3}
    replayed = broker.produced_records("shop.orders")[-5:]
    assert sorted(e.key for e in replayed) == [b"h0", b"h1", b"h2", b"h3", b"h4"]
    for envelope in replayed:
        headers = envelope.headers or {}
        assert headers["trace-id"] == b"t-" + (envelope.key or b"")
        assert headers[REPLAY_COUNT] == b"1"
        assert not ERROR_HEADERS & headers.keys()
    remembered = Journal(journal.path)  # every letter it confirmed left the queue: only the replay counts stay
    assert (set(remembered.sent), remembered.intended, sum(remembered.replays.values())) == (set(), set(), 5)
    shipped_before = len(broker.produced("shop.shipped"))
    app.run_until_drained(timeout=30, drain_idle_seconds=0.05)
    shipped = [json.loads(v)["order_id"] for v in broker.produced("shop.shipped")[shipped_before:]]
    assert sorted(shipped) == [200, 201, 202, 203, 204]
    assert broker.depth("shop.orders.dlq") == 7  # nothing came back


def test_the_loop_guard_leaves_a_letter_that_keeps_failing(app: StreamApp, broker: MemoryBroker,
                                                           tmp_path: Path) -> None:
    """The bug is not fixed: each replay sends the handler letters back, they fail again, and after the third
    replay the guard leaves them where they are and reports them."""
    dlq = DeadLetterQueue(app)
    options = ReplayOptions(filter=LetterFilter(stages=("handler",)), max_replays=3)
    for round_number in range(1, 4):
        summary = run(replay(dlq, Journal(tmp_path / "j.jsonl"), options))
        assert (summary.moved, summary.left_by_loop_guard) == (5, 0)
        app.run_until_drained(timeout=30, drain_idle_seconds=0.05)
        counts = Counter(e.headers[REPLAY_COUNT] for e in broker.browse("shop.orders.dlq", -1, 1 << 60, 100)
                         if e.headers and REPLAY_COUNT in e.headers)
        assert counts == {str(round_number).encode(): 5}
    summary = run(replay(dlq, Journal(tmp_path / "j.jsonl"), options))
    assert (summary.moved, summary.left_by_loop_guard) == (0, 5)
    assert sorted(s["key"] for s in summary.looping) == ["h0", "h1", "h2", "h3", "h4"]
    assert any("left by the loop guard: 5" in line for line in summary.lines())
    assert stages_in(broker)["handler"] == 5


class CrashError(Exception):
    pass


@pytest.mark.parametrize(("point", "duplicates"), [("journaled", 0), ("confirmed", 1)])
def test_an_interrupted_replay_run_again_moves_every_letter_once_or_reports_the_duplicates(
    app: StreamApp, broker: MemoryBroker, tmp_path: Path, point: str, duplicates: int
) -> None:
    """Killed right after the broker confirmed the 3rd letter: before its journal entry ("confirmed": that letter
    is sent again and reported as a possible duplicate) or after it ("journaled": the rerun only takes it out)."""
    dlq = DeadLetterQueue(app)
    path = tmp_path / "journal.jsonl"
    options = ReplayOptions(filter=LetterFilter(stages=("validate", "handler")), batch_size=1)

    def crash(count: int, at: str) -> None:
        if at == point and count >= 3:
            raise CrashError

    with pytest.raises(CrashError):
        run(replay(dlq, Journal(path), options, on_confirmed=crash))
    assert len(broker.produced_records("shop.orders")) == 13 + 3
    assert broker.depth("shop.orders.dlq") == 10  # the first two left the queue, the third had not yet
    summary = run(replay(dlq, Journal(path), options))
    assert summary.possible_duplicates == duplicates
    assert summary.moved + summary.finished_from_journal == 6
    assert summary.finished_from_journal == 1 - duplicates
    replayed = Counter(e.key for e in broker.produced_records("shop.orders")[13:])
    assert set(replayed) == {b"v0", b"v1", b"v2", b"h0", b"h1", b"h2", b"h3", b"h4"}
    assert sum(replayed.values()) == 8 + duplicates
    assert stages_in(broker) == {"deserialize": 4}
    assert set(Journal(path).sent) == set()


def test_rate_bounds_letters_per_second(app: StreamApp, tmp_path: Path) -> None:
    began = time.monotonic()
    summary = run(replay(DeadLetterQueue(app), Journal(tmp_path / "j"), ReplayOptions(rate=20.0)))
    assert summary.moved == 12
    assert time.monotonic() - began >= 10 / 20  # six batches of two, one every 0.1 s


def test_a_pause_earns_the_rate_no_burst(monkeypatch: pytest.MonkeyPatch) -> None:
    """--rate was an average since the first send: after a minute with nothing to send (browsing past letters the
    filter skips), 600 letters could go out at once at --rate 10 (found by a review, session 38)."""
    import importlib

    replay_module = importlib.import_module("volley.dlq.replay")
    clock = [1000.0]

    async def sleep(seconds: float) -> None:
        clock[0] += seconds

    monkeypatch.setattr(replay_module, "time", SimpleNamespace(monotonic=lambda: clock[0]))  # the pacer's clock
    monkeypatch.setattr(replay_module, "asyncio", SimpleNamespace(sleep=sleep))
    pacer = replay_module._Pacer(10.0)

    async def go() -> int:
        await pacer.wait_for(1)  # one early letter
        clock[0] += 60.0  # a minute with nothing to send
        began, sent = clock[0], 0
        while True:
            await pacer.wait_for(1)
            if clock[0] >= began + 0.95:  # sent at 0.0, 0.1, ... 0.9 s after the pause: ten in its first second
                return sent
            sent += 1

    assert run(go()) == 10  # one at once, then one every 0.1 s (600 at once before)


def test_limit_and_to(app: StreamApp, broker: MemoryBroker, tmp_path: Path) -> None:
    options = ReplayOptions(filter=LetterFilter(stages=("validate",)), limit=2, to="elsewhere")
    summary = run(replay(DeadLetterQueue(app), Journal(tmp_path / "j"), options))
    assert summary.moved == 2
    assert sorted(e.key for e in broker.produced_records("elsewhere")) == [b"v0", b"v1"]
    assert stages_in(broker) == {"deserialize": 4, "validate": 1, "handler": 5}


def test_purge_deletes_only_the_matching_letters(app: StreamApp, broker: MemoryBroker) -> None:
    assert run(purge(DeadLetterQueue(app), LetterFilter(stages=("deserialize",)))) == 4
    assert stages_in(broker) == {"validate": 3, "handler": 5}
    assert run(purge(DeadLetterQueue(app), LetterFilter(stages=("handler",)), limit=2)) == 2
    assert stages_in(broker) == {"validate": 3, "handler": 3}


class Counts:
    """A DeadLetterObserver (volley.ports), as volley-prometheus is one."""

    def __init__(self) -> None:
        self.replayed: Counter[str] = Counter()
        self.purged: Counter[str] = Counter()

    def on_dead_letters_replayed(self, app_name: str, source_queue: str, count: int) -> None:
        self.replayed[f"{app_name}/{source_queue}"] += count

    def on_dead_letters_purged(self, app_name: str, source_queue: str, count: int) -> None:
        self.purged[f"{app_name}/{source_queue}"] += count


def test_observers_count_replayed_and_purged_letters_by_source_queue(broker: MemoryBroker, tmp_path: Path) -> None:
    counts = Counts()
    app = scenario_app(memory_config(broker), observers=[counts])
    for value, key, headers in seed():
        broker.publish("shop.orders", value, key, headers)
    app.run_until_drained(timeout=30, drain_idle_seconds=0.05)
    dlq = DeadLetterQueue(app)
    run(replay(dlq, Journal(tmp_path / "j"), ReplayOptions(filter=LetterFilter(stages=("validate",)))))
    run(purge(dlq, LetterFilter(stages=("deserialize",))))
    assert counts.replayed == {"dlq-scenario/shop.orders": 3}
    assert counts.purged == {"dlq-scenario/shop.orders": 4}


# ---------------------------------------------------------------------------------------------- the command line


@pytest.fixture
def command(app: StreamApp, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> StreamApp:
    monkeypatch.setattr(dlq_command, "load_app", lambda target: app)
    monkeypatch.setenv("VOLLEY_DLQ_JOURNAL_DIR", str(tmp_path / "journals"))
    return app


def test_cli_inspect_json(command: StreamApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dlq", "inspect", "x:app", "--json", "--stage", "handler"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["total"] == 12 and document["matching"] == 5 and document["by_stage"] == {"handler": 5}


def test_cli_inspect_limit_counts_at_most_that_many_letters(command: StreamApp,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    """--limit was accepted and checked, then ignored: the counts were of every letter (found by a review, session
    38). Now the breakdown is of the first N matching letters; the total is still every letter."""
    assert cli.main(["dlq", "inspect", "x:app", "--json", "--stage", "handler", "--limit", "2"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert (document["total"], document["matching"], document["by_stage"]) == (12, 2, {"handler": 2})
    assert cli.main(["dlq", "inspect", "x:app", "--limit", "3"]) == 0
    assert "12 letter(s), the first 3 matching" in capsys.readouterr().out


def test_cli_inspect_text(command: StreamApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dlq", "inspect", "x:app"]) == 0
    out = capsys.readouterr().out
    assert "dead-letter queue shop.orders.dlq: 12 letter(s), 12 matching" in out
    assert "SerializationError" in out and "shop.orders" in out


def test_cli_replay_dry_run_moves_nothing(command: StreamApp, broker: MemoryBroker,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dlq", "replay", "x:app", "--dry-run", "--stage", "validate", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["moved"] == 3
    assert broker.depth("shop.orders.dlq") == 12 and len(broker.produced("shop.orders")) == 13


def test_cli_replay_prints_the_summary(command: StreamApp, broker: MemoryBroker,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dlq", "replay", "x:app", "--error-type", "DataValidationError"]) == 0
    out = capsys.readouterr().out
    assert "moved 3 letter(s), 3 to shop.orders" in out and "skipped by filter: 9" in out
    assert stages_in(broker) == {"deserialize": 4, "handler": 5}


def test_cli_purge_asks_and_needs_yes_without_a_terminal(command: StreamApp, broker: MemoryBroker,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dlq", "purge", "x:app", "--stage", "deserialize"]) == 2
    assert "pass --yes" in capsys.readouterr().err
    assert broker.depth("shop.orders.dlq") == 12
    assert cli.main(["dlq", "purge", "x:app", "--stage", "deserialize", "--yes"]) == 0
    assert "deleted 4 letter(s)" in capsys.readouterr().out
    assert stages_in(broker) == {"validate": 3, "handler": 5}


def test_cli_purge_before_is_for_brokers_that_cannot_drop_single_letters(
        command: StreamApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dlq", "purge", "x:app", "--before", "5", "--yes"]) == 2
    assert "use the filters" in capsys.readouterr().err


def test_cli_bad_times_fail_clearly(command: StreamApp, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["dlq", "inspect", "x:app", "--since", "yesterday-ish"]) == 2
    assert "neither an ISO 8601 time" in capsys.readouterr().err


def test_an_app_without_a_dead_letter_queue_is_refused(broker: MemoryBroker) -> None:
    from volley import Engine

    engine = Engine("nodlq", input_queue="in", queue_config={"in": {"value": "in", "profile": "memory",
                                                                    "config": {"broker": broker}}},
                    metrics_port=None)
    with pytest.raises(ValueError, match="has no dead_letter_queue"):
        DeadLetterQueue(engine.stream_app(lambda m: True))


def test_replay_to_the_dead_letter_queue_itself_is_refused(app: StreamApp, tmp_path: Path) -> None:
    for to in (DLQ, "shop.orders.dlq"):
        with pytest.raises(ValueError, match="dead-letter queue itself"):
            run(replay(DeadLetterQueue(app), Journal(tmp_path / "j"), ReplayOptions(to=to)))


def test_two_replays_of_one_queue_cannot_run_at_once(tmp_path: Path) -> None:
    first, second = Journal(tmp_path / "j.jsonl"), Journal(tmp_path / "j.jsonl")
    first.lock()
    with pytest.raises(JournalBusyError, match="another volley dlq replay"):
        second.lock()
    first.close()
    second.lock()
    second.close()


def test_the_journal_counts_replays_of_the_same_content_across_runs(app: StreamApp, broker: MemoryBroker,
                                                                     tmp_path: Path) -> None:
    """Where a destination drops headers, the replay counter cannot come back with the letter: the journal's count
    of the letter's content (key and value) stands in for it. Here the counter is stripped from the letters by
    hand between rounds, as an RSMQ input with ``headers: drop`` would."""
    dlq = DeadLetterQueue(app)
    path = tmp_path / "j.jsonl"
    options = ReplayOptions(filter=LetterFilter(stages=("handler",)), max_replays=2)
    for _ in range(2):
        assert run(replay(dlq, Journal(path), options)).moved == 5
        for envelope in broker.browse("shop.orders", -1, 1 << 60, 100):
            (envelope.headers or {}).pop(REPLAY_COUNT, None)  # the stored headers dict: what "drop" leaves
        app.run_until_drained(timeout=30, drain_idle_seconds=0.05)
        assert all(REPLAY_COUNT not in (e.headers or {}) for e in broker.browse("shop.orders.dlq", -1, 1 << 60, 100))
    summary = run(replay(dlq, Journal(path), options))
    assert (summary.moved, summary.left_by_loop_guard) == (0, 5)
    assert {s["replays"] for s in summary.looping} == {2}


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_is_a_bar_on_a_terminal_and_plain_lines_otherwise() -> None:
    from volley.dlq.progress import Progress
    from volley.dlq.replay import ReplaySummary

    terminal = _Terminal()
    bar = Progress(40, terminal)
    bar.update(ReplaySummary(moved=10), 20)
    bar.done()
    assert terminal.getvalue().startswith("\r[" + "#" * 15 + "-" * 15 + "] read 20/40, moved 10")
    assert terminal.getvalue().endswith("\n")
    plain = io.StringIO()
    lines = Progress(None, plain, every=0.0)
    lines.update(ReplaySummary(moved=3), 5)
    lines.done()
    assert plain.getvalue().startswith("read 5, moved 3") and "\r" not in plain.getvalue()
