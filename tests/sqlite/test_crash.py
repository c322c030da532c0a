"""Zero loss through crashes: two worker processes share one queue, and one of them is killed with SIGKILL
three times mid-stream.

The workers are real subprocesses (sqlite_worker.py) running the engine sqlite -> sqlite on one database file,
with no server. What a killed worker held comes back when its lease (the visibility timeout) lapses; at-least-once
means some messages are processed twice: they are counted and reported, and none may be missing.
"""

from __future__ import annotations

import json
import random
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

WORKER = Path(__file__).with_name("sqlite_worker.py")
TOTAL = 6000
VT = 2.0  # short, so that what a killed worker held comes back soon
IN_FLIGHT_WINDOW = 2500  # what one worker can hold unacknowledged: the engine's buffer plus a consumed batch


def sqlite_worker(path: Path, source: str, output: str, pause: float, log: Path) -> WorkerProcess:
    return WorkerProcess([sys.executable, str(WORKER), str(path), source, output, str(VT), str(pause)], log)


def count(path: Path, queue: str) -> int:
    with sqlite3.connect(path, timeout=30) as db:
        return int(db.execute("SELECT count(*) FROM volley_messages WHERE queue = ?", (queue,)).fetchone()[0])


def test_two_workers_kill_9_three_times_lose_nothing(
    tmp_path: Path, worker_processes: list[WorkerProcess], capsys: pytest.CaptureFixture[str],
    record_property: Callable[[str, Any], None],
) -> None:
    path = tmp_path / "crash.sqlite3"
    source, output = "crash-in", "crash-out"
    admin.publish(path, source, [json.dumps({"id": i}).encode() for i in range(TOTAL)], partitions=4)
    pair = [sqlite_worker(path, source, output, 0.0005, tmp_path / f"worker-{n}.log") for n in range(2)]
    worker_processes.extend(pair)
    rng = random.Random()
    seed_value = rng.randrange(1 << 30)
    rng.seed(seed_value)
    moments = sorted(rng.uniform(0.1, 0.7) for _ in range(3))

    def both_alive() -> None:
        for worker in pair:
            worker.ensure_alive()

    began = time.monotonic()
    for worker in pair:
        worker.start()
    for number, moment in enumerate(moments):
        target = int(moment * TOTAL)
        wait_for(lambda t=target: count(path, output) >= t, 60, f"{target} outputs before kill {number + 1}",
                 both_alive)
        victim = pair[number % 2]
        victim.kill()
        victim.start()  # a restarted worker joins the survivor at once

    produced_at_last_kill = count(path, output)
    assert produced_at_last_kill < TOTAL, "the kills all landed after the work was done"

    def settled() -> bool:
        return count(path, source) == 0 and count(path, output) >= TOTAL and len(set(output_ids(path, output))) == TOTAL

    wait_for(settled, VT + 60, "every id in the output and the input empty", both_alive, every=0.02)
    assert [worker.terminate() for worker in pair] == [0, 0]
    elapsed = time.monotonic() - began

    ids = output_ids(path, output)
    counts = Counter(ids)
    assert set(counts) == set(range(TOTAL)), f"lost: {sorted(set(range(TOTAL)) - set(counts))[:20]}"
    duplicates = len(ids) - TOTAL
    assert duplicates <= 3 * IN_FLIGHT_WINDOW, f"{duplicates} duplicates: more than the in-flight window per kill"
    by_pid = Counter(int(m.headers["worker"]) for m in admin.messages(path, output) if m.headers)
    # The queue was shared: several processes produced outputs. (Not necessarily every incarnation: a newcomer gets
    # its share of an ordered queue's partitions only once their holder has settled what it took from them.)
    assert len(by_pid) >= 2, f"only one worker process did any work: {by_pid}"
    for queue, stats in admin.stats(path).items():
        assert stats["held"] == stats["ready"] == stats["delayed"] == 0 or queue == output, (queue, stats)
    line = (f"sqlite crash test: {TOTAL} ids, two workers, kill -9 at {[round(m, 2) for m in moments]} of the stream "
            f"(random seed {seed_value}): 0 lost, {duplicates} duplicate(s) "
            f"({sum(1 for c in counts.values() if c > 1)} ids processed more than once), {elapsed:.1f} s; "
            f"outputs per worker process: {sorted(by_pid.values(), reverse=True)}")
    record_property("duplicates", duplicates)
    record_property("random_seed", seed_value)
    with capsys.disabled():
        print(f"\n{line}")


def output_ids(path: Path, queue: str) -> list[int]:
    return [json.loads(value)["id"] for value in admin.values(path, queue)]
