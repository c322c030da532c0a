"""An RSMQ queue's ``config`` mapping, checked once at ``create_consumer`` / ``create_producer`` time.

The keys are py-volley's (``host``, ``port``, ``vt``, ``delay``, ``maxsize``,
``options`` passed to the redis client, ``ns``) plus Volley's own, listed in
``VOLLEY_KEYS``. Every mistake raises ``ConfigurationError`` saying what to
change, before anything connects.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from volley.errors import ConfigurationError
from volley.redaction import redacted_repr

QNAME_MAX_LEN = 64
_QNAME_INVALID = re.compile(r"[^A-Za-z0-9._-]")

RSMQ_KEYS = ("host", "port", "db", "password", "vt", "delay", "maxsize", "options", "ns", "realtime")
VOLLEY_KEYS = (
    "headers",
    "heartbeat",
    "max_extension_seconds",
    "poll_interval_seconds",
    "delivery_timeout_seconds",
    "retry_backoff_seconds",
    "send_batch_size",
    "max_pending_deletes",
    "connect_timeout_seconds",
    "close_timeout_seconds",
)
# PyRSMQ command flags that py-volley configurations may carry; they mean nothing here and are accepted silently.
IGNORED_KEYS = ("exceptions", "quiet", "encode", "qname")

HEADER_MODES = ("drop", "envelope")

VT_DEFAULT = 30.0  # PyRSMQ's createQueue default
MAXSIZE_DEFAULT = 65565  # PyRSMQ's createQueue default (sic), and the largest it accepts
MAXSIZE_MIN = 1024  # the smallest maxsize PyRSMQ accepts
SECONDS_MAX = 9_999_999  # the longest vt and delay PyRSMQ accepts


def _number(config: Mapping[str, Any], key: str, default: float, minimum: float, *, strict: bool = False) -> float:
    value = config.get(key, default)
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"RSMQ config {key!r} must be a number, got {value!r}") from None
    if number < minimum or (strict and number == minimum):
        bound = f"greater than {minimum:g}" if strict else f"at least {minimum:g}"
        raise ConfigurationError(f"RSMQ config {key!r} must be {bound}, got {value!r}")
    return number


def _flag(config: Mapping[str, Any], key: str, *, default: bool) -> bool:
    value = config.get(key, default)
    if not isinstance(value, bool):
        raise ConfigurationError(f"RSMQ config {key!r} must be true or false, got {value!r}")
    return value


def validate_qname(qname: str, where: str) -> str:
    """RSMQ's queue-name rule: 1 to 64 characters among letters, digits, '.', '_' and '-'."""
    if not qname or len(qname) > QNAME_MAX_LEN or _QNAME_INVALID.search(qname):
        raise ConfigurationError(
            f"{where}: {qname!r} is not a valid RSMQ queue name; use 1 to {QNAME_MAX_LEN} characters among "
            "letters, digits, '.', '_' and '-'"
        )
    return qname


def _host_and_port(config: Mapping[str, Any]) -> tuple[str, int]:
    host = config.get("host")
    port = config.get("port")
    if not host:
        return _host_from_environment()
    host = str(host)
    if port is None and host.count(":") == 1:  # "host:port"; a bare IPv6 address has several colons
        host, _, port_text = host.partition(":")
        port = port_text
    return host, _port(port if port is not None else 6379, "RSMQ config 'port'")


def _host_from_environment() -> tuple[str, int]:
    """REDIS_HOST as ``host``, ``host:port``, ``[v6]:port`` or ``redis://host:port``; REDIS_PORT beside a bare host
    (the same forms the project's service tooling prints and its pytest plugin reads)."""
    value = os.environ.get("REDIS_HOST", "").strip()
    if not value:
        raise ConfigurationError(
            "RSMQ needs a Redis host: set 'host' (and 'port') in the queue's config, or the REDIS_HOST "
            "environment variable (host, host:port or redis://host:port)"
        )
    default_port = os.environ.get("REDIS_PORT", "").strip() or 6379
    if "://" in value:
        parts = urlsplit(value)
        try:
            url_port = parts.port
        except ValueError:
            raise ConfigurationError(f"REDIS_HOST={value!r} has an invalid port") from None
        return parts.hostname or "127.0.0.1", _port(url_port or default_port, "REDIS_PORT")
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        if rest.startswith(":"):
            return host, _port(rest[1:], "REDIS_HOST's port")
        return host, _port(default_port, "REDIS_PORT")
    if value.count(":") == 1:
        host, _, port_text = value.partition(":")
        return host, _port(port_text, "REDIS_HOST's port")
    return value, _port(default_port, "REDIS_PORT")


def _port(value: Any, what: str) -> int:
    try:
        number: int = int(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"{what} must be an integer, got {value!r}") from None
    if not 0 < number < 65536:
        raise ConfigurationError(f"{what} must be between 1 and 65535, got {number}")
    return number


@dataclass(frozen=True, repr=False)
class RsmqSettings:
    """Everything a consumer or producer needs, resolved and checked. Its repr names the password without
    showing it (tracebacks with locals, error trackers and log lines print it)."""

    host: str
    port: int
    db: int = 0
    password: str | None = None
    namespace: str = "rsmq"
    vt: float | None = None  # None: use the queue's own vt (created with VT_DEFAULT)
    delay: float | None = None  # None: use the queue's own delay
    maxsize: int | None = None  # None: not enforced (PyRSMQ does not enforce it either)
    realtime: bool = False
    redis_options: Mapping[str, Any] = field(default_factory=dict)
    headers: str = "drop"
    heartbeat: bool = True
    max_extension_seconds: float = 3600.0
    poll_interval_seconds: float = 0.05
    delivery_timeout_seconds: float = 30.0
    retry_backoff_seconds: float = 0.05
    send_batch_size: int = 500
    max_pending_deletes: int = 10_000
    connect_timeout_seconds: float = 10.0
    close_timeout_seconds: float = 10.0

    def __repr__(self) -> str:
        return redacted_repr(self)

    @property
    def create_vt(self) -> float:
        return VT_DEFAULT if self.vt is None else self.vt

    @property
    def create_delay(self) -> float:
        return 0.0 if self.delay is None else self.delay

    @property
    def create_maxsize(self) -> int:
        return MAXSIZE_DEFAULT if self.maxsize is None else self.maxsize

    def redis_kwargs(self) -> dict[str, Any]:
        """Keyword arguments for ``redis.Redis``: ours first, the user's ``options`` on top."""
        kwargs: dict[str, Any] = {
            "host": self.host,
            "port": self.port,
            "db": self.db,
            "password": self.password,
            "socket_connect_timeout": 5.0,
            "socket_timeout": 30.0,
            "health_check_interval": 15,
        }
        kwargs.update(self.redis_options)
        kwargs["decode_responses"] = False
        return kwargs


def parse_settings(config: Mapping[str, Any], queue_value: str, role: str) -> RsmqSettings:
    """Check a queue's ``config`` and resolve host, port and defaults (``role`` picks the header mode default)."""
    unknown = set(config) - set(RSMQ_KEYS) - set(VOLLEY_KEYS) - set(IGNORED_KEYS)
    if unknown:
        raise ConfigurationError(
            f"RSMQ queue {queue_value!r} has unknown config key(s) {sorted(unknown)}; known keys: "
            f"{sorted(RSMQ_KEYS + VOLLEY_KEYS)}"
        )
    validate_qname(queue_value, "RSMQ queue 'value'")
    host, port = _host_and_port(config)

    options = config.get("options") or {}
    if not isinstance(options, Mapping):
        raise ConfigurationError(f"RSMQ config 'options' must be a mapping of redis client options, got {options!r}")
    if options.get("decode_responses"):
        raise ConfigurationError(
            "RSMQ config options.decode_responses must be false (or absent): Volley hands raw bytes to the "
            "serializer"
        )
    options = {k: v for k, v in options.items() if k not in ("decode_responses", "encoding")}

    namespace = str(config.get("ns", "rsmq"))
    if ":" in namespace:
        raise ConfigurationError(f"RSMQ config 'ns' must not contain ':', got {namespace!r}")

    vt = _number(config, "vt", 0.0, 0.0, strict=True) if config.get("vt") is not None else None
    delay = _number(config, "delay", 0.0, 0.0) if config.get("delay") is not None else None
    for key, seconds in (("vt", vt), ("delay", delay)):
        if seconds is not None and seconds > SECONDS_MAX:
            raise ConfigurationError(f"RSMQ config {key!r} must be at most {SECONDS_MAX} seconds (RSMQ's limit; "
                                     f"PyRSMQ would store its default instead), got {seconds:g}")
    maxsize: int | None = None
    if config.get("maxsize") is not None:
        raw = config["maxsize"]
        in_range = isinstance(raw, int) and (raw == -1 or MAXSIZE_MIN <= raw <= MAXSIZE_DEFAULT)
        if not in_range or isinstance(raw, bool):
            raise ConfigurationError(f"RSMQ config 'maxsize' must be a byte count from {MAXSIZE_MIN} to "
                                     f"{MAXSIZE_DEFAULT} (RSMQ's limits; PyRSMQ would store its default instead), "
                                     f"or -1 for no limit, got {raw!r}")
        maxsize = raw

    headers = str(config.get("headers", "envelope" if role == "dlq" else "drop"))
    if headers not in HEADER_MODES:
        raise ConfigurationError(
            f"RSMQ config 'headers' must be one of {list(HEADER_MODES)} (RSMQ messages have no headers: 'drop' "
            f"sends the payload alone, 'envelope' wraps payload and headers in a JSON document), got {headers!r}"
        )
    db = config.get("db", 0)
    if not isinstance(db, int) or isinstance(db, bool) or db < 0:
        raise ConfigurationError(f"RSMQ config 'db' must be a non-negative integer, got {db!r}")
    batch = config.get("send_batch_size", 500)
    if not isinstance(batch, int) or isinstance(batch, bool) or batch < 1:
        raise ConfigurationError(f"RSMQ config 'send_batch_size' must be a positive integer, got {batch!r}")
    pending = config.get("max_pending_deletes", 10_000)
    if not isinstance(pending, int) or isinstance(pending, bool) or pending < 1:
        raise ConfigurationError(f"RSMQ config 'max_pending_deletes' must be a positive integer, got {pending!r}")
    password = config.get("password")

    return RsmqSettings(
        host=host,
        port=port,
        db=db,
        password=None if password is None else str(password),
        namespace=namespace,
        vt=vt,
        delay=delay,
        maxsize=maxsize,
        realtime=_flag(config, "realtime", default=False),
        redis_options=options,
        headers=headers,
        heartbeat=_flag(config, "heartbeat", default=True),
        max_extension_seconds=_number(config, "max_extension_seconds", 3600.0, 0.0),
        poll_interval_seconds=_number(config, "poll_interval_seconds", 0.05, 0.0, strict=True),
        delivery_timeout_seconds=_number(config, "delivery_timeout_seconds", 30.0, 0.0),
        retry_backoff_seconds=_number(config, "retry_backoff_seconds", 0.05, 0.0, strict=True),
        send_batch_size=batch,
        max_pending_deletes=pending,
        connect_timeout_seconds=_number(config, "connect_timeout_seconds", 10.0, 0.0),
        close_timeout_seconds=_number(config, "close_timeout_seconds", 10.0, 0.0),
    )
