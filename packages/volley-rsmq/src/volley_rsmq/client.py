"""Batched RSMQ operations on one redis-py client: the only module that talks to Redis.

Every method blocks and is meant to run on a worker thread, never on the event
loop. Errors are redis-py's own (``redis.ConnectionError``,
``redis.TimeoutError``, ``redis.ResponseError``); callers decide whether to
retry. A restarted server forgets loaded scripts; ``_evalsha`` loads them
again transparently.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import redis
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError
from redis.retry import Retry
from rsmq import RedisSMQ  # type: ignore[import-untyped]
from rsmq.cmd.exceptions import QueueAlreadyExists  # type: ignore[import-untyped]

from volley_rsmq import scripts
from volley_rsmq.settings import RsmqSettings

RETRIABLE_ERRORS: tuple[type[Exception], ...] = (redis.ConnectionError, redis.TimeoutError)
"""Errors after which the same call may succeed later (server restarting, network blip)."""

_TRANSIENT_REPLY = re.compile(
    r"(?:^|caused error: )(?:READONLY|OOM|BUSY|LOADING|MASTERDOWN|TRYAGAIN|NOREPLICAS|CLUSTERDOWN|MISCONF)\b")
_TRANSIENT_CLASSES: tuple[type[Exception], ...] = (
    *RETRIABLE_ERRORS, redis.exceptions.ReadOnlyError, redis.exceptions.OutOfMemoryError)


def is_transient(exc: BaseException) -> bool:
    """Whether the same call may succeed later: the server was unreachable, or answered an error about its state.

    Besides connection trouble, these are the error replies of a server that refuses for a while rather than
    for good: READONLY (a replica, after a failover), OOM (full until memory is freed), BUSY (a script runs),
    LOADING, MASTERDOWN, TRYAGAIN, NOREPLICAS, CLUSTERDOWN and MISCONF (cannot persist). A key of the wrong type
    or a bad argument is not transient.
    """
    if isinstance(exc, _TRANSIENT_CLASSES):
        return True
    # redis-py maps only some codes to classes, and keeps the code in the message of the others (after
    # "Command # n (...) of pipeline caused error: " inside a pipeline).
    return isinstance(exc, redis.ResponseError) and _TRANSIENT_REPLY.search(str(exc)) is not None

_SUFFIX_CHARS = string.ascii_letters + string.digits
SUFFIX_LENGTH = 22  # RSMQ ids end in 22 random characters


class _Script:
    __slots__ = ("sha", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self.sha = hashlib.sha1(source.encode(), usedforsecurity=False).hexdigest()


_RECEIVE = _Script(scripts.RECEIVE)
_CHANGE_VISIBILITY = _Script(scripts.CHANGE_VISIBILITY)
_SEND = _Script(scripts.SEND)
_DEPTH = _Script(scripts.DEPTH)


class Received(NamedTuple):
    """One received message: RSMQ's id, body, receive count, first-receive time (ms) and last recorded error."""

    id: str
    body: bytes
    rc: int
    first_receive_ms: int
    last_error: bytes | None


@dataclass(frozen=True, slots=True)
class ReceiveResult:
    messages: list[Received]
    vt_ms: int
    remaining: int  # messages left in the queue (visible or not) after this receive
    visible: int = 0  # of which visible, waiting to be received
    queue_missing: bool = False


def random_suffix() -> str:
    return "".join(secrets.choice(_SUFFIX_CHARS) for _ in range(SUFFIX_LENGTH))


def sent_time(message_id: str) -> float | None:
    """When a message was sent, in epoch seconds, read from its id (base-36 microseconds before the suffix)."""
    try:
        return int(message_id[:-SUFFIX_LENGTH], 36) / 1e6
    except ValueError:
        return None


class RsmqClient:
    """RSMQ queues in one namespace of one Redis server."""

    def __init__(self, settings: RsmqSettings) -> None:
        self.settings = settings
        kwargs = settings.redis_kwargs()
        # One immediate retry on a fresh connection absorbs a pooled socket that a server restart closed;
        # anything longer is the callers' backoff, which they can abandon on shutdown.
        kwargs.setdefault("retry", Retry(NoBackoff(), 1))
        self.redis: redis.Redis = redis.Redis(**kwargs)
        self._ns = settings.namespace

    # ------------------------------------------------------------------ keys

    def keys(self, qname: str) -> tuple[str, str, str]:
        """The queue's sorted set, its hash, and Volley's error hash."""
        base = f"{self._ns}:{qname}"
        return base, base + ":Q", base + ":volley:errors"

    @property
    def queues_key(self) -> str:
        return f"{self._ns}:QUEUES"

    def realtime_channel(self, qname: str) -> str:
        return f"{self._ns}:rt:{qname}"

    # ------------------------------------------------------------------ plumbing

    def _evalsha(self, script: _Script, keys: Sequence[str], args: Sequence[Any]) -> Any:
        try:
            return self.redis.evalsha(script.sha, len(keys), *keys, *args)
        except NoScriptError:
            self.redis.script_load(script.source)
            return self.redis.evalsha(script.sha, len(keys), *keys, *args)

    def ping(self) -> None:
        self.redis.ping()

    def close(self) -> None:
        self.redis.close()

    # ------------------------------------------------------------------ queues

    def create_queue(self, qname: str) -> bool:
        """Create the queue with PyRSMQ itself (so its layout is PyRSMQ's); False if it already existed."""
        settings = self.settings
        rsmq = RedisSMQ(client=self.redis, ns=self._ns, exceptions=True)
        try:
            rsmq.createQueue(
                qname=qname,
                vt=_seconds_number(settings.create_vt),
                delay=_seconds_number(settings.create_delay),
                maxsize=settings.create_maxsize,
            ).execute()
        except QueueAlreadyExists:
            return False
        return True

    def queue_vt(self, qname: str) -> float | None:
        raw = self.redis.hget(self.keys(qname)[1], "vt")
        return None if raw is None else float(raw)

    # ------------------------------------------------------------------ messages

    def receive(self, qname: str, count: int, vt_ms: int | None) -> ReceiveResult:
        """Receive up to ``count`` visible messages, hiding them for ``vt_ms`` (None: the queue's own vt)."""
        reply = self._evalsha(_RECEIVE, self.keys(qname), (count, "" if vt_ms is None else vt_ms))
        if reply[0] == -1:
            return ReceiveResult([], 0, 0, queue_missing=True)
        # Slicing the flat reply column by column is several times faster than indexing it per message.
        messages = list(map(Received._make, zip(
            [raw.decode("ascii") for raw in reply[4::5]], reply[5::5], reply[6::5], reply[7::5], reply[8::5],
            strict=True)))
        return ReceiveResult(messages, int(reply[1]), int(reply[2]), int(reply[3]))

    def delete(self, qname: str, ids: Sequence[str]) -> None:
        """Delete messages the way PyRSMQ's deleteMessage does, all in one transaction."""
        if not ids:
            return
        base, key, errors = self.keys(qname)
        fields: list[str] = []
        for message_id in ids:
            fields.extend((message_id, message_id + ":rc", message_id + ":fr"))
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(base, *ids)
        pipe.hdel(key, *fields)
        pipe.hdel(errors, *ids)
        pipe.execute()

    def change_visibility(
        self, qname: str, vt_ms: int, held: Sequence[tuple[str, int]], reason: str = ""
    ) -> list[tuple[str, int]]:
        """Make held messages (id, receive count) visible in ``vt_ms``; return the deliveries no longer held."""
        if not held:
            return []
        # The reason is the handler's error text: it may hold what is not UTF-8 (a lone surrogate from bytes decoded
        # with surrogateescape), which redis-py cannot encode.
        args: list[Any] = [vt_ms, reason.encode("utf-8", "backslashreplace")]
        for message_id, rc in held:
            args.extend((message_id, rc))
        lost = self._evalsha(_CHANGE_VISIBILITY, self.keys(qname), args)
        return [(raw.decode("ascii"), int(rc)) for raw, rc in zip(lost[0::2], lost[1::2], strict=True)]

    def send(self, qname: str, messages: Sequence[tuple[int | None, bytes]]) -> int:
        """Send (delay in ms or None for the queue's delay, body) pairs; create the queue first if needed."""
        settings = self.settings
        base, key, _ = self.keys(qname)
        args: list[Any] = [
            qname,
            _seconds_text(settings.create_vt),
            _seconds_text(settings.create_delay),
            settings.create_maxsize,
            self.realtime_channel(qname) if settings.realtime else "",
            random_suffix(),
        ]
        for delay_ms, body in messages:
            args.append("" if delay_ms is None else delay_ms)
            args.append(body)
        return int(self._evalsha(_SEND, (base, key, self.queues_key), args))

    def depth(self, qname: str) -> tuple[int, int]:
        """(all messages, visible messages) in the queue."""
        total, visible = self._evalsha(_DEPTH, (self.keys(qname)[0],), ())
        return int(total), int(visible)


def _seconds_number(seconds: float) -> int | float:
    """PyRSMQ validates numbers, not text; an integral value goes as an int so that it is stored as "30"."""
    return int(seconds) if float(seconds).is_integer() else float(seconds)


def _seconds_text(seconds: float) -> str:
    """RSMQ stores seconds as integers where it can; keep "30", not "30.0", so other clients parse it."""
    return str(int(seconds)) if float(seconds).is_integer() else repr(float(seconds))


# ---------------------------------------------------------------------------------------------- browsing (volley dlq)


def browse_ids(client: RsmqClient, qname: str) -> list[str]:
    """Every message id in the queue (visible or not), oldest sent first: read, nothing changed."""
    members: list[bytes] = client.redis.zrange(client.keys(qname)[0], 0, -1)  # type: ignore[assignment]
    ids = [raw.decode("ascii") for raw in members]
    return sorted(ids, key=lambda i: (sent_time(i) or 0.0, i))


def read_messages(client: RsmqClient, qname: str, ids: Sequence[str]) -> list[tuple[str, bytes, int]]:
    """(id, body, receive count) of these messages, without receiving them: no visibility change, no count.
    Messages deleted since their id was read are left out."""
    if not ids:
        return []
    fields: list[str] = []
    for message_id in ids:
        fields.extend((message_id, message_id + ":rc"))
    values: list[bytes | None] = client.redis.hmget(client.keys(qname)[1], fields)  # type: ignore[assignment]
    out: list[tuple[str, bytes, int]] = []
    for index, message_id in enumerate(ids):
        body, rc = values[2 * index], values[2 * index + 1]
        if body is not None:
            out.append((message_id, body, int(rc or 0)))
    return out
