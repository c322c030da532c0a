"""Fixtures for the RSMQ tests: a real redis-server, a fresh queue name per test, helpers to wait on conditions."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Awaitable, Callable, Iterator
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
