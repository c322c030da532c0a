"""What flows between the steps of a run: the settlement tokens and the outcome of handling some messages.

A token is what an output (or a dead letter) carries back in its delivery report, so that settlement knows
which input it belongs to: the input's ``Envelope`` itself (the common case, no allocation), a ``Group`` (a
batch handled as one), or a ``DeadLetter`` (the records of failed inputs on their way to the DLQ).
``pending`` counts unconfirmed records; -1 marks a token that is settled already (given back, or dropped with
an aborted transaction), whose late reports are ignored.
"""

from __future__ import annotations

from volley.errors import MessageError
from volley.message import Envelope, OutgoingMessage


class Group:
    """A batch handled as one (batch profiles): all its members settle together."""

    __slots__ = ("members", "pending")

    def __init__(self, members: list[Envelope]) -> None:
        self.members = members
        self.pending = 0


class DeadLetter:
    """The dead letters of one failed token: its inputs settle (as dead-lettered) once every letter is confirmed."""

    __slots__ = ("failed", "members", "pending", "reason", "stage")

    def __init__(self, failed: Envelope | Group, stage: str, reason: str) -> None:
        self.failed = failed
        self.members = members_of(failed)
        self.stage = stage
        self.reason = reason
        self.pending = len(self.members)


Token = Envelope | Group
Poison = tuple[str, int | None, object]
"""An input by where it is (source, partition, position): exactly-once, one whose output was refused for itself;
the transaction aborted, and when the input comes again it goes to the DLQ at stage ``output`` unhandled."""
AnyToken = Envelope | Group | DeadLetter


class Failed:
    """The marker returned where a step failed and has already reported why (``FAILED``)."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "FAILED"


FAILED = Failed()


class Outcome:
    """What handling some messages produced, applied by settlement on the event loop.

    ``handled`` counts the inputs it covers (for the consumed metric); the time its messages spent in each step
    (``timed``, ``construct``, ``component``, ``deconstruct``) is added up only when an observer is installed;
    ``slowest`` and ``slow_calls`` serve the sync executor's calibration.
    ``generation`` is settlement's when the work began: an aborted transaction moves settlement's on, and an
    outcome of work it gave up (still running when it aborted) then settles nothing.
    """

    __slots__ = ("abandoned", "acks", "component", "construct", "deconstruct", "failures", "generation", "handled",
                 "nacks", "outs", "retries", "slow_calls", "slowest", "timed")

    def __init__(self, slots: int, handled: int = 0, generation: int = 0) -> None:
        self.handled = handled
        self.generation = generation
        self.abandoned = 0  # skipped: their partition was being revoked
        self.slowest = 0.0
        self.slow_calls = 0
        self.acks: list[Token] = []
        self.nacks: list[Token] = []
        self.failures: list[tuple[Token, str, BaseException]] = []
        self.outs: list[list[OutgoingMessage]] = [[] for _ in range(slots)]
        self.retries = 0
        # Only when an observer is installed: how many calls were counted for the step timings (``timed``, exact),
        # and the seconds per step in total, added up as each clocked call ends (inline calls are sampled and
        # weighted: handling.SAMPLE_ONE_IN). Running totals keep no float, tuple or list alive per message.
        self.timed = 0
        self.construct = 0.0  # decoding
        self.component = 0.0  # the handler call
        self.deconstruct = 0.0  # interpreting the result (encoding the outputs)

    def absorb(self, later: Outcome) -> None:
        """Take ``later`` (work of the same generation that came after this one) in: applying the two as one is
        applying them in turn, at the cost of one."""
        self.handled += later.handled
        self.abandoned += later.abandoned
        self.retries += later.retries
        self.slowest, self.slow_calls = max(self.slowest, later.slowest), max(self.slow_calls, later.slow_calls)
        self.acks += later.acks
        self.nacks += later.nacks
        self.failures += later.failures
        for mine, theirs in zip(self.outs, later.outs, strict=True):
            mine.extend(theirs)
        self.timed += later.timed
        self.construct += later.construct
        self.component += later.component
        self.deconstruct += later.deconstruct

    def failure(self, token: Token, stage: str, exc: BaseException) -> None:
        self.failures.append((token, stage, exc))


def is_revoked(env: Envelope, revoked: set[tuple[str, int]]) -> bool:
    """Whether ``env``'s partition is being taken away (its queued work is dropped, not handled)."""
    return (env.source, env.partition) in revoked


def members_of(token: AnyToken) -> list[Envelope]:
    return [token] if isinstance(token, Envelope) else token.members


def any_revoked(token: AnyToken, revoked: set[tuple[str, int]]) -> bool:
    """Whether any input of ``token`` belongs to a partition being taken away."""
    return any((e.source, e.partition) in revoked for e in members_of(token))


def describe(token: AnyToken) -> str:
    """Where to find the input(s) of a token, for logs and errors."""
    if isinstance(token, Envelope):
        return token.describe()
    members = members_of(token)
    if len(members) == 1:
        return members[0].describe()
    return f"batch of {len(members)} ({members[0].describe()} .. {members[-1].describe()})"


MAX_REASON = 4000
"""The most characters of a reason kept (a dead letter's ``volley-error-reason`` header, log lines): the errors
of a large invalid input (Pydantic lists every one) must not make its dead letter too large for the DLQ."""


def reason_of(exc: BaseException) -> str:
    """A one-line reason of at most about ``MAX_REASON`` characters; never raises, even for an exception whose
    ``__str__`` does."""
    try:
        if isinstance(exc, MessageError):
            text = str(exc.reason)
        else:
            text = str(exc)
            name = type(exc).__name__
            text = f"{name}: {text}" if text else name
    except Exception:
        text = f"{type(exc).__name__}: <the exception's str() raised>"
    if len(text) > MAX_REASON:
        text = f"{text[:MAX_REASON]}... ({len(text) - MAX_REASON} more characters)"
    return text
