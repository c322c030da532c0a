"""The envelope that crosses the ports, and the records the engine hands to producers.

Both are plain ``__slots__`` classes rather than dataclasses: one is built per
message on the hot path, and every attribute and allocation there is paid for
at tens of thousands of messages per second.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

Headers = dict[str, bytes]

_NO_HEADERS: Mapping[str, bytes] = MappingProxyType({})


class Envelope:
    """One consumed message as a connector delivers it, before deserialization.

    ``position`` is whatever identifies the message to its broker (an offset for
    Kafka, a message id for RSMQ, a sequence number in memory). ``partition``
    is the ordering unit the broker guarantees (a Kafka partition; ``None`` when
    the broker has none). ``attempt`` counts deliveries, starting at 1, where
    the broker knows it (RSMQ's receive count, the memory broker's redelivery
    count); the engine adds its own in-process retries on top.

    ``handle`` is reserved for the connector that produced the envelope (a
    native message object, a receipt) and ``pending`` for the engine's
    bookkeeping of unconfirmed outputs; neither is part of the user API.
    """

    __slots__ = (
        "value",
        "key",
        "headers",
        "source",
        "partition",
        "position",
        "timestamp",
        "attempt",
        "handle",
        "pending",
    )

    def __init__(
        self,
        value: bytes,
        key: bytes | None = None,
        headers: Headers | None = None,
        source: str = "",
        partition: int | None = None,
        position: Any = None,
        timestamp: float | None = None,
        attempt: int = 1,
        handle: Any = None,
    ) -> None:
        self.value = value
        self.key = key
        self.headers = headers
        self.source = source
        self.partition = partition
        self.position = position
        self.timestamp = timestamp
        self.attempt = attempt
        self.handle = handle
        self.pending = 0

    def describe(self) -> str:
        """A short location for logs and error messages: where to find this message."""
        where = self.source
        if self.partition is not None:
            where += f"[{self.partition}]"
        return f"{where}@{self.position}"

    def __repr__(self) -> str:
        return (
            f"Envelope(source={self.source!r}, partition={self.partition!r}, position={self.position!r}, "
            f"key={self.key!r}, attempt={self.attempt}, value={self.value[:64]!r})"
        )


class OutgoingMessage:
    """A serialized message on its way to a producer.

    ``token`` is opaque to producers: they hand it back in delivery reports so
    that the engine can tell which input an output belonged to.
    """

    __slots__ = ("topic", "value", "key", "headers", "partition", "delay", "token")

    def __init__(
        self,
        topic: str,
        value: bytes,
        key: bytes | None = None,
        headers: Headers | None = None,
        partition: int | None = None,
        delay: float | None = None,
        token: Any = None,
    ) -> None:
        self.topic = topic
        self.value = value
        self.key = key
        self.headers = headers
        self.partition = partition
        self.delay = delay
        self.token = token

    def __repr__(self) -> str:
        return f"OutgoingMessage(topic={self.topic!r}, key={self.key!r}, value={self.value[:64]!r})"


class MessageContext:
    """What a handler may learn about the message it is processing (the ``msg_ctx`` argument).

    It mirrors py-volley's ``msg_ctx`` (the connector's raw message) and adds the
    broker-neutral fields, so handlers need not know which connector fed them.
    """

    __slots__ = ("envelope", "queue_name", "app_name")

    def __init__(self, envelope: Envelope, queue_name: str, app_name: str) -> None:
        self.envelope = envelope
        self.queue_name = queue_name
        self.app_name = app_name

    @property
    def key(self) -> bytes | None:
        return self.envelope.key

    @property
    def headers(self) -> Mapping[str, bytes]:
        """The message's headers, read-only: they are the broker's own record (a redelivery shows them as they
        were sent). Copy them (``dict(msg_ctx.headers)``) to build an output's headers from them."""
        headers = self.envelope.headers
        return MappingProxyType(headers) if headers else _NO_HEADERS

    @property
    def partition(self) -> int | None:
        return self.envelope.partition

    @property
    def position(self) -> Any:
        return self.envelope.position

    @property
    def attempt(self) -> int:
        return self.envelope.attempt

    @property
    def raw(self) -> Any:
        """The connector's native message object, when it has one (py-volley handed this over as msg_ctx)."""
        return self.envelope.handle

    def __repr__(self) -> str:
        return f"MessageContext({self.envelope.describe()}, attempt={self.attempt})"


def to_bytes(value: str | bytes | None) -> bytes | None:
    """Keys and header values may be given as str by handlers; brokers want bytes."""
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()
