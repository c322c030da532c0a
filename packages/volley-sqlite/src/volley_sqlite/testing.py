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

import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from volley.message import Envelope
from volley.testing import BaseHarness, rehome
from volley_sqlite import admin

if TYPE_CHECKING:  # only for annotations: the engine's modules are free to move things around
    from volley.engine import StreamApp

__all__ = ["SqliteHarness", "sqlite_harness"]


class SqliteHarness(BaseHarness):
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

    def _publish(self, queue: str, value: bytes, key: bytes | None, headers: dict[str, bytes] | None) -> None:
        admin.publish(self.path, queue, [value], key=key, headers=headers, partitions=self.partitions)

    def pending(self, queue: str) -> list[bytes]:
        """Values still unacknowledged in one of the app's queues (by the app's name for it)."""
        return [m.value for m in admin.messages(self.path, self.engine.queues[queue].value, include_acked=False)]

    def _outputs(self) -> dict[str, list[Envelope]]:
        return {name: [Envelope(m.value, m.key, m.headers, m.queue, m.partition, m.id, None, m.attempts)
                       for m in admin.messages(self.path, queue.value)]
                for name, queue in self.engine.queues.items() if name != self.engine.input_queue}

    def close(self) -> None:
        """Remove the temporary database this harness made (a path given by the test is left alone)."""
        if self._tempdir is not None:
            shutil.rmtree(self._tempdir, ignore_errors=True)
            self._tempdir = None


def sqlite_harness(app: StreamApp, path: str | os.PathLike[str] | None = None, partitions: int = 1,
                   **engine_overrides: Any) -> SqliteHarness:
    """Wrap a stream app for a test on a sqlite database: see the module docstring."""
    return SqliteHarness(app, path, partitions=partitions, **engine_overrides)
