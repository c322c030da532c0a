"""Just enough of Kafka's wire protocol to tell that a broker serves clients: ApiVersions and Metadata.

Asked directly over a socket (no client library), so that the test tooling needs nothing but the standard library
to know when a broker it started is ready, and what it advertises.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass
from typing import Any

from services.kafka_dist import KafkaError

_API_METADATA = 3
_API_VERSIONS = 18
_CLIENT_ID = b"volley-services"


@dataclass(frozen=True)
class BrokerInfo:
    """One broker as the cluster advertises it to clients."""

    node_id: int
    host: str
    port: int


@dataclass(frozen=True)
class ClusterMetadata:
    """The parts of a Metadata response that prove the broker has joined its own cluster and can serve clients."""

    cluster_id: str | None
    controller_id: int
    brokers: tuple[BrokerInfo, ...]


class _Reader:
    def __init__(self, data: bytes) -> None:
        self._data = data
        self._pos = 0

    def _take(self, fmt: str) -> Any:
        value = struct.unpack_from(fmt, self._data, self._pos)[0]
        self._pos += struct.calcsize(fmt)
        return value

    def int16(self) -> int:
        return int(self._take(">h"))

    def int32(self) -> int:
        return int(self._take(">i"))

    def nullable_string(self) -> str | None:
        length = self.int16()
        if length < 0:
            return None
        raw = self._data[self._pos : self._pos + length]
        self._pos += length
        return raw.decode("utf-8")

    def string(self) -> str:
        value = self.nullable_string()
        if value is None:
            raise KafkaError("unexpected null string in a Kafka response")
        return value


def _recv_exact(sock: socket.socket, size: int) -> bytes:
    chunks = bytearray()
    while len(chunks) < size:
        chunk = sock.recv(size - len(chunks))
        if not chunk:
            raise ConnectionError("Kafka broker closed the connection mid-response")
        chunks += chunk
    return bytes(chunks)


def _roundtrip(sock: socket.socket, api_key: int, api_version: int, correlation_id: int, body: bytes) -> _Reader:
    """Request header v1 and response header v0: the non-flexible versions used here need no tagged fields."""
    header = struct.pack(">hhih", api_key, api_version, correlation_id, len(_CLIENT_ID)) + _CLIENT_ID
    payload = header + body
    sock.sendall(struct.pack(">i", len(payload)) + payload)
    (size,) = struct.unpack(">i", _recv_exact(sock, 4))
    reader = _Reader(_recv_exact(sock, size))
    got = reader.int32()
    if got != correlation_id:
        raise KafkaError(f"Kafka response correlation id {got} != request {correlation_id}")
    return reader


def _api_versions(sock: socket.socket) -> dict[int, tuple[int, int]]:
    # v0 is answered by every broker: one that cannot serve a version still replies in v0 with its ranges.
    reader = _roundtrip(sock, _API_VERSIONS, 0, 1, b"")
    error = reader.int16()
    if error != 0:
        raise KafkaError(f"ApiVersions returned error code {error}")
    ranges: dict[int, tuple[int, int]] = {}
    for _ in range(reader.int32()):
        key, low, high = reader.int16(), reader.int16(), reader.int16()
        ranges[key] = (low, high)
    return ranges


def api_versions(host: str, port: int, timeout: float = 5.0) -> dict[int, tuple[int, int]]:
    """Map of API key -> (min, max) version the broker serves: proof that something speaking Kafka answers."""
    with socket.create_connection((host, port), timeout=timeout) as sock:
        return _api_versions(sock)


def request_metadata(host: str, port: int, timeout: float = 5.0) -> ClusterMetadata:
    """Ask for cluster metadata as a client would; a broker lists itself only once it is registered and unfenced.

    Versions 4..8 share one non-flexible layout (Kafka 4.0 dropped 0..3), so the probe picks the lowest of those
    that the broker serves instead of hard-coding one that a future release might retire.
    """
    with socket.create_connection((host, port), timeout=timeout) as sock:
        ranges = _api_versions(sock)
        low, high = ranges.get(_API_METADATA, (0, -1))
        version = max(low, 4)
        if version > min(high, 8):
            raise KafkaError(f"broker serves Metadata v{low}..v{high}; this probe speaks v4..v8")
        # topics = null (all topics), allow_auto_topic_creation = false
        reader = _roundtrip(sock, _API_METADATA, version, 2, struct.pack(">ib", -1, 0))
    reader.int32()  # throttle_time_ms
    brokers = []
    for _ in range(reader.int32()):
        node_id, node_host, node_port = reader.int32(), reader.string(), reader.int32()
        reader.nullable_string()  # rack
        brokers.append(BrokerInfo(node_id, node_host, node_port))
    cluster_id = reader.nullable_string()
    controller_id = reader.int32()
    return ClusterMetadata(cluster_id, controller_id, tuple(brokers))
