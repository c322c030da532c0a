"""Tracing: a run's tracer (``ports.RunTracer``) follows each input through the message path.

Bound once per run, and only when the Engine names a tracer: then ``Handling`` wraps its steps with the ones
below (``traced_handle``, ``traced_resume``, ``traced_process_async``); without one, nothing here is bound and
the message path has not a single extra branch. An input the tracer has nothing for (``RunTracer.start``
returns None: nothing records and the input carries no context to pass on) goes through the steps as if
nothing traced. The steps themselves stay where they are written once (``handling``, ``routing``,
``settlement``); this module only opens a trace around them, adds the trace's context to the outputs they
produced, and hands the trace of a failed input to settlement, which ends it once it knows the input's fate
(dead-lettered or given back).

Tracing is observability: a tracer that raises (a bug in a span processor or exporter of the user's SDK, a
propagator refusing a header) must not stop the pipeline. The run's tracer is wrapped once in ``GuardedTracer``:
an exception from any of its calls is logged (once per run and kind of call) and counted, and the message goes
on, untraced from that point when its trace could not start.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from volley.message import Envelope, Headers, OutgoingMessage
from volley.ports import MessageTrace, RunTracer
from volley.run.report import RunReport
from volley.run.tokens import Outcome, Token, members_of

logger = logging.getLogger("volley")

_NOT_GIVEN: Any = object()  # handle()'s ``message`` left out: the envelope is decoded there
_NOT_ACTIVE: Any = object()  # activate() raised: nothing to deactivate


class GuardedTracer:
    """A run's tracer whose every call is kept from raising into the message path (see the module docstring).

    One Python call more per tracer call, paid only by runs that trace (a span of an SDK costs far more)."""

    def __init__(self, tracer: RunTracer, app_name: str = "", report: RunReport | None = None) -> None:
        self.tracer = tracer
        self.app_name = app_name
        self.report = report if report is not None else RunReport()  # its tracer_failures count the failures
        self._logged: set[str] = set()

    def failed(self, call: str, exc: Exception) -> None:
        self.report.tracer_failures += 1
        if call not in self._logged:
            self._logged.add(call)
            self.report.add_error(f"tracer {call}: {type(exc).__qualname__}: {exc}")
            logger.error("%s: the tracer's %s raised %s: %s; the message is handled on (further failures of this "
                         "call are not logged)", self.app_name, call, type(exc).__qualname__, exc, exc_info=exc)

    def start(self, members: Sequence[Envelope], batch: bool) -> MessageTrace | None:
        try:
            trace = self.tracer.start(members, batch)
        except Exception as exc:
            self.failed("start", exc)
            return None  # handled untraced
        return None if trace is None else GuardedTrace(trace, self)

    def sent(self, records: Sequence[OutgoingMessage]) -> None:
        try:
            self.tracer.sent(records)
        except Exception as exc:
            self.failed("sent", exc)


class GuardedTrace:
    """One message's trace, its calls guarded like ``GuardedTracer``'s."""

    __slots__ = ("guard", "trace")

    def __init__(self, trace: MessageTrace, guard: GuardedTracer) -> None:
        self.trace = trace
        self.guard = guard

    def activate(self) -> object:
        try:
            return self.trace.activate()
        except Exception as exc:
            self.guard.failed("activate", exc)
            return _NOT_ACTIVE

    def deactivate(self, activation: object) -> None:
        if activation is _NOT_ACTIVE:
            return
        try:
            self.trace.deactivate(activation)
        except Exception as exc:
            self.guard.failed("deactivate", exc)

    def inject(self, headers: Headers | None) -> Headers | None:
        try:
            return self.trace.inject(headers)
        except Exception as exc:
            self.guard.failed("inject", exc)
            return headers  # the output goes without the trace's context

    def retry(self, attempt: int, error: BaseException) -> None:
        try:
            self.trace.retry(attempt, error)
        except Exception as exc:
            self.guard.failed("retry", exc)

    def fail(self, stage: str, error: BaseException) -> None:
        try:
            self.trace.fail(stage, error)
        except Exception as exc:
            self.guard.failed("fail", exc)

    def dead_letter(self, destination: str, headers: Headers) -> None:
        try:
            self.trace.dead_letter(destination, headers)
        except Exception as exc:
            self.guard.failed("dead_letter", exc)

    def end(self) -> None:
        try:
            self.trace.end()
        except Exception as exc:
            self.guard.failed("end", exc)


class Tracing:
    """One run's tracing: the traces being handled, and those of failed inputs waiting for settlement."""

    def __init__(self, tracer: RunTracer, app_name: str = "", report: RunReport | None = None) -> None:
        self.tracer = GuardedTracer(tracer, app_name, report)
        self.live: dict[Token, MessageTrace] = {}  # being handled: retries find their trace here
        self.failed: dict[Token, MessageTrace] = {}  # failed, not yet settled (dead letter or give-back)
        self.closed = False  # settlement is over (shutdown): nothing settles a failure any more

    # ------------------------------------------------------------------ around handling (per message)

    def start(self, token: Token) -> MessageTrace | None:
        if isinstance(token, Envelope):
            return self.tracer.start((token,), False)
        return self.tracer.start(members_of(token), True)

    def finish(self, trace: MessageTrace, token: Token, out: Outcome, failures: int, sizes: list[int]) -> None:
        """After handling ``token`` into ``out``: its new outputs carry the trace's context; a failure keeps the
        trace open for settlement; otherwise it ends."""
        del self.live[token]
        for slot, records in enumerate(out.outs):
            size = sizes[slot]
            if len(records) > size:
                inject = trace.inject
                for index in range(size, len(records)):
                    record = records[index]
                    record.headers = inject(record.headers)
        if len(out.failures) == failures:
            trace.end()
            return
        for failed, stage, error in out.failures[failures:]:
            trace.fail(stage, error)
            if not self.closed:
                self.failed[failed] = trace
        if self.closed:  # a call that outlived the shutdown: nothing will settle its input, so it ends here
            trace.end()

    def close(self) -> None:
        """Settlement is over (shutdown): the traces of failures still waiting for it end now, later ones as they
        happen (their inputs come again)."""
        self.closed = True
        failed, self.failed = self.failed, {}
        for trace in {id(trace): trace for trace in failed.values()}.values():
            trace.end()

    def traced_handle(self, handle: Callable[..., Any]) -> Callable[..., Any]:
        """``Handling.handle`` inside a trace: decode, call (with retries), interpret."""
        tracer_start, finish, live = self.tracer.start, self.finish, self.live

        def handle_traced(token: Token, out: Outcome, wait: bool = True, message: Any = _NOT_GIVEN) -> Any:
            trace = (tracer_start((token,), False) if isinstance(token, Envelope)
                     else tracer_start(token.members, True))
            if trace is None:  # nothing to trace for this input
                return handle(token, out, wait) if message is _NOT_GIVEN else handle(token, out, wait, message)
            live[token] = trace
            failures = len(out.failures)
            sizes = list(map(len, out.outs))
            activation = trace.activate()
            try:
                moved = handle(token, out, wait) if message is _NOT_GIVEN else handle(token, out, wait, message)
            except BaseException as exc:
                live.pop(token, None)
                trace.fail("handler", exc)
                trace.end()
                raise
            finally:
                trace.deactivate(activation)
            if moved is not None:  # the call goes on elsewhere (resume): so does its trace
                moved.trace = trace
                return moved
            finish(trace, token, out, failures, sizes)
            return None

        return handle_traced

    def traced_resume(self, resume: Callable[[Envelope, Outcome, Any], None]) -> Callable[[Envelope, Outcome, Any],
                                                                                            None]:
        """``Handling.resume`` inside the trace that the inline attempt opened."""
        finish, live = self.finish, self.live

        def resume_traced(env: Envelope, out: Outcome, moved: Any) -> None:
            trace: MessageTrace | None = moved.trace if moved.trace is not None else self.start(env)
            if trace is None:
                resume(env, out, moved)
                return
            live[env] = trace
            failures = len(out.failures)
            sizes = list(map(len, out.outs))
            activation = trace.activate()
            try:
                resume(env, out, moved)
            finally:
                trace.deactivate(activation)
            finish(trace, env, out, failures, sizes)

        return resume_traced

    def traced_process_async(self, process: Callable[[Token, Any, Outcome], Awaitable[None]]
                             ) -> Callable[[Token, Any, Outcome], Awaitable[None]]:
        """``Handling.process_async`` (call with retries, interpret) inside a trace, for async handlers."""
        start, finish, live = self.start, self.finish, self.live

        async def process_traced(token: Token, message: Any, out: Outcome) -> None:
            trace = start(token)
            if trace is None:
                await process(token, message, out)
                return
            live[token] = trace
            failures = len(out.failures)
            sizes = list(map(len, out.outs))
            activation = trace.activate()
            try:
                await process(token, message, out)
            except BaseException as exc:  # cancelled (shutdown, or the handler's own doing): the trace ends here
                live.pop(token, None)
                trace.fail("handler", exc)
                trace.end()
                raise
            finally:
                trace.deactivate(activation)
            finish(trace, token, out, failures, sizes)

        return process_traced

    # ------------------------------------------------------------------ cold paths

    def retried(self, token: Token, attempt: int, error: BaseException) -> None:
        """The retry policy allowed retry ``attempt`` of ``token``'s call (an event on its trace)."""
        trace = self.live.get(token)
        if trace is not None:
            trace.retry(attempt, error)

    def _settled_trace(self, token: Token, stage: str, error: BaseException) -> MessageTrace | None:
        """The failed input's trace, or (it failed before handling, or after its trace ended) a new one; None when
        the tracer has nothing for it."""
        trace = self.failed.pop(token, None)
        if trace is None:
            trace = self.start(token)
            if trace is not None:
                trace.fail(stage, error)
        return trace

    def dead_letter(self, token: Token, stage: str, error: BaseException, destination: str,
                    letters: Sequence[OutgoingMessage]) -> None:
        """``token`` failed and goes to the DLQ: each letter carries its trace's context; the trace ends."""
        trace = self._settled_trace(token, stage, error)
        if trace is None:
            return
        for letter in letters:
            if letter.headers is None:
                letter.headers = {}
            trace.dead_letter(destination, letter.headers)
        trace.end()

    def given_back(self, token: Token, stage: str, error: BaseException) -> None:
        """``token`` failed and there is no DLQ: its trace ends, with the failure."""
        trace = self._settled_trace(token, stage, error)
        if trace is not None:
            trace.end()

    def sent(self, records: Sequence[OutgoingMessage]) -> None:
        self.tracer.sent(records)
