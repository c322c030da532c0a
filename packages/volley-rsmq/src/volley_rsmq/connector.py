"""The ``rsmq`` connector: settings are checked here, connections are made in ``start``.

Every app and every ``volley`` command loads each installed plugin, so this module imports no more than the
settings: redis-py and PyRSMQ (about 0.3 s) are imported when the first RSMQ consumer, producer or browser is built.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from volley.ports import QueueSpec
from volley_rsmq.settings import parse_settings

if TYPE_CHECKING:
    from volley_rsmq.browse import RsmqBrowser
    from volley_rsmq.consumer import RsmqConsumer
    from volley_rsmq.producer import RsmqProducer


class RsmqConnector:
    """Builds RSMQ consumers and producers from a queue's ``config`` (see ``volley_rsmq.settings``)."""

    def check(self, queue: QueueSpec) -> None:
        """Validate a queue's settings when the Engine is built, before anything starts."""
        parse_settings(queue.config, queue.value, queue.role)

    def create_consumer(self, queue: QueueSpec) -> RsmqConsumer:
        from volley_rsmq.consumer import RsmqConsumer

        return RsmqConsumer(queue.value, parse_settings(queue.config, queue.value, queue.role))

    def create_producer(self, queue: QueueSpec) -> RsmqProducer:
        from volley_rsmq.producer import RsmqProducer

        return RsmqProducer(parse_settings(queue.config, queue.value, queue.role))

    def locate(self, queue: QueueSpec) -> str:
        """The Redis server (as the client connects to it: ``options`` included), database and RSMQ namespace."""
        settings = parse_settings(queue.config, queue.value, queue.role)
        kwargs = settings.redis_kwargs()
        server = kwargs.get("unix_socket_path") or f"{str(kwargs.get('host')).lower()}:{kwargs.get('port')}"
        return f"rsmq:{server}/{kwargs.get('db')}/{settings.namespace}"

    def create_browser(self, queue: QueueSpec) -> RsmqBrowser:
        """For ``volley dlq``: read the queue without receiving, delete what a replay or purge dealt with."""
        from volley_rsmq.browse import RsmqBrowser

        return RsmqBrowser(queue.value, parse_settings(queue.config, queue.value, queue.role))


if TYPE_CHECKING:  # mypy proves the parts satisfy the ports (structurally: nothing is inherited)

    from volley.ports import (
        BrowsableConnector,
        Connector,
        Consumer,
        DepthReporter,
        Instrumented,
        LocatingConnector,
        Producer,
        QueueBrowser,
        SettlingBrowser,
    )

    def _satisfies_ports(
        consumer: RsmqConsumer, producer: RsmqProducer, connector: RsmqConnector, browser: RsmqBrowser
    ) -> tuple[Consumer, Producer, Connector, Instrumented, DepthReporter, BrowsableConnector, QueueBrowser,
               SettlingBrowser, LocatingConnector]:
        return consumer, producer, connector, consumer, consumer, connector, browser, browser, connector
