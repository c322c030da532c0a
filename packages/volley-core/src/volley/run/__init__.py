"""One run of a stream app, one file per step, each step written once.

- ``run``: start, fetch with backpressure, the one shutdown that owns every task and thread;
- ``handling``: decode -> call -> interpret -> route (``routing``), with the one retry policy (``retry``);
- ``sync_executor`` and ``lanes``: where a handler runs (inline slices or the handler thread; async lanes);
- ``settlement``: outputs to producers, delivery reports and their retries, every input counted once;
  ``acking`` (acks and give-backs to the consumer) and ``deadletters`` (the DLQ's records);
- ``drain``, ``transactions``, ``rebalance``: drain detection, the exactly-once barrier, partition revokes.

Dependencies go one way: run -> executors -> handling -> routing; executors -> settlement -> ports.
"""

from volley.run.report import RunReport
from volley.run.run import BLOCKED_EXIT_CODE, Run

__all__ = ["BLOCKED_EXIT_CODE", "Run", "RunReport"]
