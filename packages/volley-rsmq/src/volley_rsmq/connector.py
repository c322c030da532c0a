"""The ``rsmq`` connector: settings are checked here, connections are made in ``start``."""

from __future__ import annotations

from volley.ports import QueueSpec
from volley_rsmq.consumer import RsmqConsumer
from volley_rsmq.producer import RsmqProducer
from volley_rsmq.settings import parse_settings


class RsmqConnector:
    """Builds RSMQ consumers and producers from a queue's ``config`` (see ``volley_rsmq.settings``)."""

    def check(self, queue: QueueSpec) -> None:
        """Validate a queue's settings when the Engine is built, before anything starts."""
        parse_settings(queue.config, queue.value, queue.role)

    def create_consumer(self, queue: QueueSpec) -> RsmqConsumer:
        return RsmqConsumer(queue.value, parse_settings(queue.config, queue.value, queue.role))

    def create_producer(self, queue: QueueSpec) -> RsmqProducer:
        return RsmqProducer(parse_settings(queue.config, queue.value, queue.role))
