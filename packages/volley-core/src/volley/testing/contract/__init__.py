"""The connector contract: what every Consumer/Producer pair must do, as a pytest base class.

Every connector (the memory broker, Kafka, RSMQ, third-party plugins) runs the
same tests by subclassing :class:`ConnectorContract` in a ``TestXxx`` class and
saying what its broker can do through capability flags. The engine's
guarantees (at-least-once, order, nothing lost, nothing acked twice) rest on
exactly these behaviours, so a connector that passes here can be trusted by
the engine.

The helpers (:class:`DeliveryRecorder`, :func:`drain`, :func:`drain_until`,
:func:`assert_exactly_once`, :func:`assert_in_order`) are public so that
adapters can write their own broker-specific tests in the same style.
Needs ``pytest`` and ``pytest-asyncio`` (``asyncio_mode = "auto"``).
"""

from volley.testing.contract.browsing import BrowsingTests
from volley.testing.contract.checks import assert_exactly_once, assert_in_order, index_of, value_for
from volley.testing.contract.draining import HANG_SLACK_SECONDS, deadline_in, drain, drain_until
from volley.testing.contract.recorder import DeliveryRecorder
from volley.testing.contract.suite import ConnectorContract

__all__ = [
    "HANG_SLACK_SECONDS",
    "BrowsingTests",
    "ConnectorContract",
    "DeliveryRecorder",
    "assert_exactly_once",
    "assert_in_order",
    "deadline_in",
    "drain",
    "drain_until",
    "index_of",
    "value_for",
]
