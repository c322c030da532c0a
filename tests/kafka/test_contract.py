"""volley-kafka against the connector contract, on a real Apache Kafka broker."""

from __future__ import annotations

import os
import uuid
from typing import ClassVar

import hypothesis
import pytest
from confluent_kafka.admin import AdminClient, NewTopic
from hypothesis.stateful import run_state_machine_as_test

from volley.ports import Connector, QueueSpec
from volley.testing.contract import BrowsingTests, ConnectorContract
from volley.testing.statemachine import SERVER_SETTINGS, connector_state_machine
from volley_kafka import KafkaConnector

pytestmark = pytest.mark.kafka

# librdkafka 2.16 under group.protocol=consumer: a consumer closed while its first ConsumerGroupHeartbeat is in
# flight sends no leave ("has joined=false"), so the broker keeps it as a member that holds every partition until
# its session times out (45 s): the next consumer of the group gets nothing for that long. Java's client had the
# same bug (KAFKA-16639). Timing-dependent, hence not strict.
CLOSE_BEFORE_JOIN = pytest.mark.xfail(
    strict=False, reason="librdkafka, consumer protocol: a close before the first heartbeat answer leaves no leave"
)
RESTARTS_A_CONSUMER_AT_ONCE = {"test_start_and_close_without_traffic"}


class TestKafkaContract(ConnectorContract, BrowsingTests):
    partitions: ClassVar[int] = 3
    ordering: ClassVar[str] = "partition"
    supports_keys: ClassVar[bool] = True
    supports_headers: ClassVar[bool] = True
    supports_partitions: ClassVar[bool] = True
    supports_delay: ClassVar[bool] = False  # Kafka has no per-message delay
    # A nack seeks the partition back, so the message comes again to the same consumer, after the delay.
    redelivers_nacked_in_session: ClassVar[bool] = True
    supports_nack_delay: ClassVar[bool] = True
    acks_individually: ClassVar[bool] = False  # only the contiguous finished prefix is committed
    counts_attempts: ClassVar[bool] = False  # in-session redeliveries are counted; a new consumer starts at 1
    creates_queues_on_produce: ClassVar[bool] = True  # the test broker auto-creates topics
    max_wait_seconds: ClassVar[float] = 15.0

    group_protocol: str = "classic"

    @pytest.fixture(autouse=True)
    def _bootstrap(self, kafka_bootstrap: str, group_protocol: str, request: pytest.FixtureRequest) -> None:
        self.bootstrap = kafka_bootstrap
        self.group_protocol = group_protocol
        if group_protocol == "consumer" and request.node.originalname in RESTARTS_A_CONSUMER_AT_ONCE:
            request.node.add_marker(CLOSE_BEFORE_JOIN)

    def make_connector(self) -> Connector:
        return KafkaConnector()

    def queue_spec(self, name: str, role: str) -> QueueSpec:
        config: dict[str, object] = {"bootstrap.servers": self.bootstrap}
        if role == "input":
            config["group.id"] = f"{name}-group-{uuid.uuid4().hex[:6]}"
            config["auto.offset.reset"] = "earliest"
            config["group.protocol"] = self.group_protocol
        return QueueSpec(name=name, value=name, connector="confluent", config=config, app_name="contract", role=role)

    async def create_queue(self, name: str) -> None:
        admin = AdminClient({"bootstrap.servers": self.bootstrap})
        futures = admin.create_topics([NewTopic(name, num_partitions=self.partitions, replication_factor=1)])
        for future in futures.values():
            future.result(30)


@pytest.mark.slow
# The thread method is the backstop here: Hypothesis would catch pytest-timeout's signal-raised failure like
# any other and go on running examples against the broker.
@pytest.mark.timeout(420, method="thread")
def test_kafka_state_machine(kafka_bootstrap: str, group_protocol: str, request: pytest.FixtureRequest) -> None:
    """Random interleavings of produce, consume, ack, nack and reconnect, checked against a plain model."""
    if group_protocol == "consumer":
        request.node.add_marker(CLOSE_BEFORE_JOIN)  # restart_consumer right after a start
    suite = TestKafkaContract()
    suite.bootstrap = kafka_bootstrap
    suite.group_protocol = group_protocol
    capabilities = TestKafkaContract.capabilities()
    capabilities["max_wait_seconds"] = 15.0
    machine = connector_state_machine(
        KafkaConnector,
        suite.queue_spec,
        create_queue=suite.create_queue,
        **capabilities,
        poll_timeout=0.2,
        name="Kafka",
    )
    examples = int(os.environ.get("VOLLEY_MACHINE_EXAMPLES", "5"))
    run_state_machine_as_test(machine, settings=hypothesis.settings(SERVER_SETTINGS, max_examples=examples))
