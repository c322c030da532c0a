"""The fetch and transaction threads: volley-core's ``SerialThread``, one per consumer.

One consumer must always be called from the same thread: librdkafka serves
rebalance callbacks on whichever thread polls, and they must not overlap.
"""

from __future__ import annotations

from volley.threads import SerialThread as BlockingWorker

__all__ = ["BlockingWorker"]
