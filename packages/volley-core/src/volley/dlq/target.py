"""What ``volley dlq`` works on: an app's dead-letter queue, found through the app's own configuration, and the
queues its letters go back to."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Mapping

from volley.dlq.letter import DeadLetter
from volley.engine import StreamApp
from volley.errors import ConfigurationError
from volley.ports import (
    BrowsableConnector,
    DeadLetterObserver,
    LocatingConnector,
    Producer,
    QueueBrowser,
    QueueSpec,
)
from volley.queues import ResolvedQueue

logger = logging.getLogger("volley")


class DeadLetterQueue:
    """The dead-letter queue of one app, and the producers that send its letters back."""

    def __init__(self, app: StreamApp) -> None:
        engine = app.engine
        self.app_name = engine.app_name
        if engine.dead_letter_queue is None:
            raise ConfigurationError(f"app {self.app_name!r} has no dead_letter_queue: there is nothing to inspect")
        self.queue: ResolvedQueue = engine.queues[engine.dead_letter_queue]
        self.input: ResolvedQueue = engine.input
        self.queues: Mapping[str, ResolvedQueue] = engine.queues
        self.observers = [o for o in engine.observer.observers if isinstance(o, DeadLetterObserver)]
        connector = self.queue.connector
        if not isinstance(connector, BrowsableConnector):
            raise ConfigurationError(
                f"the connector {self.queue.spec.connector!r} of dead-letter queue {self.queue.name!r} cannot browse "
                "a queue without consuming it (it lacks create_browser, volley.ports.BrowsableConnector), so "
                "volley dlq cannot work on it")
        self._connector: BrowsableConnector = connector

    @property
    def name(self) -> str:
        """The dead-letter queue's name on its broker."""
        return self.queue.value

    @property
    def location(self) -> str:
        """Where the queue lives (its connector's ``locate``, volley.ports.LocatingConnector), "" when the connector
        cannot say."""
        connector = self.queue.connector
        return connector.locate(self.queue.spec) if isinstance(connector, LocatingConnector) else ""

    def open_browser(self) -> QueueBrowser:
        return self._connector.create_browser(self.queue.spec)

    def check_destination(self, to: str | None) -> None:
        """``--to`` must not name the dead-letter queue itself: letters would go round in place."""
        if to is not None and to in (self.queue.name, self.queue.value):
            raise ConfigurationError(f"--to {to!r} is the dead-letter queue itself; name the queue to replay into")

    def destination(self, letter: DeadLetter, to: str | None) -> tuple[ResolvedQueue, str] | None:
        """The queue (its configuration) and broker name a letter goes back to; None when the letter does not say
        where it came from and no ``--to`` was given. ``--to`` names a configured queue (its alias), or else a
        queue on the input's broker."""
        if to is not None:
            if to in self.queues:
                return self.queues[to], self.queues[to].value
            return self.input, to
        if not letter.source_queue or letter.source_queue == self.queue.value:
            return None  # (one that names the dead-letter queue itself would go round in place, as --to would)
        for queue in self.queues.values():
            if queue.value == letter.source_queue and queue.spec.role == "input":
                return queue, queue.value
        return self.input, letter.source_queue

    def make_producer(self, queue: ResolvedQueue, name: str) -> Producer:
        spec: QueueSpec = dataclasses.replace(queue.spec, value=name, role="output")
        if queue.producer_factory is not None:
            return queue.producer_factory(spec)
        return queue.connector.create_producer(spec)

    def count_replayed(self, source_queue: str, count: int) -> None:
        for observer in self.observers:
            try:
                observer.on_dead_letters_replayed(self.app_name, source_queue, count)
            except Exception:  # metrics must not stop a replay halfway
                logger.exception("observer %r failed in on_dead_letters_replayed", observer)

    def count_purged(self, source_queue: str, count: int) -> None:
        for observer in self.observers:
            try:
                observer.on_dead_letters_purged(self.app_name, source_queue, count)
            except Exception:
                logger.exception("observer %r failed in on_dead_letters_purged", observer)
