"""A poison message that kills its worker (kill -9 by its own hand: a segfault, an OOM kill) goes to the dead-letter
queue alone; the messages the worker had leased beside it are handled, not dead-lettered with it.

The worker (sqlite_poison_worker.py) is a real subprocess, restarted each time it dies, as a supervisor would. The
engine prefetches up to ``max_buffered`` messages, all leased to the worker when it dies. Before the fix each death
raised the delivery count of every one of them, so after ``max_deliveries`` deaths the whole prefetched set was
dead-lettered (stage ``redelivery``) together with the poison message.
"""

from __future__ import annotations

import signal
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services.processes import WorkerProcess, wait_for
from volley_sqlite import admin

pytestmark = pytest.mark.slow

WORKER = Path(__file__).with_name("sqlite_poison_worker.py")
TOTAL = 5000  # more than the engine prefetches (max_buffered: 2000), so that every death leaves a full buffer
POISON_INDEX = 1500  # the worker has a full buffer of innocent messages leased when it dies
VT = 1.0  # short, so that what a dead worker held comes back soon
MAX_DELIVERIES = 4  # the poison message kills this many worker processes, then is dead-lettered unhandled


def count(path: Path, queue: str) -> int:
    with sqlite3.connect(path, timeout=30) as db:
        return int(db.execute("SELECT count(*) FROM volley_messages WHERE queue = ?", (queue,)).fetchone()[0])


def value(index: int) -> bytes:
    return b"poison" if index == POISON_INDEX else f"m-{index:05d}".encode()


@pytest.mark.parametrize("ordered", [True, False], ids=["ordered", "competing"])
def test_a_message_that_kills_its_worker_is_dead_lettered_alone(
    tmp_path: Path, worker_processes: list[WorkerProcess], capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, Any], None], ordered: bool,
) -> None:
    path = tmp_path / "poison.sqlite3"
    source, output, dlq = "poison-in", "poison-out", "poison-dlq"
    admin.publish(path, source, [value(i) for i in range(TOTAL)], partitions=4)
    worker = WorkerProcess([sys.executable, str(WORKER), str(path), source, output, dlq, str(VT),
                            str(MAX_DELIVERIES), "poison", str(ordered)], tmp_path / "worker.log")
    worker_processes.append(worker)
    deaths: list[float] = []

    def restart_the_dead() -> None:
        """What a supervisor does: a worker that died is started again (it must have died of SIGKILL)."""
        if worker.alive():
            return
        assert worker.process is not None
        code = worker.process.wait(10)
        assert code == -signal.SIGKILL, f"worker exited with {code}, not killed by the poison:\n{worker.tail()}"
        deaths.append(time.monotonic())
        assert len(deaths) <= MAX_DELIVERIES, (f"the poison killed {len(deaths)} workers (max_deliveries is "
                                               f"{MAX_DELIVERIES}):\n{worker.tail()}")
        worker.start()

    def settled() -> bool:
        return count(path, source) == 0 and count(path, dlq) >= 1

    began = time.monotonic()
    worker.start()
    wait_for(settled, 120, "the input queue empty and a dead letter", restart_the_dead, every=0.02)
    elapsed = time.monotonic() - began
    assert worker.terminate() == 0

    letters = admin.messages(path, dlq)
    assert [m.value for m in letters] == [b"poison"], (
        f"{len(letters)} message(s) dead-lettered, not only the poison one: "
        f"{Counter((m.headers or {}).get('volley-error-stage', b'?').decode() for m in letters)} by stage")
    assert letters[0].headers is not None and letters[0].headers["volley-error-stage"] == b"redelivery"
    assert len(deaths) == MAX_DELIVERIES, f"the poison killed {len(deaths)} workers, not {MAX_DELIVERIES}"

    outputs = admin.messages(path, output)
    handled = Counter(m.value for m in outputs)
    assert set(handled) == {value(i) for i in range(TOTAL) if i != POISON_INDEX}, "an innocent message is missing"
    attempts = Counter(int(m.headers["attempt"]) for m in outputs if m.headers)
    assert max(attempts) <= 2, f"innocent messages were delivered up to {max(attempts)} times: {attempts}"
    line = (f"sqlite poison test ({'ordered' if ordered else 'competing'}): {TOTAL} messages, "
            f"{len(deaths)} worker deaths, 1 dead letter, "
            f"{len(outputs) - len(handled)} duplicate output(s), outputs by delivery count "
            f"{dict(sorted(attempts.items()))}, "
            f"{elapsed:.1f} s (from the last death to the end: {time.monotonic() - deaths[-1]:.1f} s)")
    record_property("poison_seconds", round(elapsed, 1))
    with capsys.disabled():
        print(f"\n{line}")
