"""examples/two_node on the session's real Kafka and Redis: run.py end to end, and the worker under `volley run`."""

from __future__ import annotations

import importlib.util
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest

pytestmark = [pytest.mark.kafka, pytest.mark.redis, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "two_node"
EXPECTED = [3.0, 5.0, 7.0, 9.0, 11.0]
DONE_LINE = "That's it, we are done!"


def _environment(kafka_bootstrap: str, redis_server: Any, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("VOLLEY_EXAMPLE_")}
    env.update(KAFKA_BROKERS=kafka_bootstrap, REDIS_HOST=f"{redis_server.host}:{redis_server.port}",
               PYTHONUNBUFFERED="1", **extra)
    return env


def _floats(pattern: str, text: str) -> list[float]:
    return [float(m) for m in re.findall(pattern, text)]


def _load_run_module() -> ModuleType:
    spec = importlib.util.spec_from_file_location("two_node_run", EXAMPLE / "run.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_run_py_prints_the_demo_sequence(kafka_bootstrap: str, redis_server: Any) -> None:
    began = time.monotonic()
    done = subprocess.run(
        [sys.executable, str(EXAMPLE / "run.py"), "--timeout", "90"],
        cwd=ROOT, env=_environment(kafka_bootstrap, redis_server), capture_output=True, text=True, timeout=150,
        check=False,
    )
    output = done.stdout + done.stderr
    assert done.returncode == 0, output[-6000:]
    # It used the session's servers instead of starting its own.
    assert "starting a private" not in output
    assert f"using Kafka at {kafka_bootstrap}" in output
    assert _floats(r"the_max=([\d.]+)", output) == EXPECTED
    assert _floats(r"The maximum: ([\d.]+)", output) == EXPECTED
    assert len(re.findall(r"Received my_values=\[", output)) == 5
    assert output.count(DONE_LINE) == 1
    # The done line comes after the last maximum, and both nodes settled everything they consumed.
    assert output.index(DONE_LINE) > output.index("The maximum: 11.0")
    assert "maxima: 3.0, 5.0, 7.0, 9.0, 11.0" in done.stdout
    reports = re.findall(r"node-(one|two): stopped \(RunReport\(consumed=(\d+), acked=(\d+)", output)
    assert sorted(reports) == [("one", "5", "5"), ("two", "5", "5")], output[-4000:]
    print(f"run.py on the session's servers: {time.monotonic() - began:.1f} s")


def test_worker_under_volley_run(kafka_bootstrap: str, redis_server: Any, tmp_path: Path) -> None:
    """`volley run examples.two_node.worker:node_one examples.two_node.worker:node_two`, stopped with SIGTERM."""
    run_id = uuid.uuid4().hex[:8]
    names = {"VOLLEY_EXAMPLE_TOPIC": f"e2e.values.{run_id}", "VOLLEY_EXAMPLE_QUEUE": f"e2e-maxima-{run_id}",
             "VOLLEY_EXAMPLE_GROUP": f"e2e-node-one-{run_id}"}
    runner = _load_run_module()
    runner.create_topics(kafka_bootstrap, [names["VOLLEY_EXAMPLE_TOPIC"], names["VOLLEY_EXAMPLE_TOPIC"] + ".dlq"])
    runner.seed(kafka_bootstrap, names["VOLLEY_EXAMPLE_TOPIC"], [1, 2, 3])
    log_path = tmp_path / "volley-run.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "volley.cli", "run", "examples.two_node.worker:node_one",
             "examples.two_node.worker:node_two"],
            cwd=ROOT, env=_environment(kafka_bootstrap, redis_server, **names), stdout=log, stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        deadline = time.monotonic() + 60
        while DONE_LINE not in log_path.read_text():
            assert process.poll() is None, f"volley run exited early:\n{log_path.read_text()[-4000:]}"
            assert time.monotonic() < deadline, f"no done line within 60 s:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.05)
        process.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    output = log_path.read_text()
    assert _floats(r"The maximum: ([\d.]+)", output) == EXPECTED
    assert output.count(DONE_LINE) == 1
    assert "SIGTERM received: stopping 2 app(s)" in output
