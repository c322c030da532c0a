"""Handling: decode -> call -> interpret -> route, written once for every way a handler runs.

The steps are closures bound once per run (the input's codec, the handler, the router, the retry policy) so
the per-message path pays no attribute lookups. Where a handler runs is the executors' business: inline slices
on the loop and the handler thread both call ``handle_one`` / ``handle_batch``; async lanes call ``call_async``
and ``interpret``. Results go into an ``Outcome`` that settlement applies on the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any

from volley.errors import MessageError
from volley.message import Envelope, MessageContext
from volley.queues import ResolvedQueue
from volley.run.retry import RetryPolicy
from volley.run.routing import Router
from volley.run.tokens import FAILED, Group, Outcome, Token

if TYPE_CHECKING:
    from volley.engine import StreamApp

Fail = Callable[[Token, str, BaseException], None]
SyncCall = Callable[..., Any]
OneHandler = Callable[..., "Moved | None"]


class Moved:
    """``call_sync(wait=False)``: the call failed and may be retried, which needs a wait; the caller moves the
    message to where waiting is allowed (the handler thread), handing over the first failure."""

    __slots__ = ("error",)

    def __init__(self, error: BaseException) -> None:
        self.error = error


def redelivered(env: Envelope, limit: int) -> MessageError:
    return MessageError(f"delivered {env.attempt} times (max_deliveries={limit}); giving up on it", env.value)


class Handling:
    """The steps of the message path for one run, each bound once (see the module docstring)."""

    def __init__(self, app: StreamApp, queue: ResolvedQueue, router: Router, retry: RetryPolicy, *,
                 max_deliveries: int, timed: bool) -> None:
        self.timed = timed
        self.is_async = app.is_async
        self.batch_size = queue.batch_size
        context = _contexts(queue.name, app.engine.app_name)
        self.decode = _decoder(queue, max_deliveries)
        self.interpret = _interpreter(router)
        self.call_sync = _sync_caller(app, context, retry)
        self.call_async = _async_caller(app, context, retry)
        self.handle_one = _one_handler(self.decode, self.call_sync, self.interpret, timed)
        self.decode_groups = _grouper(self.decode, queue.batch_size)
        self.handle_batch = _batch_handler(self.decode_groups, self.call_sync, self.interpret, timed)


def _decoder(queue: ResolvedQueue, max_deliveries: int) -> Callable[[Envelope, Fail], Any]:
    deserialize, validate, fast_validate = queue.fast_deserialize, queue.validate, queue.fast_validate

    def decode(env: Envelope, fail: Fail) -> Any:
        """The envelope's message, or FAILED once ``fail`` was told why (redelivery, deserialize, validate)."""
        if env.attempt > max_deliveries:
            fail(env, "redelivery", redelivered(env, max_deliveries))
            return FAILED
        try:
            data = deserialize(env.value)
        except Exception as exc:
            fail(env, "deserialize", exc)
            return FAILED
        try:
            return fast_validate(data)
        except Exception as exc:
            if fast_validate is validate:
                fail(env, "validate", exc)
                return FAILED
        try:  # the checked validation says what is wrong
            return validate(data)
        except Exception as exc:
            fail(env, "validate", exc)
            return FAILED

    return decode


def _contexts(queue_name: str, app_name: str) -> Callable[[Token], MessageContext]:
    def context(token: Token) -> MessageContext:
        first = token if type(token) is Envelope else token.members[0]  # type: ignore[union-attr]
        return MessageContext(first, queue_name, app_name)

    return context


def _interpreter(router: Router) -> Callable[[Token, Any, Outcome], None]:
    route = router.route

    def interpret(token: Token, result: Any, out: Outcome) -> None:
        if result is True or result is None:
            out.acks.append(token)
        elif result is False:
            out.nacks.append(token)
        else:
            route(token, result, out)

    return interpret


def _sync_caller(app: StreamApp, context: Callable[[Token], MessageContext], retry: RetryPolicy) -> SyncCall:
    call, wants_context = app.call, app.wants_context
    should_retry, wait_blocking = retry.should_retry, retry.wait_blocking

    def call_sync(token: Token, message: Any, out: Outcome, previous: BaseException | None = None,
                  wait: bool = True) -> Any:
        """The handler's result, with retries; FAILED once ``out`` has the failure; or ``Moved`` when the call
        failed, may be retried, and ``wait`` is false (the loop must not sleep). A CancelledError the handler
        raises is its failure like any other."""
        failures = 0 if previous is None else 1
        error = previous
        while True:
            if error is None:
                try:
                    return call(message, context(token)) if wants_context else call(message)
                except (Exception, asyncio.CancelledError) as exc:
                    error = exc
                failures += 1
                if not should_retry(token, failures, error):
                    out.failures.append((token, "handler", error))
                    return FAILED
                if not wait:
                    return Moved(error)
            out.retries += 1
            if not wait_blocking(failures):  # stopping: no retry after the wait
                out.failures.append((token, "handler", error))
                return FAILED
            error = None

    return call_sync


def _async_caller(app: StreamApp, context: Callable[[Token], MessageContext],
                  retry: RetryPolicy) -> Callable[[Token, Any, Outcome], Awaitable[Any]]:
    call, wants_context = app.call, app.wants_context
    should_retry, wait_async = retry.should_retry, retry.wait

    async def call_async(token: Token, message: Any, out: Outcome) -> Any:
        """The same for an async handler. A CancelledError is ours (re-raised) only when this task is being
        cancelled; one the handler raised on its own (it awaited something cancelled) is its failure."""
        failures = 0
        while True:
            try:
                return await (call(message, context(token)) if wants_context else call(message))
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                error: BaseException = exc
            except Exception as exc:
                error = exc
            failures += 1
            if not should_retry(token, failures, error):
                out.failures.append((token, "handler", error))
                return FAILED
            out.retries += 1
            if not await wait_async(failures):
                out.failures.append((token, "handler", error))
                return FAILED

    return call_async


def _one_handler(decode: Callable[[Envelope, Fail], Any], call_sync: SyncCall,
                 interpret: Callable[[Token, Any, Outcome], None], timed: bool) -> OneHandler:
    perf = time.perf_counter

    def handle_one(env: Envelope, out: Outcome, previous: BaseException | None = None,
                   wait: bool = True) -> Moved | None:
        """Decode, call, interpret one message into ``out``; ``Moved`` when it must go on elsewhere."""
        if timed:
            t0 = perf()
        message = decode(env, out.failure)
        if message is FAILED:
            return None
        if timed:
            t1 = perf()
        result = call_sync(env, message, out, previous, wait)
        if result is FAILED:
            return None
        if type(result) is Moved:
            return result
        if timed:
            t2 = perf()
        interpret(env, result, out)
        if timed:
            t3 = perf()
            out.construct += t1 - t0
            out.component.append(t2 - t1)
            out.deconstruct += t3 - t2
            out.cycle.append(t3 - t0)
        return None

    return handle_one


def _grouper(decode: Callable[[Envelope, Fail], Any],
             batch_size: int | None) -> Callable[[Sequence[Envelope], Fail], list[tuple[Group, list[Any]]]]:
    def decode_groups(batch: Sequence[Envelope], fail: Fail) -> list[tuple[Group, list[Any]]]:
        """Batch profiles: decode every record (bad ones fail alone) and group the rest by ``batch_size``."""
        good: list[Envelope] = []
        messages: list[Any] = []
        for env in batch:
            message = decode(env, fail)
            if message is not FAILED:
                good.append(env)
                messages.append(message)
        size = batch_size or len(good) or 1
        return [(Group(good[i:i + size]), messages[i:i + size]) for i in range(0, len(good), size)]

    return decode_groups


def _batch_handler(decode_groups: Callable[[Sequence[Envelope], Fail], list[tuple[Group, list[Any]]]],
                   call_sync: SyncCall, interpret: Callable[[Token, Any, Outcome], None],
                   timed: bool) -> Callable[[Sequence[Envelope], Outcome], None]:
    perf = time.perf_counter

    def handle_batch(batch: Sequence[Envelope], out: Outcome) -> None:
        """Batch profiles, sync handler: call the handler per group of decoded records."""
        for group, chunk in decode_groups(batch, out.failure):
            started = perf()
            result = call_sync(group, chunk, out)
            if result is not FAILED:
                if timed:
                    out.component.append(perf() - started)
                interpret(group, result, out)

    return handle_batch
