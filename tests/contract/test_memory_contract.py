"""The memory connector against the connector contract and the Hypothesis state machine."""

from __future__ import annotations

from volley.memory import MemoryBroker, MemoryConnector
from volley.ports import Connector, QueueSpec
from volley.testing.contract import BrowsingTests, ConnectorContract
from volley.testing.statemachine import connector_state_machine


def memory_spec(broker: MemoryBroker, name: str, role: str) -> QueueSpec:
    return QueueSpec(name=name, value=name, connector="memory", config={"broker": broker}, role=role)


class TestMemoryContract(ConnectorContract, BrowsingTests):
    partitions = 3
    supports_partitions = True
    supports_delay = True
    supports_nack_delay = True
    counts_attempts = True
    max_wait_seconds = 5.0

    def setup_method(self) -> None:
        self.broker = MemoryBroker(partitions=self.partitions)

    def make_connector(self) -> Connector:
        return MemoryConnector()

    def queue_spec(self, name: str, role: str) -> QueueSpec:
        return memory_spec(self.broker, name, role)


class TestMemoryContractOnePartition(TestMemoryContract):
    """A single partition takes the broker's separate fast path, so it is checked on its own."""

    partitions = 1


class _FreshBroker:
    """Each state-machine example gets its own broker: make_connector runs first, then make_spec."""

    broker = MemoryBroker(partitions=3)

    @classmethod
    def make_connector(cls) -> Connector:
        cls.broker = MemoryBroker(partitions=3)
        return MemoryConnector()

    @classmethod
    def make_spec(cls, name: str, role: str) -> QueueSpec:
        return memory_spec(cls.broker, name, role)


TestMemoryStateMachine = connector_state_machine(
    _FreshBroker.make_connector,
    _FreshBroker.make_spec,
    **TestMemoryContract.capabilities(),
    poll_timeout=0.0,
    name="Memory",
).TestCase
