"""Small helpers shared by the consumer and the producer: connecting at start-up, throttled warnings."""

from __future__ import annotations

import logging
import threading
import time

import redis

from volley.errors import BrokerUnavailableError, ConfigurationError
from volley_rsmq.client import RETRIABLE_ERRORS, RsmqClient

logger = logging.getLogger("volley.rsmq")


class ThrottledLog:
    """Logs a recurring problem (Redis unreachable) at most once per ``interval`` seconds, with a count."""

    def __init__(self, interval: float = 5.0) -> None:
        self._interval = interval
        self._last = 0.0
        self._suppressed = 0
        self._lock = threading.Lock()

    def warning(self, message: str, *args: object) -> None:
        now = time.monotonic()
        with self._lock:
            if now - self._last < self._interval:
                self._suppressed += 1
                return
            suppressed, self._suppressed, self._last = self._suppressed, 0, now
        logger.warning(message, *args)
        if suppressed:
            logger.warning("(%d similar warnings suppressed in the last %g s)", suppressed, self._interval)


def connect(client: RsmqClient, timeout: float) -> None:
    """Ping the server, retrying for up to ``timeout`` seconds; a server that never answers is a configuration error."""
    settings = client.settings
    deadline = time.monotonic() + timeout
    pause = 0.05
    while True:
        try:
            client.ping()
        except (redis.AuthenticationError, redis.exceptions.AuthorizationError) as exc:
            raise ConfigurationError(
                f"Redis at {settings.host}:{settings.port} refused the credentials: {exc}; check the RSMQ config "
                "'password' (or options.username)"
            ) from exc
        except RETRIABLE_ERRORS as exc:
            if time.monotonic() >= deadline:
                raise BrokerUnavailableError(
                    f"cannot reach Redis at {settings.host}:{settings.port} (db {settings.db}) within "
                    f"{timeout:g} s: {exc}; check the RSMQ config 'host'/'port' or REDIS_HOST, or raise "
                    "'connect_timeout_seconds'"
                ) from exc
            time.sleep(pause)
            pause = min(pause * 2, 1.0)
        else:
            return
