"""The RSMQ connector against the connector contract and the Hypothesis state machine, on a real redis-server."""

from __future__ import annotations

import os
from typing import Any, ClassVar

import hypothesis
import pytest
from hypothesis.stateful import run_state_machine_as_test

from volley.ports import Connector, QueueSpec
from volley.testing.contract import BrowsingTests, ConnectorContract
from volley.testing.statemachine import SERVER_SETTINGS, connector_state_machine
from volley_rsmq import RsmqConnector

pytestmark = pytest.mark.redis


def rsmq_spec(server: Any, name: str, role: str, **config: Any) -> QueueSpec:
    # vt outlasts every test; redelivery after a close does not wait for it (close releases held messages).
    settings = {"host": server.host, "port": server.port, "vt": 60, **config}
    return QueueSpec(name=name, value=name, connector="rsmq", config=settings, role=role)


class TestRsmqContract(ConnectorContract, BrowsingTests):
    """Plain RSMQ: the body is the payload; keys and headers cannot travel (``headers: drop``)."""

    ordering = "partition"  # a single unit (partition None): RSMQ delivers in sending order
    supports_keys = False
    supports_headers = False
    supports_delay = True
    supports_nack_delay = True
    counts_attempts = True  # RSMQ's receive count
    max_wait_seconds = 10.0
    extra_config: ClassVar[dict[str, Any]] = {}

    @pytest.fixture(autouse=True)
    def _server(self, redis_server: Any) -> None:
        self.server = redis_server

    def make_connector(self) -> Connector:
        return RsmqConnector()

    def queue_spec(self, name: str, role: str) -> QueueSpec:
        return rsmq_spec(self.server, name, role, **self.extra_config)


class TestRsmqEnvelopeContract(TestRsmqContract):
    """``headers: envelope`` (the dead-letter queues' mode): key and headers travel in a JSON envelope."""

    supports_keys = True
    supports_headers = True
    extra_config: ClassVar[dict[str, Any]] = {"headers": "envelope"}


# The thread method is the backstop here: Hypothesis would catch pytest-timeout's signal-raised failure like
# any other and go on running examples against the server.
@pytest.mark.timeout(420, method="thread")
def test_rsmq_state_machine(redis_server: Any) -> None:
    machine = connector_state_machine(
        RsmqConnector,
        lambda name, role: rsmq_spec(redis_server, name, role, headers="envelope"),
        **TestRsmqEnvelopeContract.capabilities(),
        poll_timeout=0.05,
        name="Rsmq",
    )
    examples = int(os.environ.get("VOLLEY_MACHINE_EXAMPLES", "10"))
    run_state_machine_as_test(machine, settings=hypothesis.settings(SERVER_SETTINGS, max_examples=examples))
