"""Building librdkafka clients and reading their errors: what the producer, the consumers and the share
consumer share."""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from confluent_kafka import KafkaError, KafkaException

from volley.errors import BrokerUnavailableError, ConfigurationError
from volley_kafka.settings import CONSUMER_ONLY, PRODUCER_ONLY

logger = logging.getLogger("volley_kafka")
rdkafka_logger = logging.getLogger("volley_kafka.librdkafka")

SHARE_ONLY = ("share.", "max.poll.records")
"""Settings of a share consumer that an admin client has no use for (librdkafka would warn about each)."""

USER_CALLBACKS = ("error_cb", "oauth_cb", "stats_cb", "throttle_cb")
"""Callbacks a user may give librdkafka in the queue's config. librdkafka runs them inside ``poll()``, next to the
delivery reports, so on the event loop if the loop served the producer's reports. One may block (a token fetched
over HTTP; confluent-kafka before 2.13 runs ``oauth_cb`` in ``poll()``), so a producer with any of them is polled by
its poller thread only."""


def is_fatal(error: KafkaError) -> bool:
    """librdkafka's client can no longer work: it must be closed, and a new one built.

    ``KafkaError.fatal()`` alone misses most of them: confluent-kafka sets it only on errors of the transactional
    API. A fatal error of a consumer (a static member fenced) or of an idempotent producer reaches the error
    callback, a consumed record's ``error()`` and a failed ``commit()`` as the code ``_FATAL`` with ``fatal()``
    false (its text names the underlying error).
    """
    return bool(error.fatal()) or error.code() == KafkaError._FATAL


def log_client_error(what: str, error: KafkaError) -> bool:
    """librdkafka's error callback, logged at the level it deserves; True when the client's error is fatal."""
    if is_fatal(error):
        logger.error("%s: fatal error: %s", what, error.str())
        return True
    if error.code() in (KafkaError._ALL_BROKERS_DOWN, KafkaError._TRANSPORT):
        logger.warning("%s: %s", what, error.str())
    else:
        logger.info("%s: %s", what, error.str())
    return False


def with_callbacks(config: dict[str, Any], **ours: Callable[..., None]) -> dict[str, Any]:
    """``config`` for librdkafka with Volley's callbacks (``error_cb``, ``on_commit``) and its logger.

    A callback the user set under the same name is called too, after Volley's, with the same arguments; what it
    raises is logged (it runs on a librdkafka-serving thread). A ``logger`` of the user's replaces Volley's.
    """
    result = dict(config)
    for name, callback in ours.items():
        theirs = config.get(name)
        result[name] = callback if theirs is None else _both(callback, theirs, name)
    result.setdefault("logger", rdkafka_logger)
    return result


def _both(ours: Callable[..., None], theirs: Callable[..., Any], name: str) -> Callable[..., None]:
    def both(*args: Any) -> None:
        ours(*args)
        try:
            theirs(*args)
        except Exception:
            logger.exception("the %s given in the queue's Kafka config raised", name)

    return both


def make_client(config: dict[str, Any], what: str, factory: Callable[[dict[str, Any]], Any]) -> Any:
    """Build a librdkafka client, turning a rejected setting into a ConfigurationError that names it."""
    try:
        return factory(config)
    except KafkaException as exc:
        error = exc.args[0] if exc.args else exc
        text = error.str() if isinstance(error, KafkaError) else str(error)
        raise ConfigurationError(
            f"{what}: librdkafka rejected the configuration: {text}. Settings in the queue's config are passed to "
            "librdkafka as they are (see librdkafka's CONFIGURATION.md); Volley's own ones start with 'volley.'"
        ) from None
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(f"{what}: invalid Kafka configuration: {exc}") from None


def admin_config(config: dict[str, Any]) -> dict[str, Any]:
    """The settings of an admin client for the cluster of a consumer's or producer's ``config``: all but what only a
    consumer or a producer takes. Whatever reaching the brokers needs (credentials, TLS, an ``oauth_cb``) is kept."""
    return {k: v for k, v in config.items()
            if k not in CONSUMER_ONLY and k not in PRODUCER_ONLY and not k.startswith(SHARE_ONLY)}


def cluster_metadata(client: Any, what: str, brokers: object, timeout: float) -> Any:
    """The start-up check: ``client``'s cluster metadata; a BrokerUnavailableError naming ``brokers`` (and what to
    change) when none answers within ``timeout``."""
    try:
        return client.list_topics(timeout=timeout)
    except KafkaException as exc:
        raise BrokerUnavailableError(
            f"{what}: no Kafka broker of {brokers} answered within {timeout:.0f} s "
            f"({exc.args[0] if exc.args else exc}); check bootstrap.servers / KAFKA_BROKERS, or raise "
            "volley.startup.timeout.seconds"
        ) from None
