"""What a Kafka producer checks at start, so that a misconfiguration fails there and not under load: a broker
answers, and its topic accepts the batches the producer builds.

A topic's ``max.message.bytes`` bounds a whole record batch, not a record. librdkafka builds batches up to the
producer's ``message.max.bytes`` (1,000,000 by default); to a topic with a lower limit, a busy producer sends
batches of small records that the broker refuses whole (MSG_SIZE_TOO_LARGE for every record of them), so good
records fail with the one that made the batch large, are retried, and the app stops. With ``message.max.bytes``
at most the topic's limit less ``BATCH_MARGIN``, librdkafka keeps batches within it and refuses a record too large
on its own, in ``produce`` (its input then goes to the dead-letter queue). The margin: librdkafka's check of a
record leaves out the batch header (61 bytes) and part of the record's framing, which the broker counts (measured
against a topic limited to 10,000 bytes, with ``message.max.bytes`` at 10,000 the broker refused single records of
9,890 to 9,924 bytes of value; at 9,900 none).

A compressed batch is checked by the broker compressed, so there a higher ``message.max.bytes`` may be what the
user wants: only a warning. The check is advisory: when the topic's configuration cannot be read (no such topic
yet, no permission, no answer within ``DESCRIBE_TIMEOUT``), the start goes on.
"""

from __future__ import annotations

import logging
from typing import Any

from confluent_kafka import KafkaException
from confluent_kafka.admin import (  # type: ignore[attr-defined]  # re-exported without __all__ in 2.16
    AdminClient,
    ConfigResource,
    ResourceType,
)

from volley.errors import ConfigurationError
from volley.ports import QueueSpec
from volley_kafka.clients import admin_config, cluster_metadata, make_client, with_callbacks

logger = logging.getLogger("volley_kafka")

MESSAGE_MAX_BYTES = 1_000_000
"""librdkafka's default ``message.max.bytes``."""

BATCH_MARGIN = 512
"""What ``message.max.bytes`` must stay below a topic's ``max.message.bytes`` (see the module's doc)."""

DESCRIBE_TIMEOUT = 5.0
"""The longest the start waits for a topic's configuration (at most the start-up timeout)."""


def check_reachable(client: Any, brokers: frozenset[str], timeout: float, queue: QueueSpec) -> None:
    """Fail at start-up, not on the first message, when no broker answers."""
    cluster_metadata(client, f"queue {queue.name!r}", ", ".join(sorted(brokers)), timeout)


def fitting_message_max_bytes(limit: int) -> int:
    """The largest ``message.max.bytes`` whose batches and records a topic limited to ``limit`` bytes accepts."""
    return max(limit - BATCH_MARGIN, limit // 2)


def check_batch_limit(config: dict[str, Any], queue: QueueSpec, timeout: float, *, owner: str) -> None:
    """Fail at start-up when the queue's topic refuses batches the producer may build (see the module's doc).

    ``owner``: whose config sets the producer's ``message.max.bytes`` (the queue's, or exactly-once the input's)."""
    allowed = int(config.get("message.max.bytes", MESSAGE_MAX_BYTES))
    what = f"queue {queue.name!r}"
    limit = topic_max_message_bytes(config, queue.value, min(timeout, DESCRIBE_TIMEOUT), what=what)
    if limit is None or allowed <= fitting_message_max_bytes(limit):
        return
    fitting = fitting_message_max_bytes(limit)
    problem = (f"{what}: topic {queue.value!r} accepts record batches of at most {limit} bytes (its max.message.bytes) "
               f"and the producer builds them up to {allowed} bytes (message.max.bytes)")
    compression = str(config.get("compression.type", config.get("compression.codec", "none"))).lower()
    if compression != "none":
        logger.warning("%s; the broker checks a compressed batch as it is sent, so this may be what you want, but a "
                       "batch still above the limit once compressed is refused whole, good records with it. Setting "
                       '"message.max.bytes": %d in the config of %s avoids that', problem, fitting, owner)
        return
    raise ConfigurationError(
        f"{problem}: the broker would refuse a large batch whole, good records with it, and the app would stop. Set "
        f'"message.max.bytes": {fitting} in the config of {owner} (a record larger than that then goes to the '
        "dead-letter queue on its own), or raise the topic's max.message.bytes")


def topic_max_message_bytes(config: dict[str, Any], topic: str, timeout: float, *, what: str) -> int | None:
    """The topic's ``max.message.bytes``; None when it cannot be read within ``timeout`` (no such topic yet, no
    permission, no answer)."""
    try:
        admin = make_client(with_callbacks(admin_config(config)), what, AdminClient)
        resource = ConfigResource(ResourceType.TOPIC, topic)
        entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
        return int(entries["max.message.bytes"].value)
    except (KafkaException, ConfigurationError, TimeoutError, KeyError, ValueError, TypeError) as exc:
        logger.info("%s: cannot read the max.message.bytes of topic %r (%s); not checked", what, topic,
                    exc or type(exc).__name__)
        return None
