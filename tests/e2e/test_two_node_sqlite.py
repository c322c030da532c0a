"""examples/two_node with VOLLEY_EXAMPLE_BACKEND=sqlite: two separate processes on one SQLite file, no server."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "two_node"
EXPECTED = [3.0, 5.0, 7.0, 9.0, 11.0]
DONE_LINE = "That's it, we are done!"


def _floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]


def _environment(database: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLLEY_EXAMPLE_")}
    env.pop("KAFKA_BROKERS", None)
    env.pop("REDIS_HOST", None)
    env.update(VOLLEY_EXAMPLE_BACKEND="sqlite", VOLLEY_SQLITE_PATH=str(database), PYTHONUNBUFFERED="1")
    return env


def test_run_py_with_the_sqlite_backend(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "run.py"), "--backend", "sqlite", "--timeout", "60",
         "--database", str(tmp_path / "run.sqlite3")],
        cwd=ROOT, env=_environment(tmp_path / "unused.sqlite3"), capture_output=True, text=True, timeout=120,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    assert "starting a private" not in output  # no Kafka, no Redis
    assert _floats(r"the_max=([\d.]+)", output) == EXPECTED
    assert _floats(r"The maximum: ([\d.]+)", output) == EXPECTED
    assert output.count(DONE_LINE) == 1
    assert "maxima: 3.0, 5.0, 7.0, 9.0, 11.0" in done.stdout
    reports = re.findall(r"node-(one|two): stopped \(RunReport\(consumed=(\d+), acked=(\d+)", output)
    assert sorted(reports) == [("one", "5", "5"), ("two", "5", "5")], output[-4000:]


def test_two_terminals_as_in_the_readme(tmp_path: Path) -> None:
    """`volley run ...:node_one` and `volley run ...:node_two` as separate processes, seeded from a shell."""
    database = tmp_path / "two-node.sqlite3"
    env = _environment(database)
    logs = {node: tmp_path / f"{node}.log" for node in ("node_one", "node_two")}
    processes: dict[str, subprocess.Popen[bytes]] = {}
    try:
        for node, log_path in logs.items():
            with log_path.open("wb") as log:
                processes[node] = subprocess.Popen(
                    [sys.executable, "-m", "volley.cli", "run", f"examples.two_node.worker:{node}"],
                    cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                )
        subprocess.run([sys.executable, "-m", "volley_sqlite", "publish", "volley.example.values",
                        '{"my_values": [1, 2, 3]}'], cwd=ROOT, env=env, check=True, timeout=60, capture_output=True)
        deadline = time.monotonic() + 60
        while DONE_LINE not in logs["node_two"].read_text():
            for node, process in processes.items():
                assert process.poll() is None, f"{node} exited early:\n{logs[node].read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no done line within 60 s:\n{logs['node_two'].read_text()[-4000:]}"
            time.sleep(0.05)
        for process in processes.values():
            process.send_signal(signal.SIGTERM)
        assert [process.wait(30) for process in processes.values()] == [0, 0]
    finally:
        for process in processes.values():
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    one, two = (logs[node].read_text() for node in ("node_one", "node_two"))
    assert _floats(r"the_max=([\d.]+)", one) == EXPECTED
    assert _floats(r"The maximum: ([\d.]+)", two) == EXPECTED
    assert two.count(DONE_LINE) == 1
    stats = subprocess.run([sys.executable, "-m", "volley_sqlite", "stats"], cwd=ROOT, env=env, check=True,
                           timeout=60, capture_output=True, text=True).stdout
    assert "volley.example.values ready=0 delayed=0 held=0 acked=0" in stats
    assert "volley-example-maxima ready=0 delayed=0 held=0 acked=0" in stats
