"""``ConnectorContract``: the whole suite, one pytest base class."""

from __future__ import annotations

from volley.testing.contract.delivery import DeliveryTests
from volley.testing.contract.redelivery import RedeliveryTests

__all__ = ["ConnectorContract"]


class ConnectorContract(DeliveryTests, RedeliveryTests):
    """The behaviour every Consumer/Producer pair must show. Subclass it as ``class TestMyBroker(ConnectorContract)``.

    This class is not collected itself (its name has no ``Test`` prefix); every
    ``test_*`` method runs in each subclass. Tests are ``async`` and need
    pytest-asyncio in auto mode. Every test creates fresh queues with unique
    names, so a real broker that keeps state between tests is fine.

    A subclass must provide:

    ``make_connector(self) -> Connector``
        A connector object (what the plugin registers). Called once per test.
    ``queue_spec(self, name: str, role: str) -> QueueSpec``
        The spec of broker queue/topic ``name`` (already unique: use it as
        ``value``) for ``role`` "input" (consumers) or "output" (producers),
        with every setting the connector needs in ``config``. Called once per
        (name, role) per test; the suite reuses the result, so a consumer
        opened again after a close gets the same spec. Kafka: put a consumer
        group id that is unique per call (e.g. ``f"{name}-group"``) and
        ``auto.offset.reset=earliest`` into input specs, plus the bootstrap
        servers; RSMQ: host/port and a visibility timeout longer than a test,
        but short enough for ``max_wait_seconds`` when redelivery after a
        close relies on it.

    and may override:

    ``async create_queue(self, name: str) -> None``
        Create a fresh queue with ``partitions`` partitions before use (Kafka:
        create the topic with an admin client; RSMQ: create the queue).
        Default: nothing (the broker creates queues on first use). Not called
        for the "never seen queue" test.
    Capability flags and timings (class attributes, below).

    Per-test state (a broker address from a fixture, a fresh in-memory
    broker) goes into ``setup_method`` or an autouse fixture of the subclass::

        @pytest.fixture(autouse=True)
        def _bootstrap(self, kafka_bootstrap: str) -> None:
            self.bootstrap = kafka_bootstrap

    A test that cannot apply can be overridden in the subclass and marked
    ``skip`` or ``xfail(strict=True)`` with the reason.
    """

    # The tests live by subject in DeliveryTests (lifecycle, produce / consume) and RedeliveryTests (acks, nacks,
    # redelivery); the capability flags, timings and shared plumbing in their ContractBase.
