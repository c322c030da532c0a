"""A queue's ``config`` for the ``sqlite`` connector, checked when the Engine is built.

Every mistake is a ``ConfigurationError`` that names the key and what to write instead.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volley.errors import ConfigurationError

PATH_ENV = "VOLLEY_SQLITE_PATH"
DEFAULT_PATH = "volley.sqlite3"
SYNCHRONOUS = ("full", "normal", "off")

# Accepted and ignored: keys that profiles of other connectors or py-volley configurations may carry along.
IGNORED_KEYS = frozenset({"qname"})


@dataclass(frozen=True, slots=True)
class SqliteSettings:
    """The settings of one queue; see the docs page ``connectors/sqlite.md`` for the trade-offs."""

    path: str = DEFAULT_PATH
    """The database file. Every queue of an application may live in the same file."""
    partitions: int = 4
    """Partitions of queues this consumer or producer creates (a queue keeps the count it was created with)."""
    partitions_explicit: bool = False
    visibility_timeout_seconds: float = 30.0
    """How long a delivered message stays hidden from other consumers unless its lease is renewed."""
    heartbeat: bool = True
    """Renew the leases of messages still in flight every third of the visibility timeout."""
    ordered: bool = True
    """A partition is held by one consumer at a time (Kafka-like order); False: competing consumers (SQS-like)."""
    synchronous: str = "full"
    """SQLite's ``PRAGMA synchronous``: full (survives power loss), normal (survives a process crash), off."""
    busy_timeout_seconds: float = 30.0
    """How long a statement waits for another process's write lock before it fails."""
    poll_interval_seconds: float = 0.05
    """Pause between looks at an empty queue (writers in this process wake waiting consumers at once)."""
    delay: float = 0.0
    """Default delay of produced messages without a per-message ``delay``."""
    retention_seconds: float = 0.0
    """0: an ack deletes the message. Otherwise acked rows are kept this long (for inspection), then compacted."""
    compaction_interval_seconds: float = 60.0
    """How often a consumer deletes acked rows past their retention and returns free pages to the file system."""
    close_timeout_seconds: float = 10.0
    """How long closing waits to give back held messages (a consumer) or for writes to commit (a producer), e.g.
    while another process holds the write lock; then it returns, logs what is left, and lets that finish behind it."""

    @property
    def database_key(self) -> tuple[str, str, float]:
        """Consumers and producers of one process with the same key share one connection and its thread."""
        return (os.path.realpath(self.path), self.synchronous, self.busy_timeout_seconds)


_NUMBERS: dict[str, tuple[str, bool]] = {
    # key: (attribute, zero allowed)
    "visibility_timeout_seconds": ("visibility_timeout_seconds", False),
    "vt": ("visibility_timeout_seconds", False),
    "busy_timeout_seconds": ("busy_timeout_seconds", True),
    "poll_interval_seconds": ("poll_interval_seconds", False),
    "delay": ("delay", True),
    "retention_seconds": ("retention_seconds", True),
    "compaction_interval_seconds": ("compaction_interval_seconds", False),
    "close_timeout_seconds": ("close_timeout_seconds", False),  # 0 would give up on every close at once
}
MAX_BUSY_TIMEOUT_SECONDS = 2_147_483  # SQLite's busy timeout is a C int of milliseconds
_BOOLEANS = ("heartbeat", "ordered")
KNOWN_KEYS = ("path", "partitions", "synchronous", *_NUMBERS, *_BOOLEANS)


def _boolean(queue: str, key: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
        return value.strip().lower() in ("true", "1", "yes", "on")
    raise ConfigurationError(f"sqlite queue {queue!r}: {key} must be true or false, got {value!r}")


def parse_settings(config: Mapping[str, Any], queue: str) -> SqliteSettings:
    """Check a queue's ``config`` mapping and build its settings."""
    unknown = sorted(set(config) - set(KNOWN_KEYS) - IGNORED_KEYS)
    if unknown:
        raise ConfigurationError(
            f"sqlite queue {queue!r}: unknown config key(s) {unknown}; known: {', '.join(KNOWN_KEYS)}"
        )
    values: dict[str, Any] = {}
    path = config.get("path") or os.environ.get(PATH_ENV) or DEFAULT_PATH
    if not isinstance(path, (str, os.PathLike)):
        raise ConfigurationError(f"sqlite queue {queue!r}: path must be a file name, got {path!r}")
    values["path"] = os.fspath(path)
    if "partitions" in config:
        partitions = config["partitions"]
        try:
            count = int(partitions)
        except (TypeError, ValueError):
            count = 0
        if count < 1 or isinstance(partitions, bool) or (isinstance(partitions, float) and not partitions.is_integer()):
            raise ConfigurationError(
                f"sqlite queue {queue!r}: partitions must be a positive integer, got {partitions!r}"
            )
        values["partitions"] = count
        values["partitions_explicit"] = True
    if "vt" in config and "visibility_timeout_seconds" in config:
        raise ConfigurationError(f"sqlite queue {queue!r}: vt and visibility_timeout_seconds are the same setting; "
                                 "give one of them")
    for key, (attribute, zero_allowed) in _NUMBERS.items():
        if key not in config:
            continue
        try:
            if isinstance(config[key], bool):  # float(True) is 1.0: a flag where seconds belong is a mistake
                raise TypeError
            number = float(config[key])
        except (TypeError, ValueError):
            raise ConfigurationError(
                f"sqlite queue {queue!r}: {key} must be a number of seconds, got {config[key]!r}"
            ) from None
        if not math.isfinite(number) or number < 0 or (number == 0 and not zero_allowed):
            wanted = "0 or more" if zero_allowed else "positive"
            raise ConfigurationError(f"sqlite queue {queue!r}: {key} must be {wanted}, got {config[key]!r}")
        if attribute == "busy_timeout_seconds" and number > MAX_BUSY_TIMEOUT_SECONDS:
            raise ConfigurationError(
                f"sqlite queue {queue!r}: {key} must be at most {MAX_BUSY_TIMEOUT_SECONDS} (about 24 days: SQLite "
                f"takes it in milliseconds as a 32-bit number, and a larger one would become 0, no waiting at "
                f"all), got {config[key]!r}")
        values[attribute] = number
    for key in _BOOLEANS:
        if key in config:
            values[key] = _boolean(queue, key, config[key])
    if "synchronous" in config:
        synchronous = str(config["synchronous"]).strip().lower()
        if synchronous not in SYNCHRONOUS:
            raise ConfigurationError(
                f"sqlite queue {queue!r}: synchronous must be one of {', '.join(SYNCHRONOUS)}, "
                f"got {config['synchronous']!r}"
            )
        values["synchronous"] = synchronous
    return SqliteSettings(**values)
