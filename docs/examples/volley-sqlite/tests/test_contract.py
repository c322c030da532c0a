"""volley-sqlite against Volley's connector contract and its Hypothesis state
machine."""

from __future__ import annotations

from pathlib import Path

import hypothesis
import pytest
from hypothesis.stateful import run_state_machine_as_test

from volley.ports import Connector, QueueSpec
from volley.testing.contract import ConnectorContract
from volley.testing.statemachine import DEFAULT_SETTINGS, connector_state_machine
from volley_sqlite import SqliteConnector


def sqlite_spec(path: Path, name: str, role: str) -> QueueSpec:
    return QueueSpec(
        name=name, value=name, connector="sqlite", config={"path": str(path)}, role=role
    )


class TestSqliteContract(ConnectorContract):
    # What this broker can do; the contract skips or adapts the tests accordingly.
    # no partitions: the whole queue is one ordered unit (Envelope.partition is None)
    ordering = "partition"
    supports_keys = True
    supports_headers = True
    supports_delay = True
    supports_nack_delay = True
    counts_attempts = True  # the attempts column counts every delivery
    max_wait_seconds = 5.0

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Path) -> None:
        self.path = tmp_path / "queues.db"

    def make_connector(self) -> Connector:
        return SqliteConnector()

    def queue_spec(self, name: str, role: str) -> QueueSpec:
        return sqlite_spec(self.path, name, role)


def test_state_machine(tmp_path: Path) -> None:
    machine = connector_state_machine(
        SqliteConnector,
        lambda name, role: sqlite_spec(tmp_path / "machine.db", name, role),
        **TestSqliteContract.capabilities(),
        poll_timeout=0.01,
        name="Sqlite",
    )
    run_state_machine_as_test(
        machine, settings=hypothesis.settings(DEFAULT_SETTINGS, max_examples=25)
    )
