"""Process, port and state-file helpers shared by the Kafka and Redis launchers.

Both launchers start a server in its own process group so that stopping it can never signal the test runner, and
both must be able to stop a server started by an earlier, already-exited CLI call; the helpers therefore work from
a PID alone and only use a ``Popen`` object, when there is one, to reap the child promptly.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any


class ServiceError(RuntimeError):
    """A test service could not be provisioned, started or reached; the message says what to do about it."""


def cache_root() -> Path:
    """Downloads live outside the repository so every checkout and CI clone of the same machine reuses them."""
    override = os.environ.get("VOLLEY_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "volley"


def checkout_root() -> Path:
    """The repository this copy of the tooling belongs to (``tools/services/`` lives two levels below it)."""
    return Path(__file__).resolve().parents[2]


def checkout_key(root: Path | None = None) -> str:
    """A short, stable, per-checkout name: the folder's name for humans plus a hash of its resolved path.

    Two worktrees (or clones) of the same repository have different paths, so they get different keys even when
    their folders share a name.
    """
    resolved = (root or checkout_root()).resolve()
    digest = hashlib.sha256(str(resolved).encode("utf-8", errors="surrogateescape")).hexdigest()[:12]
    name = "".join(c if c.isalnum() or c in "-_." else "_" for c in resolved.name)[:40] or "root"
    return f"{name}-{digest}"


def state_dir(root: Path | None = None) -> Path:
    """Detached CLI-started servers are found again through files here, so ``stop`` works from a new shell.

    The folder is keyed by checkout: every checkout on the machine shares the download cache, but ``start`` in one
    must never adopt (and ``stop`` must never kill) a server another checkout started. ``VOLLEY_STATE_DIR`` names
    the folder explicitly, e.g. to share one broker between checkouts on purpose.
    """
    override = os.environ.get("VOLLEY_STATE_DIR")
    if override:
        return Path(override).expanduser()
    return cache_root() / "run" / checkout_key(root)


def free_port(host: str = "127.0.0.1") -> int:
    """Ask the kernel for an unused port; a small race remains, which the launchers cover by retrying on bind errors."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.contextmanager
def file_lock(path: Path) -> Iterator[None]:
    """Serialise provisioning across processes (parallel test workers, two shells) that share one cache."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a+") as handle:
        fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


def log_tail(path: Path, lines: int = 60) -> str:
    """Start-up failures are only diagnosable from the server's own log, so errors quote its end."""
    try:
        with path.open("rb") as handle:
            handle.seek(0, os.SEEK_END)
            size = handle.tell()
            handle.seek(max(0, size - 64 * 1024))
            text = handle.read().decode("utf-8", errors="replace")
    except OSError as exc:
        return f"<no log at {path}: {exc}>"
    tail = text.splitlines()[-lines:]
    return "\n".join(tail) if tail else "<log is empty>"


def _reap(pid: int) -> None:
    """A dead child stays a zombie (and looks alive to kill(pid, 0)) until its parent waits for it."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)


def pid_alive(pid: int) -> bool:
    """Alive means running, not a zombie: an orphan may never be reaped where PID 1 is not an init system."""
    _reap(pid)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True
    # The state letter follows the parenthesised command name, which may itself contain spaces or parentheses.
    state = stat.rsplit(")", 1)[-1].split()[0]
    return state not in {"Z", "X"}


def cmdline_contains(pid: int, needle: str) -> bool:
    """Guard against signalling an unrelated process that inherited a stale PID from a state file."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return False
    return needle.encode() in raw


def terminate(pid: int, proc: subprocess.Popen[bytes] | None = None, timeout: float = 20.0) -> None:
    """SIGTERM lets the server flush (Redis writes its AOF); SIGKILL after ``timeout`` bounds a hung shutdown.

    The whole process group is signalled because the server was started as a session leader, which keeps any
    helper processes it forks from outliving it.
    """
    alive = proc.poll() is None if proc is not None else pid_alive(pid)
    if not alive:
        return
    _signal_group(pid, signal.SIGTERM)
    if _wait_gone(pid, proc, timeout):
        return
    _signal_group(pid, signal.SIGKILL)
    if not _wait_gone(pid, proc, 10.0):
        raise ServiceError(f"process {pid} survived SIGKILL")


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)
    except PermissionError:
        os.kill(pid, sig)


def _wait_child(proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if proc is None:
        return False
    try:
        proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        return False
    return True


def _wait_gone(pid: int, proc: subprocess.Popen[bytes] | None, timeout: float) -> bool:
    if proc is not None:
        return _wait_child(proc, timeout)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not pid_alive(pid):
            return True
        time.sleep(0.05)
    return not pid_alive(pid)


def write_state(path: Path, data: dict[str, Any]) -> None:
    """Write atomically so a concurrent ``status`` never reads half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    with os.fdopen(fd, "w") as handle:
        json.dump(data, handle, indent=2, sort_keys=True)
        handle.write("\n")
    Path(tmp).replace(path)


def read_state(path: Path) -> dict[str, Any] | None:
    """A missing or unreadable state file simply means nothing was started from the CLI."""
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
