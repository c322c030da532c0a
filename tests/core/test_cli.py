"""The ``volley`` command's ``demo`` and ``plugins``, as a user runs them (in-process and as a subprocess)."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import subprocess
import sys

import pytest

from volley import cli, demo
from volley.memory import MemoryBroker


def test_the_demo_publishes_the_maxima_and_stops(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger="volley.demo"):
        assert cli.main(["demo"]) == 0
    lines = [r.getMessage() for r in caplog.records if r.name == "volley.demo"]
    assert [line for line in lines if line.startswith("The maximum: ")] == [
        "The maximum: 3.0", "The maximum: 5.0", "The maximum: 7.0", "The maximum: 9.0", "The maximum: 11.0"]
    assert lines.count("That's it, we are done!") == 1
    assert "Received ValuesMessage(my_values=[1, 2, 3])" in lines
    assert "the_max=11.0" in lines


def test_the_demo_fails_when_the_nodes_publish_something_else(monkeypatch: pytest.MonkeyPatch) -> None:
    """The exit status means something: a run that publishes other maxima is a failure."""
    real = demo.run_demo

    async def one_short(seed: list[float] | None = None, timeout: float = 30.0) -> MemoryBroker:
        broker = await real(seed, timeout)
        broker.publish(demo.MAXIMA, json.dumps({"max_value": 13.0}).encode())  # one more than the nodes sent
        return broker

    monkeypatch.setattr(demo, "run_demo", one_short)
    assert demo.main() == 1


def test_expected_maxima() -> None:
    assert demo.expected_maxima([1, 2, 3]) == [3.0, 5.0, 7.0, 9.0, 11.0]
    assert demo.expected_maxima([12]) == [12.0]
    assert demo.expected_maxima([10]) == [10.0, 12.0]


def test_the_demo_runs_on_a_seed_of_its_own() -> None:
    broker = asyncio.run(demo.run_demo([8, 4], timeout=30))
    assert [json.loads(v)["max_value"] for v in broker.produced(demo.MAXIMA)] == [8.0, 10.0, 12.0]
    assert broker.produced("volley.demo.dlq") == []


def test_volley_plugins_lists_every_registration_with_its_distribution() -> None:
    done = subprocess.run([sys.executable, "-m", "volley.cli", "plugins"], capture_output=True, text=True,
                          timeout=60, check=True)
    lines = done.stdout.splitlines()
    for section in ("connectors:", "serializers:", "model_handlers:", "profiles:", "observers:"):
        assert section in lines, done.stdout
    rows = {tuple(line.split()) for line in lines if line.startswith("  ") and "(none)" not in line}
    for row in [("memory", "volley-core"), ("json", "volley-core"), ("dataclass", "volley-core"),
                ("memory-dlq", "volley-core"), ("memory-batch-json", "volley-core")]:
        assert row in rows, done.stdout
    profiles = [line.split()[0] for line in lines[lines.index("profiles:") + 1:lines.index("observers:")]]
    assert profiles == sorted(profiles), "names are listed in order"


def test_volley_plugins_into_a_closed_pipe_ends_quietly() -> None:
    """``volley plugins | head -3``: the reader going away is not an error worth a traceback."""
    read_end, write_end = os.pipe()
    os.close(read_end)  # every write fails with EPIPE, as once head has what it wanted
    try:
        done = subprocess.run([sys.executable, "-m", "volley.cli", "plugins"], stdout=write_end,
                              stderr=subprocess.PIPE, text=True, timeout=60, check=False)
    finally:
        os.close(write_end)
    assert "Traceback" not in done.stderr, done.stderr
    assert done.returncode == 141  # 128 + SIGPIPE, what a shell reports for a command its pipe cut short


@pytest.mark.parametrize(("level", "code"), [("verbose", 2), ("10", 0), ("warning", 0)])
def test_an_unknown_log_level_is_a_configuration_error_not_a_traceback(level: str, code: int) -> None:
    """--log-level / VOLLEY_LOG_LEVEL went to logging.basicConfig outside main's error handling: a typo ended in a
    ValueError traceback (exit 1). Names in any case and numbers are accepted (found by a review, session 38)."""
    done = subprocess.run([sys.executable, "-m", "volley.cli", "--log-level", level, "plugins"],
                          capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in done.stderr, done.stderr[-500:]
    assert done.returncode == code, done.stderr[-500:]
    if code:
        assert "unknown log level 'verbose'" in done.stderr
