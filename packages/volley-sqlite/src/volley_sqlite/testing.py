"""Run a stream app on a temporary sqlite database in a unit test, as ``volley.testing.harness`` does on memory.

    from volley_sqlite.testing import sqlite_harness

    def test_doubles(tmp_path):
        h = sqlite_harness(my_app, tmp_path / "queues.sqlite3")
        h.send({"value": 2})
        result = h.run()
        assert result.outputs("out") == [...]

Every queue of the app moves to one database file while keeping its
serializer, model handler and data model; what the handler sees went through
a real broker with leases, partitions and durable commits. ``result`` is the
same ``volley.testing.AppResult`` the memory harness gives. Without a path, a
temporary file is made (and removed by :meth:`SqliteHarness.close`).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volley.message import Envelope, to_bytes
from volley.testing import AppResult, rehome
from volley_sqlite import admin

if TYPE_CHECKING:  # only for annotations: the engine's modules are free to move things around
    from volley.engine import StreamApp
    from volley.run import RunReport

__all__ = ["SqliteHarness", "sqlite_harness"]


class SqliteHarness:
    """A stream app wired to a sqlite database file, fed and drained by the test."""

    def __init__(self, app: StreamApp, path: str | os.PathLike[str] | None = None, partitions: int = 1,
                 **engine_overrides: Any) -> None:
        self._tempdir: str | None = None
        if path is None:
            self._tempdir = tempfile.mkdtemp(prefix="volley-sqlite-harness-")
            path = Path(self._tempdir) / "queues.sqlite3"
        self.path = os.fspath(path)
        self.partitions = partitions
        # Short polls and leases: tests should not wait for a production-sized visibility timeout.
        self.app = rehome(app, "sqlite", {"path": self.path, "partitions": partitions, "poll_interval_seconds": 0.01,
                                          "vt": 5.0}, **engine_overrides)
        self.engine = self.app.engine

    def send(self, message: Any, *, key: str | bytes | None = None, headers: Mapping[str, Any] | None = None,
             raw: bool = False) -> None:
        """Put a message on the input queue, encoded with its codec (or as given, with ``raw=True``)."""
        queue = self.engine.input
        value = message if raw else queue.encode(message)
        encoded_headers = {str(k): to_bytes(v) or b"" for k, v in (headers or {}).items()} or None
        admin.publish(self.path, queue.value, [value], key=to_bytes(key), headers=encoded_headers,
                      partitions=self.partitions)

    def send_many(self, messages: Iterable[Any], **kwargs: Any) -> None:
        for message in messages:
            self.send(message, **kwargs)

    def run(self, timeout: float = 30.0, drain_idle_seconds: float = 0.05) -> AppResult:
        """Run the app until its input is drained; return what it produced."""
        return self._result(self.app.run_until_drained(timeout=timeout, drain_idle_seconds=drain_idle_seconds))

    async def run_async(self, timeout: float = 30.0, drain_idle_seconds: float = 0.05) -> AppResult:
        report = await asyncio.wait_for(
            self.app.run_async(stop_when_drained=True, drain_idle_seconds=drain_idle_seconds), timeout
        )
        return self._result(report)

    def pending(self, queue: str) -> list[bytes]:
        """Values still unacknowledged in one of the app's queues (by the app's name for it)."""
        return [m.value for m in admin.messages(self.path, self.engine.queues[queue].value, include_acked=False)]

    def _result(self, report: RunReport) -> AppResult:
        outputs: dict[str, list[Envelope]] = {}
        for name, queue in self.engine.queues.items():
            if name != self.engine.input_queue:
                outputs[name] = [Envelope(m.value, m.key, m.headers, m.queue, m.partition, m.id, None, m.attempts)
                                 for m in admin.messages(self.path, queue.value)]
        return AppResult(report=report, harness=self, raw_outputs=outputs)  # type: ignore[arg-type]

    def close(self) -> None:
        """Remove the temporary database this harness made (a path given by the test is left alone)."""
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None


def sqlite_harness(app: StreamApp, path: str | os.PathLike[str] | None = None, partitions: int = 1,
                   **engine_overrides: Any) -> SqliteHarness:
    """Wrap a stream app for a test on a sqlite database: see the module docstring."""
    return SqliteHarness(app, path, partitions=partitions, **engine_overrides)
