"""The replay journal: what a replay is about to send, and what its broker confirmed, kept on local disk.

A letter leaves the dead-letter queue only after its republish is confirmed, so a replay killed in between
finds it still there. The journal tells the next run what happened to it:

- ``sent`` (confirmed): it is not sent again; it is just taken out of the dead-letter queue now;
- ``intent`` without ``sent``: the kill came while it was in flight, so its republish may or may not have
  landed. It is sent again (at-least-once) and counted as a possible duplicate in the summary.

On Kafka, whose topics cannot drop single records, ``sent`` entries past the replay group's committed offset
are the only record that a letter was moved, so keep the journal until the commit has passed them (a later
complete run keeps only what it still needs). Each write is flushed and fsynced before the step it guards.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import TextIO

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


class Journal:
    def __init__(self, path: Path) -> None:
        self.path = path
        self.intended: set[str] = set()
        self.sent: set[str] = set()
        if path.exists():
            with path.open(encoding="utf-8") as lines:
                for line in lines:
                    try:
                        entry = json.loads(line)
                        ids = [str(i) for i in entry["ids"]]
                        op = entry["op"]
                    except (ValueError, KeyError, TypeError):
                        continue  # a line cut short by the kill that left it: its step did not happen
                    (self.sent if op == "sent" else self.intended).update(ids)
        self._file: TextIO | None = None

    def _write(self, op: str, ids: Iterable[str]) -> None:
        listed = list(ids)
        if not listed:
            return
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._file = self.path.open("a", encoding="utf-8")
        self._file.write(json.dumps({"op": op, "ids": listed}) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def record_intent(self, ids: Iterable[str]) -> None:
        listed = list(ids)
        self._write("intent", listed)
        self.intended.update(listed)

    def record_sent(self, ids: Iterable[str]) -> None:
        listed = list(ids)
        self._write("sent", listed)
        self.sent.update(listed)

    def in_doubt(self, letter_id: str) -> bool:
        """Its republish began in a run that was killed before the broker confirmed it."""
        return letter_id in self.intended and letter_id not in self.sent

    def rewrite(self, keep_sent: Iterable[str]) -> None:
        """After a complete run: keep only the ``sent`` entries still needed (none: the file goes)."""
        self.close()
        keep = sorted(set(keep_sent))
        self.intended, self.sent = set(), set(keep)
        if not keep:
            self.path.unlink(missing_ok=True)
            return
        temporary = self.path.with_suffix(".tmp")
        with temporary.open("w", encoding="utf-8") as out:
            out.write(json.dumps({"op": "sent", "ids": keep}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(self.path)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None
