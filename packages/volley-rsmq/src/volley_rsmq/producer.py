"""The RSMQ producer: a sender thread that writes batches with one Lua script per queue and batch.

``produce`` only appends to an in-memory queue and returns; the sender thread
takes up to ``send_batch_size`` records at a time, sends those of each
destination queue in one round trip (creating the queue on first use), and
reports the whole batch through ``on_delivery`` once Redis has applied it.

A per-message ``delay`` (the handler's ``{"delay": seconds}``) hides the
message for that long, as RSMQ's sendMessage does; without one the
producer's configured ``delay`` applies, and without that the queue's own.
Redis errors that may pass (connection trouble, and error replies such as
READONLY after a failover, OOM or BUSY: see ``client.is_transient``) are
retried with exponential backoff (the connection is re-established by
redis-py) for up to
``delivery_timeout_seconds`` after the record was accepted; only then is it
reported as failed. A retry after a lost reply may store a message twice,
which at-least-once allows. Errors Redis answers (a key of the wrong type,
say) and records larger than a configured ``maxsize`` fail at once.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Sequence

import redis

from volley.errors import DeliveryError, InvalidRecordError
from volley.message import OutgoingMessage
from volley.ports import DeliveryCallback, DeliveryFailure
from volley_rsmq import envelope as envelope_codec
from volley_rsmq._util import ThrottledLog, connect
from volley_rsmq.client import RsmqClient, is_transient
from volley_rsmq.settings import RsmqSettings, validate_qname

logger = logging.getLogger("volley.rsmq")

_Pending = tuple[OutgoingMessage, DeliveryCallback, float]  # record, its callback, monotonic time accepted


class RsmqProducer:
    """Sends records to RSMQ queues of one Redis server (each record names its queue in ``topic``)."""

    def __init__(self, settings: RsmqSettings) -> None:
        self.settings = settings
        self._client: RsmqClient | None = None
        self._cond = threading.Condition()
        self._pending: deque[_Pending] = deque()
        self._outstanding = 0  # accepted and not reported yet
        self._stopping = False
        self._stop_deadline = float("inf")
        self._thread: threading.Thread | None = None
        self._valid_topics: set[str] = set()
        self._wrap = settings.headers == "envelope"
        self._trouble = ThrottledLog()
        self.retries = 0  # send attempts that failed and were retried (for tests and metrics)

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        self._client = RsmqClient(self.settings)
        await asyncio.get_running_loop().run_in_executor(
            None, connect, self._client, self.settings.connect_timeout_seconds
        )
        self._thread = threading.Thread(target=self._send_loop, name="volley-rsmq-send", daemon=True)
        self._thread.start()

    async def flush(self, timeout: float) -> None:
        def wait() -> bool:
            with self._cond:
                return self._cond.wait_for(lambda: self._outstanding == 0, timeout)

        if self._outstanding and not await asyncio.get_running_loop().run_in_executor(None, wait):
            raise TimeoutError(
                f"RSMQ producer still has {self._outstanding} record(s) unconfirmed after {timeout} s"
            )

    async def close(self) -> None:
        if self._thread is None:
            return
        try:
            await self.flush(self.settings.close_timeout_seconds)
        except TimeoutError as exc:
            logger.error("%s; reporting them as failed", exc)
        with self._cond:
            self._stopping = True
            self._stop_deadline = time.monotonic()
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        await asyncio.get_running_loop().run_in_executor(None, thread.join, 1.0)  # daemon: a hung call is left
        if self._client is not None:
            self._client.close()

    # ------------------------------------------------------------------ producing

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        if not messages:
            return
        if self._thread is None:
            raise RuntimeError("RsmqProducer.start() was not called, or it is closed")
        now = time.monotonic()
        with self._cond:
            self._pending.extend((message, on_delivery, now) for message in messages)
            self._outstanding += len(messages)
            self._cond.notify()

    def outstanding(self) -> int:
        return self._outstanding

    def _send_loop(self) -> None:
        limit = self.settings.send_batch_size
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                count = min(limit, len(self._pending))
                batch = [self._pending.popleft() for _ in range(count)]
            try:
                delivered, failed = self._send_batch(batch)
            except Exception as exc:  # not Redis's answer (that is handled inside): the batch fails, the thread lives
                logger.exception("sending %d message(s) to RSMQ failed", len(batch))
                delivered, failed = [], [(item, DeliveryError(f"sending to RSMQ failed: {exc!r}")) for item in batch]
            self._report(delivered, failed)

    def _send_batch(self, batch: list[_Pending]) -> tuple[list[_Pending], list[tuple[_Pending, BaseException]]]:
        by_topic: dict[str, list[_Pending]] = {}
        failed: list[tuple[_Pending, BaseException]] = []
        for item in batch:
            topic = item[0].topic
            if topic not in self._valid_topics:
                try:
                    validate_qname(topic, "RSMQ output queue")
                except ValueError as exc:
                    failed.append((item, InvalidRecordError(str(exc))))
                    continue
                self._valid_topics.add(topic)
            by_topic.setdefault(topic, []).append(item)
        delivered: list[_Pending] = []
        for topic, items in by_topic.items():
            bodies: list[tuple[int | None, bytes]] = []
            sendable: list[_Pending] = []
            for item in items:
                try:
                    body = self._body(item[0])
                except (UnicodeError, ValueError, TypeError, AttributeError) as exc:  # the record's own fault
                    failed.append((item, InvalidRecordError(f"RSMQ queue {topic!r}: the record cannot be written: "
                                                            f"{exc!r}")))
                    continue
                maxsize = self.settings.maxsize
                if maxsize is not None and maxsize != -1 and len(body) > maxsize:
                    failed.append((item, InvalidRecordError(
                        f"message of {len(body)} bytes is larger than the RSMQ config 'maxsize' ({maxsize}) of "
                        f"queue {topic!r}")))
                    continue
                delay = item[0].delay if item[0].delay is not None else self.settings.delay
                bodies.append((None if delay is None else max(0, round(delay * 1000)), body))
                sendable.append(item)
            if not sendable:
                continue
            error = self._send_with_retries(topic, bodies, min(item[2] for item in sendable))
            if error is None:
                delivered.extend(sendable)
            else:
                failed.extend((item, error) for item in sendable)
        return delivered, failed

    def _body(self, message: OutgoingMessage) -> bytes:
        if self._wrap:
            return envelope_codec.wrap(message.value, message.key, message.headers)
        return message.value

    def _send_with_retries(
        self, topic: str, bodies: list[tuple[int | None, bytes]], accepted: float
    ) -> BaseException | None:
        client = self._client
        assert client is not None
        backoff = self.settings.retry_backoff_seconds
        give_up_at = accepted + self.settings.delivery_timeout_seconds
        while True:
            try:
                client.send(topic, bodies)
            except redis.RedisError as exc:
                if not is_transient(exc):
                    logger.error("RSMQ queue %r refused %d message(s): %s", topic, len(bodies), exc)
                    return DeliveryError(f"RSMQ queue {topic!r}: Redis refused the messages: {exc}")
                now = time.monotonic()
                if now >= give_up_at or now >= self._stop_deadline:
                    logger.error("giving up sending %d message(s) to RSMQ queue %r: %s", len(bodies), topic, exc)
                    return DeliveryError(
                        f"RSMQ queue {topic!r}: Redis unreachable or refusing for {now - accepted:.1f} s "
                        f"(delivery_timeout_seconds={self.settings.delivery_timeout_seconds:g}): {exc}"
                    )
                self.retries += 1
                self._trouble.warning("sending to RSMQ queue %r failed, will retry: %s", topic, exc)
                with self._cond:
                    self._cond.wait_for(lambda: time.monotonic() >= self._stop_deadline, min(backoff, give_up_at - now))
                backoff = min(backoff * 2, 1.0)
            else:
                return None

    def _report(self, delivered: list[_Pending], failed: list[tuple[_Pending, BaseException]]) -> None:
        if not delivered and not failed:
            return
        callbacks: dict[int, tuple[DeliveryCallback, list[OutgoingMessage], list[DeliveryFailure]]] = {}
        for message, callback, _ in delivered:
            callbacks.setdefault(id(callback), (callback, [], []))[1].append(message)
        for (message, callback, _), error in failed:
            callbacks.setdefault(id(callback), (callback, [], []))[2].append((message, error))
        for callback, ok, bad in callbacks.values():
            try:
                callback(ok, bad)
            except Exception:
                logger.exception("the delivery callback raised; the records are considered reported")
        with self._cond:
            self._outstanding -= len(delivered) + len(failed)
            self._cond.notify_all()
