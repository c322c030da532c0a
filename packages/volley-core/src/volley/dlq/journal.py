"""The replay journal: what a replay is about to send, and what its broker confirmed, kept on local disk.

A letter leaves the dead-letter queue only after its republish is confirmed, so a replay killed in between
finds it still there. The journal tells the next run what happened to it:

- ``sent`` (confirmed): it is not sent again; it is just taken out of the dead-letter queue now;
- ``intent`` without ``sent``: the kill came while it was in flight, so its republish may or may not have
  landed. It is sent again (at-least-once) and counted as a possible duplicate in the summary.

It also counts how often the same letter (by a digest of its key and value) was replayed, for the loop guard.
On Kafka, whose topics cannot drop single records, ``sent`` entries past the replay group's committed offset
are the only record that a letter was moved, so keep the journal until the commit has passed them (a later
complete run keeps only what it still needs). Each write is flushed and fsynced before the step it guards.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any, TextIO

from volley.errors import ConfigurationError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, one replay at a time is then up to the operator
    fcntl = None  # type: ignore[assignment]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")


def default_path(app_name: str, connector: str, queue: str) -> Path:
    """``$VOLLEY_DLQ_JOURNAL_DIR`` or ``$XDG_STATE_HOME/volley/dlq`` (``~/.local/state/volley/dlq``), one file per
    app and dead-letter queue."""
    base = os.environ.get("VOLLEY_DLQ_JOURNAL_DIR")
    if base:
        directory = Path(base)
    else:
        directory = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "volley" / "dlq"
    name = _UNSAFE.sub("_", f"{app_name}.{connector}.{queue}")
    return directory / f"{name}.jsonl"


class JournalBusyError(ConfigurationError):
    """Another replay of the same dead-letter queue holds the journal: two at once would send letters twice."""


class Journal:
    """The journal file of one dead-letter queue. It also counts, by a digest of key and value, how often the same
    letter was replayed: the loop guard's memory where a destination drops headers (an RSMQ queue with
    ``headers: drop``), so that ``volley-replay-count`` cannot come back with the letter."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.intended: set[str] = set()
        self.sent: set[str] = set()
        self.replays: Counter[str] = Counter()
        if path.exists():
            with path.open(encoding="utf-8") as lines:
                for line in lines:
                    self._load(line)
        self._file: TextIO | None = None
        self._lock: TextIO | None = None

    def _load(self, line: str) -> None:
        try:
            entry = json.loads(line)
            op = entry["op"]
            if op == "replays":
                self.replays.update({str(k): int(v) for k, v in entry["counts"].items()})
                return
            ids = [str(i) for i in entry["ids"]]
            digests = [str(d) for d in entry.get("digests", ())]
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # a line cut short by the kill that left it: its step did not happen
        if op == "sent":
            self.sent.update(ids)
            self.replays.update(digests)
        else:
            self.intended.update(ids)

    def lock(self) -> None:
        """Hold the journal for this process (an advisory lock on a file beside it), or refuse at once."""
        if self._lock is not None or fcntl is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = self.path.with_suffix(".lock").open("a", encoding="utf-8")
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise JournalBusyError(f"another volley dlq replay of this queue is running (it holds {self.path}); "
                                   "wait for it, or stop it first") from None
        self._lock = handle

    def _write(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def record_intent(self, ids: Iterable[str]) -> None:
        listed = list(ids)
        if listed:
            self._write({"op": "intent", "ids": listed})
            self.intended.update(listed)

    def record_sent(self, ids: Iterable[str], digests: Iterable[str] = ()) -> None:
        listed, replayed = list(ids), list(digests)
        if listed:
            self._write({"op": "sent", "ids": listed, "digests": replayed})
            self.sent.update(listed)
            self.replays.update(replayed)

    def in_doubt(self, letter_id: str) -> bool:
        """Its republish began in a run that was killed before the broker confirmed it."""
        return letter_id in self.intended and letter_id not in self.sent

    def rewrite(self, keep_sent: Iterable[str]) -> None:
        """After a complete run: keep only the ``sent`` entries still needed, and the replay counts."""
        self.close_file()
        keep = sorted(set(keep_sent))
        self.intended, self.sent = set(), set(keep)
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w", encoding="utf-8") as out:
            if keep:
                out.write(json.dumps({"op": "sent", "ids": keep}) + "\n")
            if self.replays:
                out.write(json.dumps({"op": "replays", "counts": dict(self.replays)}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(self.path)

    def close_file(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    def close(self) -> None:
        """Close the file and give up the lock."""
        self.close_file()
        if self._lock is not None:
            self._lock.close()
            self._lock = None
