"""Acknowledging: settled inputs reach the consumer in batches, acks and give-backs alike.

An ack in progress is not cut off within the shutdown deadline: shutdown asks the acker to finish (``close``) and
waits for it, so an input counted as acked has reached the consumer's ``ack`` by the time the run returns. One
still hanging past the deadline is cancelled, and its inputs are counted abandoned instead (they may come again).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from volley.message import Envelope
from volley.ports import Consumer, ReasonedNack
from volley.run.report import RunReport

logger = logging.getLogger("volley")


class Acker:
    def __init__(self, consumer: Consumer, app_name: str, report: RunReport, *, redelivery_delay_seconds: float,
                 backoff_max_seconds: float, transactional: bool) -> None:
        self.consumer = consumer
        self.app_name = app_name
        self.report = report
        self.redelivery_delay_seconds = redelivery_delay_seconds
        self.backoff_max_seconds = backoff_max_seconds
        self.transactional = transactional  # acks go with the transaction's commit, not through ack()
        self.reasoned: ReasonedNack | None = consumer if isinstance(consumer, ReasonedNack) else None
        self.acks: list[Envelope] = []
        self.nacks: list[tuple[Envelope, str]] = []
        self.wake = asyncio.Event()
        self._closing = False

    def pending(self) -> bool:
        return bool(self.acks or self.nacks)

    async def run(self, after_flush: Callable[[], None] | None = None) -> None:
        """The ack loop: flush whenever something settled, until ``close``; a flush in progress completes."""
        while True:
            await self.wake.wait()
            self.wake.clear()
            await self.flush()
            if self._closing:
                return
            if after_flush is not None:
                after_flush()
            await asyncio.sleep(0)  # let more settle within this loop iteration

    async def close(self, task: asyncio.Task[None], timeout: float) -> None:
        """Finish the flush in progress, flush what is left, stop the loop (cancelled only past ``timeout``)."""
        self._closing = True
        self.wake.set()
        if not task.done():
            done, _ = await asyncio.wait({task}, timeout=timeout)
            if not done:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        await self.flush()

    async def flush(self) -> None:
        if self.acks and not self.transactional:
            acks, self.acks = self.acks, []
            try:
                await self.consumer.ack(acks)
            except asyncio.CancelledError:
                # Cut off past the shutdown deadline: not known to be acknowledged, so not counted as acked.
                self.report.acked -= len(acks)
                self.report.abandoned += len(acks)
                raise
            except Exception as exc:
                logger.error("%s: acknowledging %d message(s) failed: %s; they will be delivered again",
                             self.app_name, len(acks), exc)
                self.report.add_error(f"ack: {exc}")
        if self.nacks:
            await self._give_back()

    async def _give_back(self) -> None:
        nacks, self.nacks = self.nacks, []
        # Redelivery backs off with the delivery count, so a message that keeps failing costs less and less
        # until max_deliveries sends it to the DLQ.
        groups: dict[tuple[float, str], list[Envelope]] = {}
        for env, reason in nacks:
            groups.setdefault((self.redelivery_delay(env), reason), []).append(env)
        for (delay, reason), envelopes in groups.items():
            try:
                if self.reasoned is not None:
                    await self.reasoned.nack_with_reason(envelopes, delay, reason)
                else:
                    await self.consumer.nack(envelopes, delay)
            except Exception as exc:
                logger.error("%s: giving back %d message(s) failed: %s", self.app_name, len(envelopes), exc)

    def redelivery_delay(self, env: Envelope) -> float:
        base = self.redelivery_delay_seconds
        return float(min(self.backoff_max_seconds, base * 2 ** max(0, min(env.attempt - 1, 16))))
