"""The in-memory broker: a real connector, not a mock, and Volley's embedded default.

A ``MemoryBroker`` holds named queues split into partitions by key. A message
is delivered to one consumer at a time and stays owned by it until acked;
a nack or a consumer that closes without acking puts it back (at the head of
its partition, so order is kept) with its attempt count raised. Several
engines in one process, even on different threads and event loops, can share
a broker: it is guarded by a lock and wakes waiting consumers on their own
loops.
"""

from volley.memory.broker import (
    DEFAULT_BROKER_LOG_LIMIT,
    DEFAULT_LOG_LIMIT,
    MemoryBroker,
    default_broker,
    reset_default_broker,
)
from volley.memory.connector import (
    MIN_EMPTY_POLL_WAIT,
    MemoryBrowser,
    MemoryConnector,
    MemoryConsumer,
    MemoryProducer,
    broker_from_config,
)

__all__ = [
    "DEFAULT_BROKER_LOG_LIMIT",
    "DEFAULT_LOG_LIMIT",
    "MIN_EMPTY_POLL_WAIT",
    "MemoryBroker",
    "MemoryBrowser",
    "MemoryConnector",
    "MemoryConsumer",
    "MemoryProducer",
    "broker_from_config",
    "default_broker",
    "reset_default_broker",
]
