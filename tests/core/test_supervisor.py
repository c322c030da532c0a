"""``volley run --workers N``'s restart delay (volley.workers.Supervisor), on fake processes and a fake clock."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from volley import workers


class FakeProcess:
    started: list[FakeProcess] = []
    on_create: Any = None  # called while "Popen" runs: where a signal may land

    def __init__(self, command: list[str], **_: Any) -> None:
        self.pid = 1000 + len(FakeProcess.started)
        self.code: int | None = None
        self.signals: list[int] = []
        self.killed = False
        FakeProcess.started.append(self)
        if FakeProcess.on_create is not None:
            FakeProcess.on_create(len(FakeProcess.started) - 1)

    def poll(self) -> int | None:
        return self.code

    def send_signal(self, signum: int) -> None:
        self.signals.append(signum)
        if signum == signal.SIGTERM:
            self.code = 0  # a worker that stops gracefully at once

    def kill(self) -> None:
        self.killed = True
        self.code = -signal.SIGKILL

    def wait(self, timeout: float | None = None) -> int:
        if self.code is None:  # still running at the deadline (not waited for in real time here)
            raise subprocess.TimeoutExpired("volley", timeout or 0)
        return self.code


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def fakes(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Clock:
    FakeProcess.started = []
    FakeProcess.on_create = None
    clock = Clock()
    monkeypatch.setattr(workers.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(workers.time, "monotonic", clock)
    monkeypatch.setattr(workers.time, "sleep", lambda _seconds: None)
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))  # else Supervisor.run sets it in os.environ
    return clock


@pytest.fixture
def supervisor(fakes: Clock) -> tuple[workers.Supervisor, Clock]:
    sup = workers.Supervisor(["app:app"], 1)
    sup._spawn(0)
    return sup, fakes


def crash_and_restart(sup: workers.Supervisor, clock: Clock) -> float:
    """The worker exits with 1; the delay the supervisor waits before starting it again."""
    FakeProcess.started[-1].code = 1
    count = len(FakeProcess.started)
    sup._watch()
    delay = sup.next_start[0] - clock.now
    clock.now += delay
    sup._watch()
    assert len(FakeProcess.started) == count + 1
    return delay


def test_the_restart_delay_grows_while_a_worker_keeps_failing(supervisor: tuple[workers.Supervisor, Clock]) -> None:
    sup, clock = supervisor
    delays = [crash_and_restart(sup, clock) for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_worker_that_ran_well_before_it_died_is_restarted_soon(
        supervisor: tuple[workers.Supervisor, Clock]) -> None:
    """Found in review: the delay never went back down, so a worker that crashed a few times at a deploy and then
    ran for days waited 30 s after its next crash."""
    sup, clock = supervisor
    for _ in range(8):
        crash_and_restart(sup, clock)
    clock.now += workers.STABLE_SECONDS + 1  # runs well for a while
    assert crash_and_restart(sup, clock) == 0.5
    assert crash_and_restart(sup, clock) == 1.0  # and grows again if it keeps failing


# ------------------------------------------------------------------ found by a review (session 31)


def test_a_worker_failing_for_hours_does_not_crash_the_supervisor(
        supervisor: tuple[workers.Supervisor, Clock]) -> None:
    """The delay was ``min(30, 0.5 * 2**count)``: past 1,023 restarts (about 8.5 hours of a worker failing every
    30 s, a dependency down overnight) ``0.5 * 2**count`` raised OverflowError in ``_watch``, and the supervisor
    died with every healthy worker."""
    sup, clock = supervisor
    for _ in range(1100):
        assert crash_and_restart(sup, clock) <= workers.RESTART_DELAY_MAX
    assert len(FakeProcess.started) == 1101


@pytest.mark.parametrize("signalled_at", [1, 2])
def test_a_signal_while_the_workers_start_stops_every_worker(fakes: Clock, signalled_at: int) -> None:
    """SIGTERM while the supervisor was still starting its workers: the handler signalled those started so far,
    and the loop went on to start the rest, which never got SIGTERM: killed at the deadline (45 s), their work
    abandoned, and the supervisor exited 1."""
    sup = workers.Supervisor(["app:app"], 3)

    def signal_arrives(index: int) -> None:
        if index == signalled_at:
            sup._on_signal(signal.SIGTERM, None)

    FakeProcess.on_create = signal_arrives
    assert sup.run() == 0
    assert not any(p.killed for p in FakeProcess.started)
    assert all(p.signals == [signal.SIGTERM] for p in FakeProcess.started)


def test_a_signal_while_a_worker_is_restarted_stops_the_new_worker(
        supervisor: tuple[workers.Supervisor, Clock]) -> None:
    """The same window on a restart: the signal came while ``_watch`` created the replacement, before it was in
    ``processes``; the handler signalled the dead process it replaced, and the new one was killed at the deadline."""
    sup, clock = supervisor
    FakeProcess.started[0].code = 1
    sup._watch()
    clock.now = sup.next_start[0]
    FakeProcess.on_create = lambda index: sup._on_signal(signal.SIGTERM, None) if index == 1 else None
    sup._watch()
    assert sup.stopping
    assert sup._wait_all() == 0
    assert not FakeProcess.started[1].killed and FakeProcess.started[1].signals == [signal.SIGTERM]


UNREACHABLE_APP = """
from volley import Engine

engine = Engine(app_name="unreachable", input_queue="in", queue_config={
    "in": {"value": "review-in", "profile": "confluent",
           "config": {"bootstrap.servers": "127.0.0.1:1", "group.id": "review",
                      "volley.startup.timeout.seconds": 1}}}, metrics_port=None)

@engine.stream_app
def app(message):
    return True
"""


def test_workers_started_before_their_broker_is_up_are_restarted_with_a_delay(tmp_path: Path) -> None:
    """The broker is not up yet (compose, a node reboot): each worker's start-up check failed with a
    ConfigurationError, ``volley run`` exited 2 and ``--workers 2`` stopped every worker for good, instead of
    restarting them with the documented delay until the broker answers. Now a broker that does not answer is
    BrokerUnavailableError: exit 1, restarted."""
    pytest.importorskip("volley_kafka")
    (tmp_path / "unreachable_app.py").write_text(UNREACHABLE_APP)
    env = {**os.environ, "PYTHONPATH": str(tmp_path), "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    single = subprocess.run([sys.executable, "-m", "volley.cli", "run", "unreachable_app:app"], env=env,
                            cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False)
    assert single.returncode == 1 and "volley: broker unavailable: " in single.stderr, single.stderr[-600:]
    supervisor = subprocess.Popen([sys.executable, "-m", "volley.cli", "run", "unreachable_app:app", "--workers", "2"],
                                  env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True, process_group=0)
    deadline = time.monotonic() + 60
    restarts = 0
    lines: list[str] = []
    assert supervisor.stderr is not None
    try:
        for line in supervisor.stderr:
            lines.append(line)
            restarts += "restarting in" in line
            if restarts >= 3 or time.monotonic() > deadline or "configuration error" in line:
                break
    finally:
        if supervisor.poll() is None:
            os.killpg(supervisor.pid, signal.SIGTERM)
        supervisor.wait(60)
        supervisor.stderr.close()
    assert restarts >= 3, "".join(lines[-20:])


def test_a_bad_shutdown_deadline_is_a_configuration_error_not_a_traceback() -> None:
    """``VOLLEY_SHUTDOWN_DEADLINE`` was parsed with ``float()`` when volley.workers was imported: a typo ("45s")
    was a ValueError traceback (exit 1) instead of ``volley: configuration error: ...`` (exit 2)."""
    env = {**os.environ, "VOLLEY_SHUTDOWN_DEADLINE": "45s"}
    done = subprocess.run([sys.executable, "-m", "volley.cli", "run", "nosuchmodule_review:app", "--workers", "2"],
                          env=env, capture_output=True, text=True, timeout=60, check=False)
    assert "Traceback" not in done.stderr, done.stderr[-600:]
    assert done.returncode == 2 and "VOLLEY_SHUTDOWN_DEADLINE" in done.stderr


@pytest.mark.parametrize("count", ["0", "-3"])
def test_a_worker_count_below_one_is_refused(count: str) -> None:
    """``--workers 0`` (or negative: an empty $WORKERS in a template) ran one worker, silently."""
    done = subprocess.run([sys.executable, "-m", "volley.cli", "run", "nosuchmodule_review:app", "--workers", count],
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "--workers must be 1 or more" in done.stderr, done.stderr[-400:]


def test_a_graceful_stop_while_a_worker_waits_to_restart_exits_0(fakes: Clock, monkeypatch: pytest.MonkeyPatch) -> None:
    """The supervisor counted the old crash of a worker waiting out its restart delay in its own exit status: a
    graceful stop then exited 1, as if a worker had failed to stop. It also left PROMETHEUS_MULTIPROC_DIR pointing
    at the directory it had just removed (a library caller's later metrics failed)."""
    monkeypatch.delenv("PROMETHEUS_MULTIPROC_DIR")
    sup = workers.Supervisor(["app:app"], 2)
    rounds = 0

    def watch() -> None:
        nonlocal rounds
        rounds += 1
        if rounds == 1:
            FakeProcess.started[0].code = 1  # worker 0 crashes: it waits 0.5 s to start again
        workers.Supervisor._watch(sup)
        if rounds == 2:
            assert 0 in sup.next_start
            sup._on_signal(signal.SIGTERM, None)

    monkeypatch.setattr(sup, "_watch", watch)
    assert sup.run() == 0
    assert "PROMETHEUS_MULTIPROC_DIR" not in os.environ
