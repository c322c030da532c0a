"""``volley run --workers N``: a small supervisor of N worker processes.

Each worker is a plain ``volley run`` process, so each is its own Kafka
consumer-group member or RSMQ receiver. The supervisor restarts a worker that
dies (with a growing delay, so a worker that cannot start does not spin; the
delay starts over once a worker ran for a minute; a worker whose broker does not
answer at start exits 1 and is restarted too, one with a configuration error
exits 2 and stops them all),
forwards SIGINT/SIGTERM to every worker and waits for their graceful shutdown
within a deadline before killing what is left. On Linux, workers also get
SIGTERM when the supervisor itself dies (``PR_SET_PDEATHSIG``, set by the
worker at start), so a ``kill -9`` of the supervisor leaves no orphans.

For metrics across processes it sets ``PROMETHEUS_MULTIPROC_DIR`` (a fresh
directory, unless already set) and ``VOLLEY_WORKER_INDEX``; the metrics plugin
serves the aggregate from worker 0 only.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from types import FrameType

logger = logging.getLogger("volley.workers")

RESTART_DELAY_MAX = 30.0
STABLE_SECONDS = 60.0  # a worker that ran this long before it exited starts again with the shortest delay
RESTART_DOUBLINGS_MAX = 16  # 0.5 * 2**16 s is far past RESTART_DELAY_MAX: more doublings change nothing
CONFIGURATION_ERROR_EXIT = 2  # what `volley run` exits with on a ConfigurationError: restarting cannot help
SHUTDOWN_DEADLINE_DEFAULT = 45.0


def shutdown_deadline() -> float:
    """``VOLLEY_SHUTDOWN_DEADLINE`` (seconds, default 45): how long the workers get to stop gracefully."""
    from volley.errors import ConfigurationError

    text = os.environ.get("VOLLEY_SHUTDOWN_DEADLINE", "")
    if not text.strip():
        return SHUTDOWN_DEADLINE_DEFAULT
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise ConfigurationError(f"VOLLEY_SHUTDOWN_DEADLINE must be a positive number of seconds, got {text!r}")
    return value


class Supervisor:
    def __init__(self, apps: Sequence[str], workers: int, deadline: float = SHUTDOWN_DEADLINE_DEFAULT) -> None:
        self.apps = list(apps)
        self.workers = workers
        self.deadline = deadline
        self.processes: dict[int, subprocess.Popen[bytes]] = {}
        self.restarts: dict[int, int] = {}
        self.next_start: dict[int, float] = {}
        self.started_at: dict[int, float] = {}
        self.stopping = False
        self.failed = False
        self.own_metrics_dir: str | None = None

    def _spawn(self, index: int) -> None:
        env = dict(os.environ)
        env["VOLLEY_WORKER_INDEX"] = str(index)
        env["VOLLEY_WORKERS"] = str(self.workers)
        env["VOLLEY_LOG_LEVEL"] = logging.getLevelName(logging.getLogger().getEffectiveLevel())
        env["VOLLEY_SUPERVISOR_PID"] = str(os.getpid())  # the worker stops when this process dies
        command = [sys.executable, "-m", "volley.cli", "run", *self.apps]
        # Own process group: a terminal's Ctrl-C reaches the supervisor only, which then stops
        # every worker once, gracefully (a second signal would make a worker exit at once).
        process = subprocess.Popen(command, env=env, process_group=0)
        self.processes[index] = process
        self.started_at[index] = time.monotonic()
        logger.info("worker %d started (pid %d)", index, process.pid)
        if self.stopping and process.poll() is None:
            process.send_signal(signal.SIGTERM)  # the signal came while it was being started: it missed it

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        if self.stopping:
            logger.warning("second %s: killing all workers", signal.Signals(signum).name)
            for process in self.processes.values():
                if process.poll() is None:
                    process.kill()
            return
        logger.info("%s received: stopping %d worker(s)", signal.Signals(signum).name, len(self.processes))
        self.stopping = True
        for process in self.processes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)

    def run(self) -> int:
        if self.workers > 1 and not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
            self.own_metrics_dir = tempfile.mkdtemp(prefix="volley-metrics-")
            os.environ["PROMETHEUS_MULTIPROC_DIR"] = self.own_metrics_dir
        previous = {sig: signal.signal(sig, self._on_signal) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            for index in range(self.workers):
                if self.stopping:  # a signal came while the first ones started
                    break
                self._spawn(index)
            while not self.stopping:
                self._watch()
                time.sleep(0.2)
            return self._wait_all()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            if self.own_metrics_dir:
                shutil.rmtree(self.own_metrics_dir, ignore_errors=True)
                if os.environ.get("PROMETHEUS_MULTIPROC_DIR") == self.own_metrics_dir:
                    del os.environ["PROMETHEUS_MULTIPROC_DIR"]  # not left pointing at the directory just removed

    def _watch(self) -> None:
        now = time.monotonic()
        for index, process in list(self.processes.items()):
            code = process.poll()
            if code is None or self.stopping:
                continue
            if code == CONFIGURATION_ERROR_EXIT:
                logger.error("worker %d exited with a configuration error; not restarting it, stopping all", index)
                self.failed = True
                self._on_signal(signal.SIGTERM, None)
                return
            if index not in self.next_start:
                if now - self.started_at.get(index, now) >= STABLE_SECONDS:
                    self.restarts[index] = 0  # it ran well: this is a new failure, not the same one again
                count = self.restarts.get(index, 0)
                delay = min(RESTART_DELAY_MAX, 0.5 * 2 ** min(count, RESTART_DOUBLINGS_MAX))
                self.next_start[index] = now + delay
                logger.error("worker %d (pid %d) exited with %d; restarting in %.1f s", index, process.pid, code,
                             delay)
            elif now >= self.next_start[index]:
                del self.next_start[index]
                self.restarts[index] = self.restarts.get(index, 0) + 1
                self._spawn(index)

    def _wait_all(self) -> int:
        deadline = time.monotonic() + self.deadline
        worst = 0
        for index, process in self.processes.items():
            if index in self.next_start:  # it had exited and waited to start again: its exit was reported then
                continue
            try:
                code = process.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error("worker %d did not stop within the deadline; killing it", index)
                process.kill()
                code = process.wait()
            if code not in (0, -signal.SIGTERM):
                worst = worst or (code if code > 0 else 1)
        if self.failed:
            return CONFIGURATION_ERROR_EXIT
        return worst


def supervise(apps: Sequence[str], workers: int) -> int:
    from volley.apps import load_app  # imports the engine: only when supervising

    deadline = shutdown_deadline()
    for target in apps:  # fail here, once, on a bad module:app, rather than in N restarting workers
        load_app(target)
    return Supervisor(apps, workers, deadline).run()
