"""The sqlite connector against the connector contract and the Hypothesis state machine, on a real file."""

from __future__ import annotations

import itertools
import tempfile
from pathlib import Path
from typing import Any, ClassVar

import pytest

from volley.ports import Connector, QueueSpec
from volley.testing.contract import BrowsingTests, ConnectorContract
from volley.testing.statemachine import connector_state_machine
from volley_sqlite import SqliteConnector


def sqlite_spec(path: Path, name: str, role: str, **config: Any) -> QueueSpec:
    return QueueSpec(name=name, value=name, connector="sqlite", config={"path": str(path), **config}, role=role)


class TestSqliteContract(ConnectorContract, BrowsingTests):
    """Ordered (a partition is held by one consumer at a time), three partitions: the memory broker's capabilities."""

    partitions = 3
    supports_partitions = True
    supports_delay = True
    supports_nack_delay = True
    counts_attempts = True  # the attempts column counts every delivery, across restarts
    max_wait_seconds = 5.0
    extra_config: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Path) -> None:
        self.path = tmp_path / "queues.sqlite3"

    def make_connector(self) -> Connector:
        return SqliteConnector()

    def queue_spec(self, name: str, role: str) -> QueueSpec:
        return sqlite_spec(self.path, name, role, partitions=self.partitions, **self.extra_config)


class TestSqliteContractOnePartition(TestSqliteContract):
    partitions = 1


class TestSqliteContractCompeting(TestSqliteContract):
    """``ordered: false`` (competing consumers), retained acks and synchronous=normal: the other code paths."""

    extra_config: ClassVar[dict[str, Any]] = {"ordered": False, "retention_seconds": 3600, "synchronous": "normal"}


class _FreshDatabase:
    """Each state-machine example gets its own file: make_connector runs first, then make_spec."""

    directory = Path(tempfile.mkdtemp(prefix="volley-sqlite-machine-"))
    counter = itertools.count()
    path = directory / "0.sqlite3"

    @classmethod
    def make_connector(cls) -> Connector:
        cls.path = cls.directory / f"{next(cls.counter)}.sqlite3"
        return SqliteConnector()

    @classmethod
    def make_spec(cls, name: str, role: str) -> QueueSpec:
        return sqlite_spec(cls.path, name, role, partitions=3)


TestSqliteStateMachine = connector_state_machine(
    _FreshDatabase.make_connector,
    _FreshDatabase.make_spec,
    **TestSqliteContract.capabilities(),
    poll_timeout=0.0,
    name="Sqlite",
).TestCase
