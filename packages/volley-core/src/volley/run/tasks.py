"""The run's asyncio tasks: why one ended before it was asked to, and cancelling one and waiting for it."""

from __future__ import annotations

import asyncio
from typing import Any

from volley.errors import VolleyError


def unexpected_end(app_name: str, name: str, task: asyncio.Task[Any]) -> BaseException | None:
    """Why a task of the run ended before it was asked to: its exception, or its cancellation by someone else."""
    if task.cancelled():
        return VolleyError(f"{app_name}: the {name} task was cancelled by something outside the engine "
                           "(a handler or a library raising CancelledError?); stopping")
    return task.exception()


def failed(task: asyncio.Task[Any]) -> bool:
    """The task ended by raising or by being cancelled (not by returning)."""
    return task.done() and (task.cancelled() or task.exception() is not None)


async def cancel(task: asyncio.Task[Any]) -> None:
    if not task.done():
        task.cancel()
    await asyncio.gather(task, return_exceptions=True)
