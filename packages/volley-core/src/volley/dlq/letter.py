"""A dead letter as ``volley dlq`` reads it: the broker's envelope seen through the headers the engine wrote.

The engine writes the failed input as it was received plus ``volley-*`` headers (see
``volley.run.deadletters``); on RSMQ the connector's envelope has already turned the stored JSON back into the
same value, key and headers. A replay sends the value and key on unchanged, with the user's headers, without
the error headers, and with ``volley-replay-count`` raised by one: the loop guard reads it back when the replayed
message fails again and returns to the dead-letter queue.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

from volley.message import Envelope, Headers

PREFIX = "volley-"
STAGE = PREFIX + "error-stage"
ERROR_TYPE = PREFIX + "error-type"
REASON = PREFIX + "error-reason"
SOURCE_QUEUE = PREFIX + "source-queue"
SOURCE_POSITION = PREFIX + "source-position"
SOURCE_PARTITION = PREFIX + "source-partition"
ATTEMPTS = PREFIX + "attempts"
LAST_ERROR = PREFIX + "last-error"
REPLAY_COUNT = PREFIX + "replay-count"

ERROR_HEADERS = frozenset({STAGE, ERROR_TYPE, REASON, SOURCE_QUEUE, SOURCE_POSITION, SOURCE_PARTITION, ATTEMPTS,
                           LAST_ERROR})
"""What a replay takes off: where and why it failed last time. The replay counter is replaced, not kept."""


def _text(headers: Headers, name: str) -> str:
    raw = headers.get(name)
    return raw.decode(errors="replace") if isinstance(raw, bytes) else ("" if raw is None else str(raw))


def _int(text: str, default: int = 0) -> int:
    try:
        return int(text)
    except ValueError:
        return default


@dataclass(frozen=True)
class DeadLetter:
    """One letter of a dead-letter queue. ``id`` names it within its queue for good (the journal's key)."""

    envelope: Envelope
    stage: str
    error_type: str
    reason: str
    source_queue: str
    source_position: str
    source_partition: int | None
    attempts: int
    replays: int

    @classmethod
    def read(cls, envelope: Envelope) -> DeadLetter:
        headers = envelope.headers or {}
        partition = _text(headers, SOURCE_PARTITION)
        return cls(envelope=envelope, stage=_text(headers, STAGE) or "unknown",
                   error_type=_text(headers, ERROR_TYPE) or "unknown", reason=_text(headers, REASON),
                   source_queue=_text(headers, SOURCE_QUEUE), source_position=_text(headers, SOURCE_POSITION),
                   source_partition=_int(partition) if partition else None, attempts=_int(_text(headers, ATTEMPTS)),
                   replays=_int(_text(headers, REPLAY_COUNT)))

    @property
    def id(self) -> str:
        env = self.envelope
        return f"{env.partition}:{env.position}" if env.partition is not None else str(env.position)

    @property
    def digest(self) -> str:
        """Names the letter's content (key and value), whichever position it has now: the journal counts replays
        by it."""
        hasher = hashlib.blake2b(digest_size=16)
        key = self.envelope.key
        hasher.update(b"-" if key is None else b"k" + len(key).to_bytes(4, "big") + key)
        hasher.update(self.envelope.value)
        return hasher.hexdigest()

    @property
    def fingerprint(self) -> str:
        """Names this very letter, not just its content: key, value, every header and the time it was written. The
        journal's ``sent`` entries use it with the id, since an id can come back (a Kafka topic created again starts
        at offset 0) with a letter of the same key and value (the replayed message failed again)."""
        hasher = hashlib.blake2b(digest_size=16)
        hasher.update(self.digest.encode())
        for name, value in sorted((self.envelope.headers or {}).items()):
            raw = value if isinstance(value, bytes) else str(value).encode()
            hasher.update(b"h" + len(name).to_bytes(4, "big") + name.encode() + len(raw).to_bytes(4, "big") + raw)
        hasher.update(b"t" + repr(self.envelope.timestamp).encode())
        return hasher.hexdigest()

    @property
    def key(self) -> bytes | None:
        return self.envelope.key

    @property
    def timestamp(self) -> float | None:
        return self.envelope.timestamp

    def replay_headers(self, replays: int | None = None) -> Headers:
        """The user's headers, without the error headers, with the replay counter raised (from ``replays`` when the
        journal knows of more replays than the header says)."""
        headers = {name: value for name, value in (self.envelope.headers or {}).items()
                   if name not in ERROR_HEADERS and name != REPLAY_COUNT}
        headers[REPLAY_COUNT] = str(max(self.replays, replays or 0) + 1).encode()
        return headers

    def summary(self, preview: int = 48) -> dict[str, Any]:
        """A JSON-friendly sample: key, stage, reason, where it came from, the first bytes."""
        key = self.key
        return {"id": self.id, "key": None if key is None else key.decode(errors="replace"), "stage": self.stage,
                "error_type": self.error_type, "reason": self.reason, "source_queue": self.source_queue,
                "source_position": self.source_position, "timestamp": self.timestamp, "replays": self.replays,
                "value": self.envelope.value[:preview].decode(errors="replace")}
