"""Progress of a long replay or purge: a bar redrawn in place on a terminal, a plain line every few seconds
otherwise (logs, CI)."""

from __future__ import annotations

import sys
import time
from typing import Any, TextIO


class Progress:
    def __init__(self, total: int | None, stream: TextIO | None = None, every: float = 5.0) -> None:
        self.stream = stream or sys.stderr
        self.total = total
        self.seen = 0
        self.started = time.monotonic()
        self.last = 0.0
        self.every = every
        self.terminal = bool(getattr(self.stream, "isatty", lambda: False)())

    def update(self, counts: Any, read: int) -> None:
        self.seen += read
        now = time.monotonic()
        rate = counts.moved / max(now - self.started, 1e-6)
        text = f"read {self.seen}" + (f"/{self.total}" if self.total else "") + f", moved {counts.moved} ({rate:.0f}/s)"
        if self.terminal:
            bar = ""
            if self.total:
                filled = int(30 * min(self.seen, self.total) / self.total)
                bar = "[" + "#" * filled + "-" * (30 - filled) + "] "
            self.stream.write("\r" + bar + text)
            self.stream.flush()
        elif now - self.last >= self.every:
            self.last = now
            self.stream.write(text + "\n")
            self.stream.flush()

    def done(self) -> None:
        if self.terminal:
            self.stream.write("\n")
            self.stream.flush()
