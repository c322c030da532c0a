"""The envelope of a consumed Kafka record: what most handlers never read is read from the record when asked.

Building an Envelope is on the per-message path. A record's key, headers and timestamp are each a call into
confluent-kafka (and the headers a copy); most handlers read none of them. ``KafkaEnvelope`` keeps the record
(``handle``) and answers them from it on each access, which takes about half the cost of building an envelope
off every message. They are read-only here: they are the record's.
"""

from __future__ import annotations

from typing import Any

from volley.message import Envelope, Headers


class KafkaEnvelope(Envelope):
    """``era``: how many times partitions had been released (``Fetcher.releases``) when the record was fetched; an
    exactly-once commit refuses inputs whose partition was released since (transactional.py)."""

    __slots__ = ("era",)

    def __init__(self, value: bytes, source: str, partition: int, offset: int, attempt: int, record: Any,
                 era: int = 0) -> None:
        self.value = value
        self.source = source
        self.partition = partition
        self.position = offset
        self.attempt = attempt
        self.handle = record
        self.pending = 0
        self.era = era

    @property
    def key(self) -> bytes | None:
        key: bytes | None = self.handle.key()
        return key

    @key.setter
    def key(self, value: bytes | None) -> None:
        _read_only("key")

    @property
    def headers(self) -> Headers | None:
        headers = self.handle.headers()
        return dict(headers) if headers else None

    @headers.setter
    def headers(self, value: Headers | None) -> None:
        _read_only("headers")

    @property
    def timestamp(self) -> float | None:
        kind, stamp = self.handle.timestamp()
        return stamp / 1000.0 if kind else None

    @timestamp.setter
    def timestamp(self, value: float | None) -> None:
        _read_only("timestamp")


def _read_only(name: str) -> None:
    raise AttributeError(f"a consumed Kafka record's {name} cannot be changed")
