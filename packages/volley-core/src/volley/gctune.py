"""Garbage-collector tuning while apps run (``Engine(tune_gc=True)``, the default).

A stream worker keeps every message of a batch alive until its outputs are
confirmed: a thousand envelopes and outgoing records at a time, all tracked by
the cyclic garbage collector. With CPython's default first-generation threshold
(700) that sets off a collection every few hundred messages, each walking the
young objects and promoting the survivors, so that the collector's share of a
worker's CPU time reaches 7-10 % where a plain loop (whose objects die at once)
pays nothing. Raising the threshold to 10,000 while apps run removes most of
that; the cost is at most that many unreachable objects waiting a little longer.

Process-wide by nature, so: reference-counted over the apps running in the
process, the previous thresholds restored when the last one stops, and hands
off when the collector is disabled or someone else has changed the threshold
in the meantime.
"""

from __future__ import annotations

import gc
import threading

GEN0_THRESHOLD = 10_000

_lock = threading.Lock()
_users = 0
_saved: tuple[int, int, int] | None = None


def acquire() -> None:
    """An app starts: raise the first-generation threshold, unless it is already higher or disabled (0)."""
    global _users, _saved
    with _lock:
        if _users == 0:
            current = gc.get_threshold()
            if 0 < current[0] < GEN0_THRESHOLD:
                _saved = current
                gc.set_threshold(GEN0_THRESHOLD, current[1], current[2])
            else:
                _saved = None
        _users += 1


def release() -> None:
    """An app stopped: the last one restores the previous thresholds (if nobody changed them since)."""
    global _users, _saved
    with _lock:
        _users = max(0, _users - 1)
        if _users == 0 and _saved is not None:
            if gc.get_threshold()[0] == GEN0_THRESHOLD:
                gc.set_threshold(*_saved)
            _saved = None
