"""The memory connector against the connector contract and the Hypothesis state machine."""

from __future__ import annotations

import pytest

from volley.memory import MemoryBroker, MemoryConnector
from volley.ports import Connector, QueueSpec
from volley.testing.contract import ConnectorContract
from volley.testing.statemachine import connector_state_machine


def memory_spec(broker: MemoryBroker, name: str, role: str) -> QueueSpec:
    return QueueSpec(name=name, value=name, connector="memory", config={"broker": broker}, role=role)


PARTIAL_CALL_BUG = (
    "memory.py bug: MemoryBroker.publish_many stores the records before one with an out-of-range partition, "
    "then MemoryProducer reports every record of the call as failed: consumers receive records reported failed"
)
DELAYED_PARTITION_BUG = (
    "memory.py bug: a delayed record's partition is checked only when its Timer fires; it is reported "
    "delivered, then lost with a ValueError in the Timer thread"
)


class TestMemoryContract(ConnectorContract):
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

    # Known memory.py bugs (see the reasons); strict, so that the fix makes these fail until the marks go.

    @pytest.mark.xfail(strict=True, reason=PARTIAL_CALL_BUG)
    async def test_invalid_partition_is_reported_not_stored(self) -> None:
        await super().test_invalid_partition_is_reported_not_stored()

    @pytest.mark.xfail(strict=True, reason=DELAYED_PARTITION_BUG)
    @pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the bug's ValueError
    async def test_delayed_record_for_invalid_partition_is_reported_failed(self) -> None:
        await super().test_delayed_record_for_invalid_partition_is_reported_failed()


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
