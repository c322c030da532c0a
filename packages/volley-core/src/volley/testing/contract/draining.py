"""Consuming with deadlines: every call bounded, so that a hanging connector fails a test instead of hanging it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TypeVar

from volley.message import Envelope
from volley.ports import Consumer

__all__ = ["HANG_SLACK_SECONDS", "bounded", "deadline_in", "drain", "drain_until"]

T = TypeVar("T")

HANG_SLACK_SECONDS = 5.0
"""How far past its own ``timeout`` a ``consume`` call may run before the helpers call it a hang."""


def deadline_in(seconds: float) -> float:
    """An absolute deadline on the ``time.monotonic()`` clock, as :func:`drain` takes it."""
    return time.monotonic() + seconds


async def bounded(awaitable: Awaitable[T], seconds: float, what: str) -> T:
    """Await with a hard limit, so that a hanging connector fails the test instead of hanging it."""
    try:
        return await asyncio.wait_for(awaitable, seconds)
    except TimeoutError:
        raise AssertionError(f"{what} did not return within {seconds:.1f} s") from None


async def drain_until(
    consumer: Consumer,
    done: Callable[[Sequence[Envelope]], bool],
    deadline: float,
    *,
    max_messages: int = 100,
    poll_timeout: float = 0.25,
    ack: bool = False,
) -> list[Envelope]:
    """Consume until ``done(received)`` holds or ``deadline`` (``time.monotonic()``) passes; return what came.

    Never fails on its own for missing messages (the caller asserts what it
    expected, with a better message), but it does fail when ``consume``
    returns more than ``max_messages`` or hangs far past its timeout.
    ``ack=True`` acknowledges each batch as it arrives.
    """
    received: list[Envelope] = []
    while not done(received):
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        timeout = min(poll_timeout, remaining)
        batch = await bounded(
            consumer.consume(max_messages, timeout),
            timeout + HANG_SLACK_SECONDS,
            f"consume(max_messages={max_messages}, timeout={timeout:.2f})",
        )
        assert len(batch) <= max_messages, f"consume(max_messages={max_messages}) returned {len(batch)} envelopes"
        if batch:
            received.extend(batch)
            if ack:
                await consumer.ack(batch)
    return received


async def drain(
    consumer: Consumer,
    expected: int,
    deadline: float,
    *,
    max_messages: int = 100,
    poll_timeout: float = 0.25,
    ack: bool = False,
) -> list[Envelope]:
    """Consume until ``expected`` envelopes arrived or ``deadline`` (``time.monotonic()``) passed."""
    return await drain_until(
        consumer, lambda got: len(got) >= expected, deadline, max_messages=max_messages,
        poll_timeout=poll_timeout, ack=ack,
    )
