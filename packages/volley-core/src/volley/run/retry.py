"""The one retry policy of handler calls: how long to wait before the n-th retry, and whether to retry at all.

Used by every way a handler runs (inline, on the handler thread, in async lanes); only the way of waiting
differs (blocking on the thread, awaiting on the loop). Once the run is stopping, a failing call is not retried:
neither before the backoff wait nor after a wait that the stop cut short. Such a message is given back
unacknowledged (delivered again), not dead-lettered: only a message whose retries are spent is a dead letter.
A retry is counted when its call is made, not when it is decided.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from volley.run.stopping import StopSignal
from volley.run.tokens import Outcome, Token, describe, members_of, reason_of

logger = logging.getLogger("volley")


class RetryPolicy:
    def __init__(self, app_name: str, max_retries: int, backoff_seconds: float, backoff_max_seconds: float,
                 stop: StopSignal) -> None:
        self.app_name = app_name
        self.max_retries = max_retries
        self.backoff_seconds = backoff_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.stop = stop
        # A tracer's record of each retry (volley.run.tracing); set once per run, None when nothing traces.
        self.on_retry: Callable[[Token, int, BaseException], None] | None = None

    def delay(self, attempt: int) -> float:
        """Seconds to wait before retry number ``attempt`` (1-based)."""
        return float(min(self.backoff_max_seconds, self.backoff_seconds * 2 ** min(attempt - 1, 30)))

    def should_retry(self, token: Token, failures: int, exc: BaseException) -> bool:
        """After the ``failures``-th failed call of ``token``: retry? Logs the retry when it says yes."""
        if failures > self.max_retries or self.stop.is_stopping:
            return False
        logger.warning("%s: handler failed on %s (%s); retry %d of %d", self.app_name, describe(token),
                       reason_of(exc), failures, self.max_retries)
        if self.on_retry is not None:
            self.on_retry(token, failures, exc)
        return True

    def give_up(self, token: Token, failures: int, exc: BaseException, out: Outcome) -> None:
        """``token``'s call failed ``failures`` times and is not called again. Its retries spent: a handler failure
        (dead-lettered). Cut short by the stop: given back unacknowledged, to be handled again after the restart."""
        if failures > self.max_retries:
            out.failures.append((token, "handler", exc))
            return
        logger.warning("%s: handler failed on %s (%s) while shutting down, with retries left; not dead-lettered: "
                       "it stays unacknowledged and will be delivered again", self.app_name, describe(token),
                       reason_of(exc))
        out.abandoned += len(members_of(token))

    def wait_blocking(self, attempt: int) -> bool:
        """On the handler thread: wait before retry ``attempt``; False if the run began stopping meanwhile."""
        return not self.stop.wait_blocking(self.delay(attempt))

    async def wait(self, attempt: int) -> bool:
        """On the loop: the same, awaiting."""
        return not await self.stop.wait(self.delay(attempt))
