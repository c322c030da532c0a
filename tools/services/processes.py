"""Worker processes for crash tests: start a Volley worker as a subprocess, kill -9 it, stop it gracefully.

Used by the crash tests of every connector (each has its own worker script); the ``worker_processes`` fixture of
the pytest plugin kills whatever a failing test left running.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path

TAIL_CHARS = 3000


class WorkerProcess:
    """One worker command, started (and restarted) as a subprocess writing to ``log``."""

    def __init__(self, args: Sequence[str], log: Path) -> None:
        self.args = list(args)
        self.log = log
        self.process: subprocess.Popen[bytes] | None = None
        self.pids: list[int] = []  # every incarnation, in order

    def start(self) -> None:
        with self.log.open("ab") as log:
            self.process = subprocess.Popen(self.args, stdout=log, stderr=log)
        self.pids.append(self.process.pid)

    def kill(self) -> None:
        """SIGKILL: the crash under test. The worker must still be running (else it died on its own)."""
        assert self.process is not None
        assert self.process.poll() is None, f"worker died on its own:\n{self.tail()}"
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(10)
        self.process = None

    def terminate(self, timeout: float = 60.0) -> int:
        """SIGTERM and wait for the graceful exit; its exit code."""
        assert self.process is not None
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            raise AssertionError(f"worker ignored SIGTERM for {timeout} s:\n{self.tail()}") from None
        finally:
            self.process = None
        return code

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def ensure_alive(self) -> None:
        assert self.alive(), f"worker exited:\n{self.tail()}"

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-TAIL_CHARS:] if self.log.exists() else ""

    def cleanup(self) -> None:
        if self.alive():
            assert self.process is not None
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait(10)
        self.process = None


def wait_for(check: Callable[[], bool], within: float, what: str,
             alive: Callable[[], None] | None = None, every: float = 0.01) -> None:
    """Poll ``check`` until it holds; ``alive`` (when given) raises as soon as a worker the wait depends on died."""
    deadline = time.monotonic() + within
    while not check():
        if alive is not None:
            alive()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        time.sleep(every)
