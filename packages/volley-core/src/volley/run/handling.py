"""Handling: decode -> call -> interpret -> route, written once for every way a handler runs.

The steps are closures bound once per run (the input's codec, the handler, the router, the retry policy) so
the per-message path pays no attribute lookups. Where a handler runs is the executors' business: inline slices
on the loop and the handler thread both call ``handle`` (``handle_batch`` for batch profiles); async lanes call
``process_async``. Interpreting the result (and routing outputs) is ``routing``'s. Results go
into an ``Outcome`` that settlement applies on the loop.
"""

from __future__ import annotations

import asyncio
import math
import random
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from volley.errors import MessageError
from volley.message import Envelope, MessageContext
from volley.ports import MessageTrace
from volley.queues import ResolvedQueue
from volley.run.app import RunnableApp
from volley.run.retry import RetryPolicy
from volley.run.routing import Router
from volley.run.tokens import FAILED, Group, Outcome, Poison, Token
from volley.run.tracing import Tracing


class Moved:
    """``call_sync(wait=False)``: the call failed and may be retried, which needs a wait; the caller moves the
    message to where waiting is allowed (the handler thread), handing over the first failure."""

    __slots__ = ("error", "message", "trace")

    def __init__(self, error: BaseException, message: Any) -> None:
        self.error = error
        self.message = message  # decoded already
        self.trace: MessageTrace | None = None  # the message's trace, when the run traces (volley.run.tracing)


def redelivered(env: Envelope, limit: int) -> MessageError:
    return MessageError(f"delivered {env.attempt} times (max_deliveries={limit}); giving up on it", env.value)


class Handling:
    """The steps of the message path for one run, each bound once (see the module docstring)."""

    def __init__(self, app: RunnableApp, queue: ResolvedQueue, router: Router, retry: RetryPolicy, *,
                 max_deliveries: int, timed: bool, tracing: Tracing | None = None,
                 poisoned: dict[Poison, BaseException] | None = None) -> None:
        self.timed = timed
        self.is_async = app.is_async
        self.batch_size = queue.batch_size
        context = _contexts(queue.name, app.engine.app_name)
        self.decode = _decoder(queue, max_deliveries, {} if poisoned is None else poisoned)
        self.interpret = router.bind()
        retried = _retrier(app, context, retry)
        self.handle = _handler(app, context, self.decode, self.interpret, retried, timed)
        self.resume = _resumer(self.interpret, retried, timed)
        self.process_async = _async_processor(app, context, retry, self.interpret, timed)
        self.decode_groups = _grouper(self.decode, queue.batch_size)
        if tracing is not None:  # bound once: without a tracer the steps above run unwrapped
            self.handle = tracing.traced_handle(self.handle)
            self.resume = tracing.traced_resume(self.resume)
            self.process_async = tracing.traced_process_async(self.process_async)

    def handle_batch(self, batch: Sequence[Envelope], out: Outcome, abandoned: Callable[[], bool]) -> None:
        """Batch profiles, sync handler: call the handler per group of decoded records, until ``abandoned``."""
        handle = self.handle
        for group, chunk in self.decode_groups(batch, out):
            if abandoned():  # shutdown gave up on this work: the rest is delivered again
                return
            handle(group, out, True, chunk)


def _decoder(queue: ResolvedQueue, max_deliveries: int,
             poisoned: dict[Poison, BaseException]) -> Callable[[Envelope, Outcome], Any]:
    deserialize, validate, fast_validate = queue.fast_deserialize, queue.validate, queue.fast_validate
    fused = queue.fused_decode

    def decode(env: Envelope, out: Outcome) -> Any:
        """The envelope's message, or FAILED once ``out`` has the failure (redelivery, an output its last handling
        made that was refused for itself, deserialize, validate). The queue's fused decode first, when it has one:
        what it refuses is read again by the two steps, which name the stage and the reason."""
        if env.attempt > max_deliveries:
            out.failures.append((env, "redelivery", redelivered(env, max_deliveries)))
            return FAILED
        if poisoned and (refused := poisoned.get((env.source, env.partition, env.position))) is not None:
            out.failures.append((env, "output", refused))  # kept until its dead letter commits (Settlement)
            return FAILED
        if fused is not None:
            try:
                return fused(env.value)
            except Exception:  # noqa: S110 - the two steps below say what is wrong
                pass
        try:
            data = deserialize(env.value)
        except Exception as exc:
            out.failures.append((env, "deserialize", exc))
            return FAILED
        try:
            return fast_validate(data)
        except Exception as exc:
            if fast_validate is validate:
                out.failures.append((env, "validate", exc))
                return FAILED
        try:  # the checked validation says what is wrong
            return validate(data)
        except Exception as exc:
            out.failures.append((env, "validate", exc))
            return FAILED

    return decode


def _contexts(queue_name: str, app_name: str) -> Callable[[Token], MessageContext]:
    def context(token: Token) -> MessageContext:
        first = token if isinstance(token, Envelope) else token.members[0]
        return MessageContext(first, queue_name, app_name)

    return context


UNDECODED: Any = object()


Retried = Callable[[Token, Any, Outcome, BaseException, bool, bool], Any]


def _retrier(app: RunnableApp, context: Callable[[Token], MessageContext], retry: RetryPolicy) -> Retried:
    call, wants_context = app.call, app.wants_context
    should_retry, give_up, wait_blocking = retry.should_retry, retry.give_up, retry.wait_blocking

    def retried(token: Token, message: Any, out: Outcome, error: BaseException, wait: bool, decided: bool) -> Any:
        """After a failed call (the cold path): the retries the policy allows. The handler's result; FAILED once
        ``out`` has the failure (or the input given back); or ``Moved`` when a retry is due but ``wait`` is false
        (the loop must not sleep). ``decided``: the policy already allowed the first retry (it failed inline)."""
        failures = 1
        while True:
            if not decided and not should_retry(token, failures, error):
                give_up(token, failures, error, out)
                return FAILED
            decided = False
            if not wait:
                return Moved(error, message)
            if not wait_blocking(failures):  # stopping: no retry after the wait
                give_up(token, failures, error, out)
                return FAILED
            out.retries += 1
            try:
                return call(message, context(token)) if wants_context else call(message)
            except (Exception, asyncio.CancelledError) as exc:  # the handler's failure, CancelledError included
                error = exc
                failures += 1

    return retried


SAMPLE_ONE_IN = 8
"""Inline calls (``wait`` false: a fast handler on the event loop) are clocked for the step timings about one in
``SAMPLE_ONE_IN``: each independently with probability 1/8 (geometric gaps drawn from a private generator), its
seconds weighted by 8, plus the first call of every outcome, weighted 1, so that an outcome that counts calls has
clocked one. The weighted sums are unbiased estimates of the totals; the count (``Outcome.timed``) is exact. Calls
on the handler thread and batch groups (``wait`` true: slow or blocking handlers, whose call dwarfs the clock) are
clocked every time, weighted 1. Four clock reads and the running totals on every inline call cost about 4 % of a
Kafka message's instructions."""
_GAP_SCALE = 1.0 / math.log(1.0 - 1.0 / SAMPLE_ONE_IN)  # geometric gap: int(log(1 - u) * _GAP_SCALE)


def _handler(app: RunnableApp, context: Callable[[Token], MessageContext], decode: Callable[[Envelope, Outcome], Any],
             interpret: Callable[[Token, Any, Outcome], None], retried: Retried,
             timed: bool) -> Callable[..., Moved | None]:
    call, wants_context = app.call, app.wants_context
    perf = time.perf_counter
    draw, log = random.Random().random, math.log  # not the module's generator: a handler may seed that one
    gap_scale, sampled_weight = _GAP_SCALE, float(SAMPLE_ONE_IN)
    skip = 0  # inline calls to count without clocking them before the next clocked one

    def handle(token: Token, out: Outcome, wait: bool = True, message: Any = UNDECODED) -> Moved | None:
        """Decode (unless ``message`` is given: a batch's group), call the sync handler (with retries), interpret
        the result into ``out``. ``Moved``: a call failed, a retry is due and ``wait`` is false; the caller goes
        on where waiting is allowed (``resume``)."""
        nonlocal skip
        if not timed:
            t0 = 0.0
        elif skip > 0 and out.timed and not wait:
            skip -= 1  # counted, not clocked (SAMPLE_ONE_IN)
            t0 = 0.0
        else:  # clocked: weighted 1 when it had to be, else it stands for SAMPLE_ONE_IN calls
            weight = 1.0 if wait or not out.timed else sampled_weight
            skip = int(log(1.0 - draw()) * gap_scale)
            t0 = perf()  # after the draw: the sampler's own work is no step's
        if message is UNDECODED and (message := decode(token, out)) is FAILED:  # type: ignore[arg-type]
            return None
        if t0:
            t1 = perf()
        try:
            result = call(message, context(token)) if wants_context else call(message)
        except (Exception, asyncio.CancelledError) as exc:
            result = retried(token, message, out, exc, wait, False)
            if result is FAILED or type(result) is Moved:
                return result if type(result) is Moved else None
        if t0:
            t2 = perf()
        interpret(token, result, out)
        out.timed += 1  # (read only when timed)
        if t0:  # the steps' weighted running totals (Outcome.timed)
            t3 = perf()
            out.construct += (t1 - t0) * weight
            out.component += (t2 - t1) * weight
            out.deconstruct += (t3 - t2) * weight
        return None

    return handle


def _resumer(interpret: Callable[[Token, Any, Outcome], None], retried: Retried,
             timed: bool) -> Callable[[Envelope, Outcome, Moved], None]:
    perf = time.perf_counter

    def resume(env: Envelope, out: Outcome, moved: Moved) -> None:
        """Go on with a message whose first call failed inline: its retries (waiting allowed), then interpret.
        Counted in the step timings like any handled message, clocked (weight 1) from its retries on: its decoding
        and first call, inline, were not clocked."""
        t1 = perf() if timed else 0.0
        result = retried(env, moved.message, out, moved.error, True, True)
        if result is FAILED:
            return
        t2 = perf() if timed else 0.0
        interpret(env, result, out)
        if timed:
            out.timed += 1
            out.component += t2 - t1
            out.deconstruct += perf() - t2

    return resume


def _async_processor(app: RunnableApp, context: Callable[[Token], MessageContext], retry: RetryPolicy,
                     interpret: Callable[[Token, Any, Outcome], None],
                     timed: bool) -> Callable[[Token, Any, Outcome], Awaitable[None]]:
    call, wants_context = app.call, app.wants_context
    should_retry, give_up, wait_async = retry.should_retry, retry.give_up, retry.wait
    perf = time.perf_counter

    async def process_async(token: Token, message: Any, out: Outcome) -> None:
        """An async handler's call, with retries, and the interpretation of its result, into ``out`` (a failure
        too, or the input given back). A CancelledError is ours (re-raised) only when this task is being
        cancelled; one the handler raised on its own (it awaited something someone else cancelled) is its
        failure."""
        failures = 0
        started = perf()
        while True:
            try:
                result = await (call(message, context(token)) if wants_context else call(message))
            except asyncio.CancelledError as exc:
                task = asyncio.current_task()
                if task is not None and task.cancelling():
                    raise
                error: BaseException = exc
            except Exception as exc:
                error = exc
            else:
                if timed:  # the call alone: no decoding step here, and interpreting is not timed
                    out.timed += 1
                    out.component += perf() - started
                interpret(token, result, out)
                return
            failures += 1
            if not should_retry(token, failures, error):
                give_up(token, failures, error, out)
                return
            if not await wait_async(failures):
                give_up(token, failures, error, out)
                return
            out.retries += 1

    return process_async


def _grouper(decode: Callable[[Envelope, Outcome], Any],
             batch_size: int | None) -> Callable[[Sequence[Envelope], Outcome], list[tuple[Group, list[Any]]]]:
    def decode_groups(batch: Sequence[Envelope], out: Outcome) -> list[tuple[Group, list[Any]]]:
        """Batch profiles: decode every record (bad ones fail alone) and group the rest by ``batch_size``."""
        good: list[Envelope] = []
        messages: list[Any] = []
        for env in batch:
            message = decode(env, out)
            if message is not FAILED:
                good.append(env)
                messages.append(message)
        size = batch_size or len(good) or 1
        return [(Group(good[i:i + size]), messages[i:i + size]) for i in range(0, len(good), size)]

    return decode_groups
