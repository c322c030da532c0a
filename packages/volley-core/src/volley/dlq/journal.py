"""The replay journal: what a replay is about to send, and what its broker confirmed, kept on local disk.

A letter leaves the dead-letter queue only after its republish is confirmed, so a replay killed in between
finds it still there. The journal tells the next run what happened to it:

- ``sent`` (confirmed): it is not sent again; it is just taken out of the dead-letter queue now;
- ``intent`` without ``sent``: the kill came while it was in flight, so its republish may or may not have
  landed. It is sent again (at-least-once) and counted as a possible duplicate in the summary.

A ``sent`` entry names the letter by its id in the queue *and* its fingerprint (key, value, headers, time written):
an id can name another letter later (a Kafka topic deleted and created again starts its offsets at 0), even one
of the same key and value (the replayed message failed again), and that letter was never sent.

It also keeps, per digest, the replay count the letter carried when it was last sent, for the loop guard where a
destination drops headers: for ``count_retention_seconds`` after that send (7 days by default: a letter of that
content coming back later counts from 0 again), and only the ``max_counts`` most recent (100,000), so that the
journal stays bounded however many letters are replayed.

On Kafka, whose topics cannot drop single records, ``sent`` entries past the replay group's committed offset are
the only record that a letter was moved, so keep the journal until the commit has passed them. After each run
the journal keeps only what a later run may still need (see ``_Replay.compact``).
Each write is flushed and fsynced before the step it guards. The journal is read again once its lock is held:
what another replay wrote until then counts.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any, TextIO

from volley.errors import ConfigurationError

try:
    import fcntl
except ImportError:  # pragma: no cover - not POSIX: no lock, one replay at a time is then up to the operator
    fcntl = None  # type: ignore[assignment]

_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")

COUNT_RETENTION_SECONDS = 7 * 86400.0
"""How long the journal keeps a content's replay count after its last send (``volley dlq replay --keep-counts``)."""
MAX_COUNTS = 100_000
"""The most replay counts a journal keeps (the most recently sent): about 10 MB of journal at the most."""


def default_path(connector: str, queue: str, location: str = "") -> Path:
    """``$VOLLEY_DLQ_JOURNAL_DIR`` or ``$XDG_STATE_HOME/volley/dlq`` (``~/.local/state/volley/dlq``), one file per
    dead-letter queue: its connector, name and location (where it lives: volley.ports.LocatingConnector; a digest of
    it in the file name). Apps that dead-letter to the same queue share it and its lock, so a replay through one
    sees what a replay through another did; a queue of the same name elsewhere has its own."""
    base = os.environ.get("VOLLEY_DLQ_JOURNAL_DIR")
    if base:
        directory = Path(base)
    else:
        directory = Path(os.environ.get("XDG_STATE_HOME") or Path.home() / ".local" / "state") / "volley" / "dlq"
    name = _UNSAFE.sub("_", f"{connector}.{queue}")
    if location:
        name += "." + hashlib.sha256(location.encode()).hexdigest()[:12]
    return directory / f"{name}.jsonl"


class JournalBusyError(ConfigurationError):
    """Another replay of the same dead-letter queue holds the journal: two at once would send letters twice."""


class Journal:
    """The journal file of one dead-letter queue. It also counts, by a digest of key and value, how often the same
    letter was replayed: the loop guard's memory where a destination drops headers (an RSMQ queue with
    ``headers: drop``), so that ``volley-replay-count`` cannot come back with the letter."""

    def __init__(self, path: Path, *, count_retention_seconds: float = COUNT_RETENTION_SECONDS,
                 max_counts: int = MAX_COUNTS, clock: Callable[[], float] = time.time) -> None:
        self.path = path
        self.count_retention_seconds = count_retention_seconds
        self.max_counts = max_counts
        self._clock = clock
        self.intended: set[str] = set()
        self.sent: dict[str, str | None] = {}
        """Confirmed at their destination: id -> the fingerprint of the letter sent under that id."""
        self.replays: Counter[str] = Counter()
        """Per digest, the replay count a letter with that content carried when it was last sent."""
        self.replayed_at: dict[str, float] = {}
        """Per digest, when that count was last sent (seconds since the epoch): what ``rewrite`` forgets by."""
        self._file: TextIO | None = None
        self._lock: TextIO | None = None
        self.reload()

    def reload(self) -> None:
        """Read the file (a line that is not whole JSON, or not UTF-8, is one a kill cut short: skipped)."""
        self.intended, self.sent, self.replays, self.replayed_at = set(), {}, Counter(), {}
        now = self._clock()  # the time of entries written before times were (they are kept one retention more)
        try:
            if self.path.exists():
                with self.path.open(encoding="utf-8", errors="replace") as lines:
                    for line in lines:
                        self._load(line, now)
        except OSError as exc:
            raise ConfigurationError(f"cannot read the replay journal {self.path}: {exc}; pass --journal or set "
                                     "VOLLEY_DLQ_JOURNAL_DIR to a readable place") from exc

    def _count(self, digest: str, replays: int, at: float) -> None:
        if replays > 0:
            self.replays[digest] = max(self.replays[digest], replays)
            self.replayed_at[digest] = max(self.replayed_at.get(digest, at), at)

    def _load(self, line: str, now: float) -> None:
        try:
            entry = json.loads(line)
            op = entry["op"]
            if op == "replays":
                times = entry.get("at") or {}
                for digest, count in entry["counts"].items():
                    self._count(str(digest), int(count), float(times.get(digest, now)))
                return
            ids = [str(i) for i in entry["ids"]]
            digests = [str(d) for d in entry.get("digests", ())]
            counts = [int(n) for n in entry.get("replays", [1] * len(digests))]
            prints = [str(f) for f in entry.get("prints", ())]
            at = float(entry.get("at", now))
        except (ValueError, KeyError, TypeError, AttributeError):
            return  # a line cut short by the kill that left it: its step did not happen
        if op == "sent":
            known: list[str | None] = list(prints) if len(prints) == len(ids) else [None] * len(ids)
            self.sent.update(zip(ids, known, strict=True))
            for digest, count in zip(digests, counts, strict=False):
                self._count(digest, count, at)
        else:
            self.intended.update(ids)

    def is_sent(self, letter_id: str, fingerprint: str) -> bool:
        """Whether a run confirmed this very letter at its destination: the same id and fingerprint (an entry of a
        journal that did not record fingerprints matches any)."""
        if letter_id not in self.sent:
            return False
        recorded = self.sent[letter_id]
        return recorded is None or recorded == fingerprint

    def lock(self) -> None:
        """Hold the journal for this process (an advisory lock on a file beside it), or refuse at once; then read
        it again (another replay may have written it since it was opened)."""
        if self._lock is not None:
            return
        if fcntl is not None:
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                handle = self.path.with_name(self.path.name + ".lock").open("a", encoding="utf-8")
            except OSError as exc:
                raise ConfigurationError(f"cannot use the replay journal {self.path}: {exc}; pass --journal or set "
                                         "VOLLEY_DLQ_JOURNAL_DIR to a writable place") from exc
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                handle.close()
                raise JournalBusyError(f"another volley dlq replay of this queue is running (it holds "
                                       f"{self.path}); wait for it, or stop it first") from None
            self._lock = handle
        self.reload()

    def _write(self, entry: dict[str, Any]) -> None:
        if self._file is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            torn = _ends_unfinished(self.path)
            self._file = self.path.open("a", encoding="utf-8")
            if torn:  # a run killed while writing left half a line: end it, or this entry would join it and be lost
                self._file.write("\n")
        self._file.write(json.dumps(entry) + "\n")
        self._file.flush()
        os.fsync(self._file.fileno())

    def record_intent(self, ids: Iterable[str]) -> None:
        listed = list(ids)
        if listed:
            self._write({"op": "intent", "ids": listed})
            self.intended.update(listed)

    def record_sent(self, ids: Iterable[str], prints: Iterable[str], digests: Iterable[str],
                    replays: Iterable[int]) -> None:
        """Letters confirmed at their destination: their ids and fingerprints, and the replay count each now carries
        (by content digest)."""
        listed, printed, named, counts = list(ids), list(prints), list(digests), list(replays)
        if listed:
            at = self._clock()
            self._write({"op": "sent", "ids": listed, "prints": printed, "digests": named, "replays": counts,
                         "at": at})
            self.sent.update(zip(listed, printed, strict=True))
            for digest, count in zip(named, counts, strict=True):
                self._count(digest, count, at)

    def in_doubt(self, letter_id: str) -> bool:
        """Its republish began in a run that was killed before the broker confirmed it."""
        return letter_id in self.intended and letter_id not in self.sent

    def rewrite(self, keep_sent: Iterable[str], keep_intended: Iterable[str] = ()) -> None:
        """After a run: keep only the ``sent`` and in-doubt ``intent`` entries a later run may still need, and the
        replay counts sent within ``count_retention_seconds`` (the ``max_counts`` most recent)."""
        self.close_file()
        self._forget_counts()
        sent = {i: self.sent[i] for i in sorted(set(keep_sent)) if i in self.sent}
        doubt = sorted(set(keep_intended) - set(sent))
        self.intended, self.sent = set(doubt), sent
        temporary = self.path.with_name(self.path.name + ".rewrite")  # (never the journal itself, whatever its name)
        with temporary.open("w", encoding="utf-8") as out:
            if doubt:
                out.write(json.dumps({"op": "intent", "ids": doubt}) + "\n")
            known = [i for i, fingerprint in sent.items() if fingerprint is not None]
            if known:
                out.write(json.dumps({"op": "sent", "ids": known, "prints": [sent[i] for i in known]}) + "\n")
            unknown = [i for i, fingerprint in sent.items() if fingerprint is None]
            if unknown:
                out.write(json.dumps({"op": "sent", "ids": unknown}) + "\n")
            if self.replays:
                out.write(json.dumps({"op": "replays", "counts": dict(self.replays),
                                      "at": {digest: self.replayed_at[digest] for digest in self.replays}}) + "\n")
            out.flush()
            os.fsync(out.fileno())
        temporary.replace(self.path)

    def _forget_counts(self) -> None:
        """Drop the counts last sent before the retention, then all but the ``max_counts`` most recent."""
        oldest = self._clock() - self.count_retention_seconds
        kept = sorted(((at, digest) for digest, at in self.replayed_at.items() if at >= oldest), reverse=True)
        kept = kept[:max(self.max_counts, 0)]
        self.replayed_at = {digest: at for at, digest in kept}
        self.replays = Counter({digest: self.replays[digest] for digest in self.replayed_at})

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


def _ends_unfinished(path: Path) -> bool:
    """Whether the file's last line has no newline (what a kill while writing leaves); False for no file."""
    try:
        with path.open("rb") as file:
            if file.seek(0, os.SEEK_END) == 0:
                return False
            file.seek(-1, os.SEEK_END)
            return file.read(1) != b"\n"
    except FileNotFoundError:
        return False
