"""Consumers, producers and records of the sqlite connector for the tests of tests/sqlite."""

from __future__ import annotations

import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest

from volley.message import OutgoingMessage
from volley.ports import QueueSpec
from volley.testing.contract import DeliveryRecorder
from volley_sqlite import SqliteConnector, SqliteConsumer, schema


def spec(path: Path, name: str = "jobs", role: str = "input", **config: Any) -> QueueSpec:
    return QueueSpec(name=name, value=name, connector="sqlite", config={"path": str(path), **config}, role=role)


async def open_consumer(path: Path, name: str = "jobs", **config: Any) -> SqliteConsumer:
    consumer = SqliteConnector().create_consumer(spec(path, name, **config))
    await consumer.start()
    return consumer


async def produce(path: Path, messages: Sequence[OutgoingMessage], **config: Any) -> None:
    producer = SqliteConnector().create_producer(spec(path, role="output", **config))
    await producer.start()
    try:
        recorder = DeliveryRecorder()
        producer.produce(messages, recorder)
        await producer.flush(10)
        recorder.assert_all_delivered(messages)
    finally:
        await producer.close()


def records(name: str, count: int, *, start: int = 0, key: bytes | None = None) -> list[OutgoingMessage]:
    return [OutgoingMessage(name, f"m-{i:05d}".encode(), key, token=i) for i in range(start, start + count)]


def trace_statements(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every SQL statement of the connections opened from now on (the database threads' among them), in order."""
    statements: list[str] = []
    opened = schema.connect

    def traced(*args: Any, **kwargs: Any) -> sqlite3.Connection:
        conn = opened(*args, **kwargs)
        conn.set_trace_callback(statements.append)
        return conn

    monkeypatch.setattr(schema, "connect", traced)
    return statements
