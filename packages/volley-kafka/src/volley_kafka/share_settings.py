"""From a ``confluent-share`` queue's ``config`` to share-consumer settings (Kafka share groups, KIP-932).

Runs once, when the engine resolves the queue and again when it creates the consumer, so that a setting a
share group cannot honour fails at start-up saying what to change. The group's own settings
(``share.auto.offset.reset``, ``share.record.lock.duration.ms``, ``share.delivery.count.limit``) belong to the
broker: they are set with an admin call (docs/connectors/kafka-share.md), never by a member.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from volley.errors import ConfigurationError
from volley.ports import QueueSpec
from volley_kafka.settings import (
    EXACTLY_ONCE,
    PRODUCER_ONLY,
    STARTUP_TIMEOUT,
    consumer_source,
    is_true,
    seconds_setting,
    split_config,
)

logger = logging.getLogger("volley_kafka")

SHARE_CONSUMERS = "volley.share.consumers"
DELIVERY_LIMIT = "volley.share.delivery.limit"
SHARE_KEYS: dict[str, Any] = {
    STARTUP_TIMEOUT: 30.0,
    SHARE_CONSUMERS: 3,
    DELIVERY_LIMIT: 5,  # the broker's default group.share.delivery.count.limit
    EXACTLY_ONCE: False,
}
DEFAULT_MAX_POLL_RECORDS = 100
"""Records one share consumer acquires per poll: each one's lock runs from then on, so a worker should not take
more than it handles within the lock duration (30 s by default)."""

# Consumer-group settings that a share consumer refuses (librdkafka fails to build it): py-volley users often share
# one dict between queues, so they are dropped with a word on where the setting lives for a share group.
BROKER_SIDE = {
    "auto.offset.reset": "the group's share.auto.offset.reset (an admin call, see the share-group docs)",
    "session.timeout.ms": "the broker's group.share.session.timeout.ms",
    "heartbeat.interval.ms": "the broker's group.share.heartbeat.interval.ms",
    "isolation.level": "the group's share.isolation.level",
}
NOT_FOR_SHARE = frozenset({
    "enable.auto.commit", "enable.auto.offset.store", "auto.commit.interval.ms", "enable.partition.eof",
    "partition.assignment.strategy", "group.instance.id", "group.protocol", "group.remote.assignor",
    "queued.max.messages.kbytes", "queued.min.messages", "fetch.queue.backoff.ms", "on_commit", "transactional.id",
    "transaction.timeout.ms", *BROKER_SIDE,
})


@dataclass(frozen=True)
class ShareSettings:
    topics: tuple[str, ...]
    group_id: str
    librdkafka: dict[str, Any]
    consumers: int
    delivery_limit: int
    startup_timeout: float


def delivery_limit(queue: QueueSpec) -> int:
    """The group's delivery count limit as the queue's config states it (the broker's default if unset)."""
    volley, _ = split_config(queue.config, queue, SHARE_KEYS)
    return _count(volley, DELIVERY_LIMIT, queue, minimum=2)


def share_settings(queue: QueueSpec) -> ShareSettings:
    volley, config = split_config(queue.config, queue, SHARE_KEYS)
    if is_true(volley[EXACTLY_ONCE]):
        raise ConfigurationError(
            f"queue {queue.name!r}: exactly-once is not offered on a share group (records are acknowledged one "
            "by one, with no offsets to commit in a transaction). Remove volley.exactly.once, or consume "
            "through a consumer group with the confluent-eos profile"
        )
    topics, group_id = consumer_source(config, queue, "a share consumer needs a share group")
    dropped = sorted(k for k in config if k in NOT_FOR_SHARE)
    if dropped:
        where = "; ".join(f"{k}: {BROKER_SIDE[k]}" for k in dropped if k in BROKER_SIDE)
        logger.info("queue %r: ignoring %s, which a share consumer does not take%s", queue.name,
                    ", ".join(dropped), f" ({where})" if where else "")
    librdkafka = {k: v for k, v in config.items() if k not in NOT_FOR_SHARE and k not in PRODUCER_ONLY}
    mode = str(librdkafka.get("share.acknowledgement.mode", "explicit")).strip().lower()
    if mode != "explicit":
        raise ConfigurationError(
            f"queue {queue.name!r}: share.acknowledgement.mode must be 'explicit' (got {mode!r}): in implicit "
            "mode the next poll accepts records whose handler has not finished, and a crash would lose them"
        )
    librdkafka["group.id"] = group_id
    librdkafka["share.acknowledgement.mode"] = "explicit"
    librdkafka.setdefault("max.poll.records", DEFAULT_MAX_POLL_RECORDS)
    return ShareSettings(
        topics=topics,
        group_id=group_id,
        librdkafka=librdkafka,
        consumers=_count(volley, SHARE_CONSUMERS, queue, minimum=1),
        delivery_limit=_count(volley, DELIVERY_LIMIT, queue, minimum=2),
        startup_timeout=seconds_setting(volley, STARTUP_TIMEOUT, queue),
    )


def _count(volley: dict[str, Any], key: str, queue: QueueSpec, *, minimum: int) -> int:
    value = volley[key]
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = minimum - 1
    if number < minimum or isinstance(value, bool) or str(number) != str(value).strip():
        raise ConfigurationError(f"queue {queue.name!r}: {key} must be a whole number >= {minimum}, got {value!r}")
    return number
