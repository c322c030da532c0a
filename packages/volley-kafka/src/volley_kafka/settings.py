"""From a queue's ``config`` and the environment to librdkafka settings plus Volley's own knobs.

Everything here runs once, when the engine creates a consumer or producer, so
that a wrong setting fails at start-up with a message that says what to change.
The environment variables are py-volley's: KAFKA_BROKERS, KAFKA_CONSUMER_BROKERS,
KAFKA_PRODUCER_BROKERS, KAFKA_KEY, KAFKA_SECRET and KAFKA_CONSUMER_GROUP.
"""

from __future__ import annotations

import logging
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volley.errors import ConfigurationError
from volley.ports import QueueSpec
from volley.redaction import redacted_repr

logger = logging.getLogger("volley_kafka")

VOLLEY_PREFIX = "volley."

FETCH_QUEUE_BACKOFF_MS = 50
"""Volley's default for librdkafka's ``fetch.queue.backoff.ms`` (librdkafka's: 1,000): see ``consumer_settings``."""

# Volley's own settings (stripped before the rest goes to librdkafka), with their defaults.
COMMIT_INTERVAL = "volley.commit.interval.seconds"
REVOKE_TIMEOUT = "volley.revoke.timeout.seconds"
STARTUP_TIMEOUT = "volley.startup.timeout.seconds"
EXACTLY_ONCE = "volley.exactly.once"
TRANSACTIONAL_ID = "volley.transactional.id"
VOLLEY_KEYS = {
    COMMIT_INTERVAL: 1.0,
    REVOKE_TIMEOUT: 60.0,
    STARTUP_TIMEOUT: 30.0,
    EXACTLY_ONCE: False,
    TRANSACTIONAL_ID: None,
}

# py-volley read these from the same config dict; Volley takes them from the Engine instead.
PYVOLLEY_KEYS = {
    "poll_interval": "Engine(poll_interval_seconds=...)",
    "stop_on_failure": "Engine(on_failure='stop' | 'continue')",
    "batch_size": "the queue's batch_size= setting (or Engine(consume_batch_size=...))",
    "batch_time_seconds": "nothing: a batch is what one fetch brought (up to the queue's batch_size); Volley "
                          "does not wait to fill one",
    "poll_thread_timeout": "nothing (Volley's producer polls on its own thread)",
}

# Properties of only one side: py-volley users often share one dict between inputs and outputs,
# so the other side's properties are dropped quietly instead of making librdkafka warn.
CONSUMER_ONLY = frozenset({
    "group.id", "group.instance.id", "group.protocol", "group.remote.assignor", "auto.offset.reset",
    "enable.auto.commit", "enable.auto.offset.store", "auto.commit.interval.ms", "isolation.level",
    "session.timeout.ms", "heartbeat.interval.ms", "max.poll.interval.ms", "partition.assignment.strategy",
    "enable.partition.eof", "fetch.min.bytes", "fetch.max.bytes", "fetch.wait.max.ms", "fetch.error.backoff.ms",
    "fetch.queue.backoff.ms", "fetch.message.max.bytes", "max.partition.fetch.bytes", "queued.min.messages",
    "queued.max.messages.kbytes",
    "check.crcs", "consume.callback.max.messages", "coordinator.query.interval.ms", "on_commit",
})
PRODUCER_ONLY = frozenset({
    "acks", "request.required.acks", "enable.idempotence", "enable.gapless.guarantee", "linger.ms",
    "queue.buffering.max.ms", "batch.size", "batch.num.messages", "compression.type", "compression.codec",
    "compression.level", "message.timeout.ms", "delivery.timeout.ms", "retries", "message.send.max.retries",
    "queue.buffering.max.messages", "queue.buffering.max.kbytes", "transactional.id", "transaction.timeout.ms",
    "partitioner", "sticky.partitioning.linger.ms", "delivery.report.only.error", "dr_cb", "dr_msg_cb",
    "on_delivery", "request.timeout.ms", "queue.buffering.backpressure.threshold",
})


# The consumer group protocols librdkafka speaks. Under ``consumer`` (KIP-848) the broker runs the group: the
# client rejects the classic protocol's member-side settings, so Volley never sets them and names the fix when a
# user does (librdkafka's own error only surfaces when the client is built, without the queue's name).
GROUP_PROTOCOLS = ("classic", "consumer")
CLASSIC_ONLY = {
    "session.timeout.ms": "the broker's group.consumer.session.timeout.ms (or a group config) sets it",
    "heartbeat.interval.ms": "the broker's group.consumer.heartbeat.interval.ms (or a group config) sets it",
    "partition.assignment.strategy": "choose the broker-side assignor with group.remote.assignor instead",
}


class _Redacted:
    """A settings dataclass whose repr names its secrets but never shows them (tracebacks with locals,
    error trackers and debuggers print it)."""

    def __repr__(self) -> str:
        return redacted_repr(self)


@dataclass(frozen=True, repr=False)
class ConsumerSettings(_Redacted):
    topics: tuple[str, ...]
    group_id: str
    librdkafka: dict[str, Any]
    commit_interval: float
    revoke_timeout: float
    startup_timeout: float
    exactly_once: bool
    transactional_id: str | None
    producer_librdkafka: dict[str, Any]  # the transactional producer's settings, in exactly-once mode


@dataclass(frozen=True, repr=False)
class ProducerSettings(_Redacted):
    librdkafka: dict[str, Any]
    startup_timeout: float

    @property
    def cache_key(self) -> tuple[tuple[str, str], ...]:
        """Producers with equal settings share one librdkafka client (and its connections and batches)."""
        return tuple(sorted((str(k), repr(v)) for k, v in self.librdkafka.items()))


def split_config(config: Mapping[str, Any], queue: QueueSpec,
                 known: Mapping[str, Any] = VOLLEY_KEYS) -> tuple[dict[str, Any], dict[str, Any]]:
    """Separate Volley's own settings (``known``, with their defaults) from the librdkafka ones; reject unknown
    ``volley.*`` keys."""
    volley: dict[str, Any] = dict(known)
    rdkafka: dict[str, Any] = {}
    for raw_key, value in config.items():
        key = str(raw_key)
        if key.startswith(VOLLEY_PREFIX):
            if key not in known:
                raise ConfigurationError(
                    f"queue {queue.name!r}: unknown Volley Kafka setting {key!r}; known: {sorted(known)}"
                )
            volley[key] = value
        elif key in PYVOLLEY_KEYS:
            logger.info("queue %r: ignoring py-volley setting %r in config; in Volley: %s",
                        queue.name, key, PYVOLLEY_KEYS[key])
        else:
            rdkafka[key] = value
    return volley, rdkafka


def resolve_brokers(config: dict[str, Any], role_variable: str, queue: QueueSpec) -> None:
    if config.get("bootstrap.servers"):
        return
    servers = os.environ.get(role_variable) or os.environ.get("KAFKA_BROKERS")
    if not servers:
        raise ConfigurationError(
            f"queue {queue.name!r} ({queue.value}): no Kafka brokers configured; set 'bootstrap.servers' in its "
            f"config or the environment variable KAFKA_BROKERS (or {role_variable})"
        )
    config["bootstrap.servers"] = servers


def apply_credentials(config: dict[str, Any]) -> None:
    """KAFKA_KEY / KAFKA_SECRET mean SASL_SSL with PLAIN, as in py-volley; explicit settings win."""
    if "sasl.username" in config or "sasl.password" in config:
        return
    username, password = os.environ.get("KAFKA_KEY"), os.environ.get("KAFKA_SECRET")
    if username is not None and password is not None:
        config["sasl.username"] = username
        config["sasl.password"] = password
        config.setdefault("security.protocol", "SASL_SSL")
        config.setdefault("sasl.mechanism", "PLAIN")


def seconds_setting(volley: Mapping[str, Any], key: str, queue: QueueSpec, *, allow_zero: bool = True) -> float:
    value = volley[key]
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(f"queue {queue.name!r}: {key} must be a number of seconds, got {value!r}") from None
    if number < 0 or (number == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigurationError(f"queue {queue.name!r}: {key} must be {bound}, got {value!r}")
    return number


def is_true(value: Any) -> bool:
    if isinstance(value, str):
        return value.strip().lower() in ("1", "true", "yes", "on")
    return bool(value)


def brokers_of(config: Mapping[str, Any]) -> frozenset[str]:
    """A comparable form of ``bootstrap.servers``."""
    return frozenset(s.strip() for s in str(config.get("bootstrap.servers", "")).split(",") if s.strip())


def consumer_source(config: dict[str, Any], queue: QueueSpec, needs: str) -> tuple[tuple[str, ...], str]:
    """The topics a consumer of ``queue`` reads (its value, comma-separated) and its group; resolves the brokers
    and credentials into ``config`` (a consumer group's and a share group's consumers alike)."""
    topics = tuple(t.strip() for t in queue.value.split(",") if t.strip())
    if not topics:
        raise ConfigurationError(f"queue {queue.name!r}: its value must name a topic (or a comma-separated list)")
    resolve_brokers(config, "KAFKA_CONSUMER_BROKERS", queue)
    apply_credentials(config)
    group_id = config.get("group.id") or os.environ.get("KAFKA_CONSUMER_GROUP")
    if not group_id:
        raise ConfigurationError(
            f"queue {queue.name!r} ({queue.value}): {needs}; set 'group.id' in its config or the environment "
            "variable KAFKA_CONSUMER_GROUP"
        )
    return topics, str(group_id)


def consumer_settings(queue: QueueSpec) -> ConsumerSettings:
    volley, config = split_config(queue.config, queue)
    topics, group_id = consumer_source(config, queue, "a Kafka consumer needs a consumer group")
    config["group.id"] = group_id

    commit_interval = seconds_setting(volley, COMMIT_INTERVAL, queue)
    if COMMIT_INTERVAL not in queue.config and "auto.commit.interval.ms" in config:
        # py-volley committed on librdkafka's timer; honour the interval its users configured.
        commit_interval = float(config["auto.commit.interval.ms"]) / 1000.0
    if is_true(config.get("enable.auto.commit", False)):
        logger.warning(
            "queue %r: enable.auto.commit=true is overridden to false: librdkafka would commit offsets of messages "
            "that are consumed but not yet processed, so a crash would lose them. Volley commits the highest offset "
            "below which every message is finished, every %s s (tune with %s).",
            queue.name, commit_interval, COMMIT_INTERVAL,
        )
    if is_true(config.get("enable.auto.offset.store", False)):
        logger.warning("queue %r: enable.auto.offset.store=true is overridden to false (Volley tracks offsets itself)",
                       queue.name)
    exactly_once = is_true(volley[EXACTLY_ONCE])
    producer_side = {k: v for k, v in config.items() if k not in CONSUMER_ONLY}
    consumer_side = {k: v for k, v in config.items() if k not in PRODUCER_ONLY}
    consumer_side["enable.auto.commit"] = False
    consumer_side["enable.auto.offset.store"] = False
    consumer_side.setdefault("auto.offset.reset", "earliest")  # py-volley's default
    consumer_side.setdefault("enable.partition.eof", False)
    # librdkafka postpones a partition's next fetch by this much once its prefetch queue is past queued.min.messages
    # (or queued.max.messages.kbytes): 1,000 ms by default, and a worker that empties the queue sooner waits out
    # the rest of it with nothing to do (a third of the Kafka bench's throughput; up to a second per refill). The
    # queue is refilled within 50 ms of falling below the threshold instead; what it costs is a check per 50 ms
    # per partition while the queue is full, no request to the broker.
    consumer_side.setdefault("fetch.queue.backoff.ms", FETCH_QUEUE_BACKOFF_MS)
    consumer_side.pop("auto.commit.interval.ms", None)
    _check_group_protocol(consumer_side, queue)

    transactional_id: str | None = None
    if exactly_once:
        isolation = str(consumer_side.get("isolation.level", "read_committed"))
        if isolation != "read_committed":
            raise ConfigurationError(
                f"queue {queue.name!r}: exactly-once needs isolation.level=read_committed, got {isolation!r}"
            )
        consumer_side["isolation.level"] = "read_committed"
        transactional_id = str(
            volley[TRANSACTIONAL_ID]
            or config.get("transactional.id")
            # Unique per worker process; a stable id (one per pod) makes a restarted worker fence its
            # predecessor at once instead of waiting for transaction.timeout.ms: set volley.transactional.id.
            or f"volley-{queue.app_name}-{group_id}-{socket.gethostname()}-{os.getpid()}"
        )
        producer_side["transactional.id"] = transactional_id
        producer_side.setdefault("transaction.timeout.ms", 10_000)
        producer_side["enable.idempotence"] = True
    else:
        producer_side.pop("transactional.id", None)
    return ConsumerSettings(
        topics=topics,
        group_id=str(group_id),
        librdkafka=consumer_side,
        commit_interval=commit_interval,
        revoke_timeout=seconds_setting(volley, REVOKE_TIMEOUT, queue, allow_zero=False),
        startup_timeout=seconds_setting(volley, STARTUP_TIMEOUT, queue),
        exactly_once=exactly_once,
        transactional_id=transactional_id,
        producer_librdkafka=_producer_defaults(producer_side),
    )


def _check_group_protocol(config: dict[str, Any], queue: QueueSpec) -> None:
    protocol = str(config.get("group.protocol", "classic")).strip().lower()
    if protocol not in GROUP_PROTOCOLS:
        raise ConfigurationError(
            f"queue {queue.name!r}: group.protocol must be one of {', '.join(GROUP_PROTOCOLS)}, "
            f"got {config['group.protocol']!r}"
        )
    if protocol != "consumer":
        return
    rejected = [key for key in CLASSIC_ONLY if key in config]
    if rejected:
        reasons = "; ".join(f"{key}: {CLASSIC_ONLY[key]}" for key in rejected)
        raise ConfigurationError(
            f"queue {queue.name!r}: {', '.join(rejected)} cannot be set with group.protocol=consumer (KIP-848), "
            f"where the broker runs the consumer group ({reasons}). Remove {'them' if len(rejected) > 1 else 'it'} "
            "from the queue's config, or set group.protocol=classic to keep the classic protocol"
        )


def _producer_defaults(config: dict[str, Any]) -> dict[str, Any]:
    config.setdefault("enable.idempotence", True)
    return config


def producer_settings(queue: QueueSpec) -> ProducerSettings:
    volley, config = split_config(queue.config, queue)
    resolve_brokers(config, "KAFKA_PRODUCER_BROKERS", queue)
    apply_credentials(config)
    config = {k: v for k, v in config.items() if k not in CONSUMER_ONLY}
    if "transactional.id" in config:
        raise ConfigurationError(
            f"queue {queue.name!r}: transactional.id belongs on the input queue, with {EXACTLY_ONCE}=true (or the "
            "confluent-eos profile); Volley then makes every Kafka output of the app transactional"
        )
    return ProducerSettings(librdkafka=_producer_defaults(config),
                            startup_timeout=seconds_setting(volley, STARTUP_TIMEOUT, queue))


def browser_settings(queue: QueueSpec) -> dict[str, Any]:
    """librdkafka settings of a ``volley dlq`` reader of ``queue``: its connection settings (a dead-letter queue's
    config is a producer's), without group or producer settings, under a consumer group of its own that commits
    only what a replay or purge dealt with."""
    _volley, config = split_config(queue.config, queue)
    resolve_brokers(config, "KAFKA_CONSUMER_BROKERS", queue)
    apply_credentials(config)
    config = {k: v for k, v in config.items() if k not in CONSUMER_ONLY and k not in PRODUCER_ONLY}
    config.update({"group.id": f"volley-dlq.{queue.app_name}.{queue.value}", "enable.auto.commit": False,
                   "enable.auto.offset.store": False, "enable.partition.eof": True,
                   "auto.offset.reset": "earliest", "isolation.level": "read_committed"})
    return config
