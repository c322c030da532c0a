"""How long a thread waited for a CPU while it was ready to run: time the OS took from it, not its handler.

The sync executor moves a handler off the event loop when its calls are slow, judging by the wall clock. On a
loaded machine the OS deschedules a process for tens of milliseconds at a time, and a handler call that took
50 microseconds of work can read as 30 ms: two such readings within a second moved a fast handler to the
handler thread for good, and every batch then paid a thread hop and a fight over the GIL. Linux counts, per
thread, the time spent runnable but waiting for a CPU (the second field of ``/proc/thread-self/schedstat``);
subtracting it leaves the call's own time: its work, and any wait it caused itself (sleep, I/O, a lock).

Where that file does not exist (not Linux, or a kernel without schedstats) the wait reads as 0 and the
executor judges by the wall clock alone, as before.
"""

from __future__ import annotations

import os

SCHEDSTAT = "/proc/thread-self/schedstat"


class RunQueueWait:
    """A clock of the creating thread's waits for a CPU, in seconds (0.0 where the OS does not say).

    Create it on the thread it measures: ``/proc/thread-self`` names the opening thread. One read is a
    ``pread`` of an open file, about 2 to 10 microseconds.
    """

    def __init__(self) -> None:
        try:
            self._fd = os.open(SCHEDSTAT, os.O_RDONLY)
        except OSError:
            self._fd = -1

    def __call__(self) -> float:
        if self._fd < 0:
            return 0.0
        try:
            fields = os.pread(self._fd, 128, 0).split()
            return int(fields[1]) / 1e9
        except (OSError, IndexError, ValueError):
            return 0.0

    def close(self) -> None:
        fd, self._fd = self._fd, -1
        if fd >= 0:
            os.close(fd)
