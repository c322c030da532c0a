"""Fixtures for the RSMQ tests: a real redis-server, a fresh queue name per test, helpers to wait on conditions."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis


@pytest.fixture
def rsmq_config(redis_server: Any) -> dict[str, Any]:
    """The connection part of an RSMQ queue's ``config``, pointing at the test server."""
    return {"host": redis_server.host, "port": redis_server.port}


@pytest.fixture
def qname() -> str:
    """A queue name no other test uses (tests share one server)."""
    return f"t-{uuid.uuid4().hex[:12]}"


@pytest.fixture
def raw_redis(redis_server: Any) -> Iterator[redis.Redis]:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    yield client
    client.close()


async def _eventually(check: Callable[[], Awaitable[bool]], within: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + within
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        await asyncio.sleep(0.02)


@pytest.fixture
def eventually() -> Callable[..., Awaitable[None]]:
    """``await eventually(async_check, timeout, what)``: poll until true; fail after the deadline."""
    return _eventually


class PrivateRedis:
    """A redis-server of one test's own, with appendonly persistence, to stop and start again at will.

    ``services.redis.RedisServer`` only restarts in one step; outage tests need the server to stay down
    until the client under test has noticed.
    """

    def __init__(self, directory: Path) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            self.port: int = sock.getsockname()[1]
        self.host = "127.0.0.1"
        self.directory = directory
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from services.redis import ensure_redis_server

        self.process = subprocess.Popen(
            [ensure_redis_server(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "yes", "--appendfsync", "everysec", "--dir", str(self.directory)],
            stdout=subprocess.DEVNULL)
        client = redis.Redis(host=self.host, port=self.port)
        deadline = time.monotonic() + 10
        try:
            while True:
                try:
                    client.ping()
                    return
                except redis.BusyLoadingError:
                    pass
                except redis.ConnectionError:
                    if self.process.poll() is not None:
                        raise RuntimeError("redis-server exited at start") from None
                if time.monotonic() > deadline:
                    raise RuntimeError("redis-server did not answer within 10 s")
                time.sleep(0.02)
        finally:
            client.close()

    def stop(self) -> None:
        """SIGTERM: Redis writes its append-only file and exits, as in an orderly restart."""
        if self.process is not None:
            self.process.terminate()
            self.process.wait(30)
            self.process = None

    def restart(self) -> None:
        self.stop()
        self.start()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    server = PrivateRedis(tmp_path)
    server.start()
    yield server
    server.stop()
