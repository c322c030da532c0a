"""Test your handlers without any server: ``volley.testing`` ships with the library, like httpx's MockTransport.

    from volley.testing import harness

    def test_doubles():
        h = harness(my_app)                # my_app is the @engine.stream_app function
        h.send({"value": 2})
        result = h.run()
        assert result.outputs("out") == [...]

The harness rebuilds the app's Engine with every queue moved to a private
in-memory broker while keeping each queue's serializer, model handler and
data model, so what the handler receives and returns goes through the same
codecs as in production. The contract suite for connector authors lives in
``volley.testing.contract``; the Hypothesis state machine in
``volley.testing.statemachine``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from volley.engine import Engine, StreamApp
from volley.memory import MemoryBroker
from volley.message import Envelope, to_bytes
from volley.run import RunReport

__all__ = ["AppResult", "BaseHarness", "Harness", "harness", "rehome", "run_until_idle"]


def rehome(app: StreamApp, connector: str, config: Mapping[str, Any], **engine_overrides: Any) -> StreamApp:
    """``app`` with every queue moved to ``connector`` (with ``config``) and test-friendly engine settings:
    no metrics port, short polls, no retry backoff (``engine_overrides`` win). Codecs and models stay."""
    original = app.engine
    queues: dict[str, Any] = {}
    for name, settings in original.queue_config.items():
        moved = {k: v for k, v in settings.items() if k not in ("consumer", "producer", "connector", "config")}
        moved["connector"] = connector
        moved["config"] = dict(config)
        queues[name] = moved
    overrides = {"metrics_port": None, "poll_interval_seconds": 0.05, "retry_backoff_seconds": 0.0,
                 **engine_overrides}
    return original.with_queue_config(queues, **overrides).stream_app(app.func)


@dataclass
class AppResult:
    """What one harness run produced."""

    report: RunReport
    harness: BaseHarness
    raw_outputs: dict[str, list[Envelope]] = field(default_factory=dict)

    def raw(self, queue: str) -> list[Envelope]:
        """Messages produced to ``queue`` as the broker holds them (bytes, key, headers)."""
        return self.raw_outputs.get(queue, [])

    def outputs(self, queue: str) -> list[Any]:
        """Messages produced to ``queue``, decoded with that queue's serializer and data model."""
        resolved = self.harness.engine.queues[queue]
        return [resolved.validate(resolved.deserialize(env.value)) for env in self.raw(queue)]

    @property
    def dead_letters(self) -> list[Envelope]:
        """Raw messages sent to the dead-letter queue, with the ``volley-error-*`` headers."""
        dlq = self.harness.engine.dead_letter_queue
        return self.raw(dlq) if dlq else []


class BaseHarness:
    """What every harness shares: ``send`` encodes with the input queue's codec, ``run`` drains the app and gives
    what that run produced. A harness for another broker provides ``_publish`` and ``_outputs``."""

    app: StreamApp

    @property
    def engine(self) -> Engine:
        return self.app.engine

    def send(self, message: Any, *, key: str | bytes | None = None, headers: Mapping[str, Any] | None = None,
             raw: bool = False) -> None:
        """Put a message on the input queue, encoded with its codec (or as given, with ``raw=True``)."""
        queue = self.engine.input
        value = message if raw else queue.encode(message)
        encoded_headers = {str(k): to_bytes(v) or b"" for k, v in (headers or {}).items()} or None
        self._publish(queue.value, value, to_bytes(key), encoded_headers)

    def send_many(self, messages: Iterable[Any], **kwargs: Any) -> None:
        for message in messages:
            self.send(message, **kwargs)

    def run(self, timeout: float = 30.0, drain_idle_seconds: float = 0.05) -> AppResult:
        """Run the app until its input is drained; return what this run produced (not earlier runs)."""
        marks = self._marks()
        report = self.app.run_until_drained(timeout=timeout, drain_idle_seconds=drain_idle_seconds)
        return self._result(report, marks)

    async def run_async(self, timeout: float = 30.0, drain_idle_seconds: float = 0.05) -> AppResult:
        marks = self._marks()
        report = await asyncio.wait_for(
            self.app.run_async(stop_when_drained=True, drain_idle_seconds=drain_idle_seconds), timeout
        )
        return self._result(report, marks)

    def _publish(self, queue: str, value: bytes, key: bytes | None, headers: dict[str, bytes] | None) -> None:
        raise NotImplementedError

    def _outputs(self) -> dict[str, list[Envelope]]:
        """Every record of each output queue (by the app's name for it), oldest first; ``position`` grows."""
        raise NotImplementedError

    def _marks(self) -> dict[str, Any]:
        """The position of the latest record of each output queue before a run."""
        return {name: records[-1].position if records else -1 for name, records in self._outputs().items()}

    def _result(self, report: RunReport, marks: dict[str, Any]) -> AppResult:
        outputs = {name: [r for r in records if r.position > marks.get(name, -1)]
                   for name, records in self._outputs().items()}
        return AppResult(report=report, harness=self, raw_outputs=outputs)


class Harness(BaseHarness):
    """A stream app wired to a private memory broker, fed and drained by the test."""

    def __init__(self, app: StreamApp, partitions: int = 1, **engine_overrides: Any) -> None:
        self.broker = MemoryBroker(partitions=partitions)
        self.app = rehome(app, "memory", {"broker": self.broker}, **engine_overrides)

    def _publish(self, queue: str, value: bytes, key: bytes | None, headers: dict[str, bytes] | None) -> None:
        self.broker.publish(queue, value, key, headers)

    def _outputs(self) -> dict[str, list[Envelope]]:
        return {name: self.broker.produced_records(queue.value) for name, queue in self.engine.queues.items()
                if name != self.engine.input_queue}


def harness(app: StreamApp, partitions: int = 1, **engine_overrides: Any) -> Harness:
    """Wrap a stream app for a unit test: see the module docstring."""
    return Harness(app, partitions=partitions, **engine_overrides)


async def run_until_idle(*apps: StreamApp, broker: MemoryBroker, timeout: float = 60.0,
                         idle_seconds: float = 0.2) -> list[RunReport]:
    """Run several apps on one loop until none has work and the broker is idle for ``idle_seconds``.

    Apps that feed each other (the demo's two nodes) are only done when all of
    them are idle at once, which no single app can tell on its own.
    """
    tasks = [asyncio.ensure_future(app.run_async()) for app in apps]
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    idle_since: float | None = None
    try:
        while True:
            for task in tasks:
                if task.done():
                    task.result()  # surface a crashed app at once
            busy = not broker.is_idle() or any(
                (app.report is None or app.report.consumed != app.report.settled) for app in apps
            )
            now = loop.time()
            if busy:
                idle_since = None
            elif idle_since is None:
                idle_since = now
            elif now - idle_since >= idle_seconds:
                break
            if now > deadline:
                raise TimeoutError(f"apps still busy after {timeout} s")
            await asyncio.sleep(0.01)
    finally:
        for app in apps:
            app.stop()
    return list(await asyncio.gather(*tasks))
