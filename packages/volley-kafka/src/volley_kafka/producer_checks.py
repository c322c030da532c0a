"""What a Kafka producer checks at start, so that a misconfiguration fails there and not under load: a broker
answers, and its topic accepts the batches the producer builds.

A topic's ``max.message.bytes`` bounds a whole record batch, not a record. librdkafka builds batches up to the
producer's ``message.max.bytes`` (1,000,000 by default); to a topic with a lower limit, a busy producer sends
batches of small records that the broker refuses whole (MSG_SIZE_TOO_LARGE for every record of them), so good
records fail with the one that made the batch large, are retried, and the app stops. With ``message.max.bytes``
at most the topic's, librdkafka keeps batches within it and refuses a record too large for it on its own, in
``produce`` (its input then goes to the dead-letter queue).
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


def check_reachable(client: Any, brokers: frozenset[str], timeout: float, queue: QueueSpec) -> None:
    """Fail at start-up, not on the first message, when no broker answers."""
    cluster_metadata(client, f"queue {queue.name!r}", ", ".join(sorted(brokers)), timeout)


def check_batch_limit(config: dict[str, Any], queue: QueueSpec, timeout: float, *, owner: str) -> None:
    """Fail at start-up when the queue's topic refuses batches the producer may build (see the module's doc).

    ``owner``: whose config sets the producer's ``message.max.bytes`` (the queue's, or exactly-once the input's).
    A topic that does not exist yet, or whose configuration may not be read (ACLs), is not checked."""
    allowed = int(config.get("message.max.bytes", MESSAGE_MAX_BYTES))
    limit = topic_max_message_bytes(config, queue.value, timeout, what=f"queue {queue.name!r}")
    if limit is None or allowed <= limit:
        return
    raise ConfigurationError(
        f"queue {queue.name!r}: topic {queue.value!r} accepts record batches of at most {limit} bytes (its "
        f"max.message.bytes) and the producer builds them up to {allowed} bytes (message.max.bytes): the broker "
        "would refuse a large batch whole, good records with it, and the app would stop. Set "
        f'"message.max.bytes": {limit} in the config of {owner} (a record larger than that then goes to the '
        "dead-letter queue on its own), or raise the topic's max.message.bytes")


def topic_max_message_bytes(config: dict[str, Any], topic: str, timeout: float, *, what: str) -> int | None:
    """The topic's ``max.message.bytes``; None when it cannot be read (no such topic yet, no permission)."""
    admin = make_client(with_callbacks(admin_config(config)), what, AdminClient)
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(timeout)
        return int(entries["max.message.bytes"].value)
    except (KafkaException, KeyError, ValueError, TypeError) as exc:
        logger.info("%s: cannot read the max.message.bytes of topic %r (%s); not checked", what, topic, exc)
        return None
