"""A private redis-server for tests: our own process on a free loopback port, never the system service.

Sharing the machine's Redis (if any) would let test runs see each other's keys and would make a restart test
impossible, so each ``RedisServer`` runs its own process with its own data folder. The binary comes from Debian's
``redis-server`` package, installed on first use when missing (CI machines start bare).

CLI (the server outlives the ``start`` call; ``stop`` finds it again through a state file)::

    python tools/services/redis.py start [--appendonly]   # prints REDIS_HOST=127.0.0.1:NNNN (what RSMQ reads)
    python tools/services/redis.py restart                # same port, same folder (data kept with --appendonly)
    python tools/services/redis.py status
    python tools/services/redis.py stop
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

_HERE = Path(__file__).resolve().parent
if not __package__:
    # Run as a script: make ``services`` importable and stop this folder from shadowing the real ``redis`` package.
    if sys.path and Path(sys.path[0]).resolve() == _HERE:
        sys.path[0] = str(_HERE.parent)
    else:
        sys.path.insert(0, str(_HERE.parent))

from services._proc import (  # noqa: E402
    ServiceError,
    cache_root,
    cmdline_contains,
    file_lock,
    free_port,
    log_tail,
    pid_alive,
    read_state,
    state_dir,
    terminate,
    write_state,
)

__all__ = ["RedisError", "RedisServer", "ensure_redis_server", "ping"]

_apt_updated = False


class RedisError(ServiceError):
    """redis-server could not be installed, started or reached; the message carries the log tail when there is one."""


def _find_redis_server() -> str | None:
    # /usr/bin is where Debian puts it, but a minimal PATH (cron, some CI shells) may lack it.
    return shutil.which("redis-server") or next(
        (str(p) for p in (Path("/usr/bin/redis-server"), Path("/usr/local/bin/redis-server")) if p.exists()), None
    )


def ensure_redis_server(timeout: float = 600.0) -> str:
    """Path to redis-server, installing Debian's package if it is missing.

    ``apt-get update`` runs at most once per process because it is slow and the package lists do not change within
    a test run. The install is done under a lock since parallel test workers would otherwise fight over dpkg's lock.
    Debian's post-install script may try to start the system service; we never use it either way.
    """
    global _apt_updated
    found = _find_redis_server()
    if found:
        return found
    with file_lock(cache_root() / "redis-install.lock"):
        found = _find_redis_server()
        if found:
            return found
        if shutil.which("apt-get") is None or os.geteuid() != 0:
            raise RedisError(
                "redis-server is not installed and cannot be installed here (needs root and apt-get): "
                "run `apt-get install -y redis-server`, or set REDIS_HOST to an existing server"
            )
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        steps = [] if _apt_updated else [["apt-get", "update"]]
        steps.append(["apt-get", "install", "-y", "--no-install-recommends", "redis-server"])
        for step in steps:
            done = subprocess.run(
                step, env=env, stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout, check=False
            )
            if done.returncode != 0:
                output = (done.stdout + done.stderr).decode("utf-8", errors="replace")[-3000:]
                raise RedisError(f"`{' '.join(step)}` failed ({done.returncode}):\n{output}")
            if step[1] == "update":
                _apt_updated = True
        found = _find_redis_server()
        if not found:
            raise RedisError("apt-get installed redis-server but no redis-server binary was found")
        return found


def ping(host: str, port: int, timeout: float = 2.0) -> bool:
    """True once the server answers +PONG; a server still loading its AOF answers -LOADING, which is not ready."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        sock.sendall(b"*1\r\n$4\r\nPING\r\n")
        reply = b""
        while not reply.endswith(b"\r\n"):
            chunk = sock.recv(256)
            if not chunk:
                break
            reply += chunk
    return reply.startswith(b"+PONG")


class RedisServer:
    """One redis-server process on loopback with its own data folder, owned by this object.

    ``restart()`` keeps the port and the data folder so a test can prove that state survives a server restart
    (with ``appendonly=True``; without it, ``save ''`` means nothing is persisted, which keeps the default fast).
    """

    supports_restart = True

    def __init__(
        self,
        *,
        host: str = "127.0.0.1",
        port: int | None = None,
        appendonly: bool = False,
        start_timeout: float = 30.0,
        stop_timeout: float = 10.0,
        extra_args: Sequence[str] = (),
    ) -> None:
        self.host = host
        self._port = port
        self.appendonly = appendonly
        self.start_timeout = start_timeout
        self.stop_timeout = stop_timeout
        self.extra_args = list(extra_args)
        self.pid: int | None = None
        self.work_dir: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: subprocess.Popen[bytes] | None = None

    # -- public API ---------------------------------------------------------------------------------------

    @property
    def port(self) -> int:
        if self._port is None:
            raise RedisError("redis-server not started: call start() first")
        return self._port

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def data_dir(self) -> Path:
        if self.work_dir is None:
            raise RedisError("redis-server not started: it has no data folder yet")
        return self.work_dir / "data"

    @property
    def log_path(self) -> Path:
        if self.work_dir is None:
            raise RedisError("redis-server not started: it has no log yet")
        return self.work_dir / "redis.log"

    def is_running(self) -> bool:
        if self._proc is not None:
            return self._proc.poll() is None
        return self.pid is not None and pid_alive(self.pid) and cmdline_contains(self.pid, "redis-server")

    def ping(self) -> bool:
        try:
            return ping(self.host, self.port)
        except OSError:
            return False

    def start(self) -> RedisServer:
        """Start (or, after a stop through restart(), start again) and return once PING is answered."""
        if self.is_running():
            return self
        binary = ensure_redis_server()
        began = time.monotonic()
        if self.work_dir is None:
            self.work_dir = Path(tempfile.mkdtemp(prefix="volley-redis-"))
            self.data_dir.mkdir()
        try:
            pinned = self._port is not None
            for attempt in range(1 if pinned else 3):
                if self._port is None or attempt > 0:
                    self._port = free_port(self.host)
                if self._launch(binary, retryable=not pinned and attempt < 2):
                    break
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - began
        return self

    def stop(self) -> None:
        """Terminate the server and delete its data; safe to call twice or after a failed start."""
        self._terminate()
        if self.work_dir is not None:
            shutil.rmtree(self.work_dir, ignore_errors=True)
            self.work_dir = None

    def restart(self) -> RedisServer:
        """Stop with SIGTERM (Redis flushes its AOF on the way out) and start again on the same port and folder."""
        if self.work_dir is None:
            raise RedisError("redis-server was never started, so there is nothing to restart")
        self._terminate()
        return self.start()

    def __enter__(self) -> RedisServer:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def to_state(self) -> dict[str, Any]:
        """What ``stop``/``status`` in a later CLI call need to find this server again."""
        return {
            "pid": self.pid,
            "host": self.host,
            "port": self.port,
            "appendonly": self.appendonly,
            "work_dir": str(self.work_dir) if self.work_dir else None,
        }

    @classmethod
    def from_state(cls, state: Mapping[str, Any]) -> RedisServer:
        """Adopt a server started by another process (the detached CLI) so it can be probed or stopped."""
        server = cls(
            host=str(state.get("host", "127.0.0.1")),
            port=int(state["port"]) if state.get("port") else None,
            appendonly=bool(state.get("appendonly")),
        )
        server.pid = int(state["pid"]) if state.get("pid") else None
        server.work_dir = Path(state["work_dir"]) if state.get("work_dir") else None
        return server

    # -- internals -----------------------------------------------------------------------------------------

    def _terminate(self) -> None:
        if self.pid is not None:
            terminate(self.pid, self._proc, self.stop_timeout)
        self.pid = None
        self._proc = None

    def _launch(self, binary: str, *, retryable: bool) -> bool:
        """One start attempt; False means "the port was taken, try another", anything else fatal raises."""
        cmd = [
            binary, "--port", str(self.port), "--bind", self.host, "--dir", str(self.data_dir),
            "--save", "", "--appendonly", "yes" if self.appendonly else "no", "--daemonize", "no",
            "--logfile", "", *self.extra_args,
        ]  # fmt: skip
        with self.log_path.open("ab") as log:
            self._proc = subprocess.Popen(
                cmd,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self.work_dir,
                start_new_session=True,
            )
        self.pid = self._proc.pid
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            code = self._proc.poll()
            if code is not None:
                tail = log_tail(self.log_path, 30)
                self._proc = None
                self.pid = None
                if "Address already in use" in tail and retryable:
                    return False
                raise RedisError(f"redis-server exited with code {code} during start-up; {self.log_path}:\n{tail}")
            if self.ping():
                return True
            time.sleep(0.02)
        raise RedisError(
            f"redis-server did not answer PING within {self.start_timeout:.0f}s; "
            f"{self.log_path}:\n{log_tail(self.log_path, 30)}"
        )


# --------------------------------------------------------------------------------------------------- CLI


def _state_file() -> Path:
    return state_dir() / "redis.json"


def _running_from_state() -> RedisServer | None:
    state = read_state(_state_file())
    if state is None:
        return None
    server = RedisServer.from_state(state)
    return server if server.is_running() else None


def _cli_start(args: argparse.Namespace) -> int:
    existing = _running_from_state()
    if existing is not None:
        print(f"REDIS_HOST={existing.host}:{existing.port}")
        return 0
    server = RedisServer(appendonly=args.appendonly, start_timeout=args.timeout)
    try:
        server.start()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_state(_state_file(), server.to_state())
    print(
        f"started redis-server pid={server.pid} in {server.startup_seconds:.2f}s; log: {server.log_path}",
        file=sys.stderr,
    )
    print(f"REDIS_HOST={server.host}:{server.port}")
    # The server must outlive this process: it was started in its own session and its output goes to a file.
    warnings.simplefilter("ignore", ResourceWarning)
    return 0


def _cli_stop(_: argparse.Namespace) -> int:
    state_file = _state_file()
    state = read_state(state_file)
    if state is None:
        print("Redis: nothing started from the CLI is recorded", file=sys.stderr)
        return 0
    server = RedisServer.from_state(state)
    if server.pid is not None and not server.is_running():
        server.pid = None  # stale: never signal a PID that no longer belongs to our server
    server.stop()
    state_file.unlink(missing_ok=True)
    print("Redis: stopped", file=sys.stderr)
    return 0


def _cli_restart(args: argparse.Namespace) -> int:
    state_file = _state_file()
    state = read_state(state_file)
    if state is None or not state.get("work_dir") or not Path(state["work_dir"]).is_dir():
        print("Redis: nothing to restart (no server started from the CLI of this checkout)", file=sys.stderr)
        return 1
    server = RedisServer.from_state(state)
    server.start_timeout = args.timeout
    if server.pid is not None and not server.is_running():
        server.pid = None  # stale: never signal a PID that no longer belongs to our server
    try:
        server.restart()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_state(state_file, server.to_state())
    print(f"restarted redis-server pid={server.pid}; log: {server.log_path}", file=sys.stderr)
    print(f"REDIS_HOST={server.host}:{server.port}")
    warnings.simplefilter("ignore", ResourceWarning)
    return 0


def _cli_status(_: argparse.Namespace) -> int:
    server = _running_from_state()
    if server is None or not server.ping():
        print("Redis: not running", file=sys.stderr)
        return 1
    print(f"Redis: running pid={server.pid} appendonly={server.appendonly}", file=sys.stderr)
    print(f"REDIS_HOST={server.host}:{server.port}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="redis.py", description="Run a throwaway redis-server for tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a detached server and print REDIS_HOST=host:port")
    start.add_argument("--appendonly", action="store_true", help="persist with an append-only file")
    start.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for PING")
    start.set_defaults(func=_cli_start)
    sub.add_parser("stop", help="stop the CLI-started server and delete its data").set_defaults(func=_cli_stop)
    sub.add_parser("status", help="exit 0 and print REDIS_HOST if it answers").set_defaults(func=_cli_status)
    restart = sub.add_parser("restart", help="stop and start again on the same port and folder")
    restart.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for PING")
    restart.set_defaults(func=_cli_restart)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
