"""Which letters a command applies to: ``--stage``, ``--error-type``, ``--reason-contains``, ``--key``, ``--since``
and ``--until``. Every given condition must hold; a repeated option (``--stage deserialize --stage validate``)
accepts any of its values."""

from __future__ import annotations

import re
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from volley.dlq.letter import DeadLetter
from volley.errors import ConfigurationError

_RELATIVE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def parse_time(text: str, option: str, now: float | None = None) -> float:
    """``2026-12-05T09:00`` (ISO 8601; without a zone, local time), or ``30m`` / ``2h`` / ``1d`` ago."""
    match = _RELATIVE.match(text.strip())
    if match:
        return (time.time() if now is None else now) - float(match.group(1)) * _UNITS[match.group(2)]
    try:
        return datetime.fromisoformat(text.strip()).timestamp()
    except ValueError:
        raise ConfigurationError(
            f"{option} {text!r} is neither an ISO 8601 time (2026-12-05T09:00, 2026-12-05T09:00+01:00) nor a "
            "duration ago (30m, 2h, 1d)") from None


def parse_duration(text: str, option: str) -> float:
    """``30m``, ``2h``, ``7d``: seconds."""
    match = _RELATIVE.match(text.strip())
    if not match:
        raise ConfigurationError(f"{option} {text!r} is not a duration (90s, 30m, 2h, 7d)")
    return float(match.group(1)) * _UNITS[match.group(2)]


@dataclass(frozen=True)
class LetterFilter:
    stages: Sequence[str] = ()
    error_types: Sequence[str] = ()
    reason_contains: str | None = None
    keys: Sequence[str] = ()
    since: float | None = None
    until: float | None = None

    def matches(self, letter: DeadLetter) -> bool:
        if self.stages and letter.stage not in self.stages:
            return False
        if self.error_types and letter.error_type not in self.error_types:
            return False
        if self.reason_contains is not None and self.reason_contains not in letter.reason:
            return False
        if self.keys and (letter.key is None or letter.key.decode(errors="replace") not in self.keys):
            return False
        if self.since is not None or self.until is not None:
            stamp = letter.timestamp
            if stamp is None:
                return False
            if self.since is not None and stamp < self.since:
                return False
            if self.until is not None and stamp >= self.until:
                return False
        return True

    @property
    def is_everything(self) -> bool:
        return self == LetterFilter()

    def describe(self) -> str:
        parts = [f"stage in {list(self.stages)}" if self.stages else "",
                 f"error type in {list(self.error_types)}" if self.error_types else "",
                 f"reason contains {self.reason_contains!r}" if self.reason_contains is not None else "",
                 f"key in {list(self.keys)}" if self.keys else "",
                 f"since {_when(self.since)}" if self.since is not None else "",
                 f"until {_when(self.until)}" if self.until is not None else ""]
        return ", ".join(p for p in parts if p) or "every letter"


def _when(stamp: float) -> str:
    return datetime.fromtimestamp(stamp).astimezone().isoformat(timespec="seconds")
