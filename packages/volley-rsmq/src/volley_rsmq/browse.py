"""Reading an RSMQ queue without receiving anything, for ``volley dlq``; deleting letters once dealt with.

Satisfies ``volley.ports.QueueBrowser`` and ``SettlingBrowser``. It reads the queue's sorted set and hash
directly: no message changes visibility and no receive count moves, so a worker consuming the queue meanwhile
is not disturbed. With ``headers: envelope`` (a dead-letter queue's default) stored envelopes are unwrapped into
value, key and headers, as the consumer does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from volley.message import Envelope
from volley_rsmq import envelope as envelope_codec
from volley_rsmq.client import RsmqClient, browse_ids, read_messages, sent_time
from volley_rsmq.settings import RsmqSettings


class RsmqBrowser:
    removes_each = True

    def __init__(self, qname: str, settings: RsmqSettings) -> None:
        self.qname = qname
        self.settings = settings
        self._client: RsmqClient | None = None
        self._ids: list[str] = []
        self._next = 0

    def _require(self) -> RsmqClient:
        if self._client is None:
            raise RuntimeError("RsmqBrowser used before start()")
        return self._client

    async def start(self) -> None:
        if self._client is None:
            self._client = RsmqClient(self.settings)
        self._ids = await asyncio.to_thread(browse_ids, self._client, self.qname)
        self._next = 0

    async def browse(self, max_messages: int) -> Sequence[Envelope]:
        client = self._require()
        while self._next < len(self._ids):
            page = self._ids[self._next:self._next + max_messages]
            self._next += len(page)
            found = await asyncio.to_thread(read_messages, client, self.qname, page)
            if found:
                return [self._envelope(*message) for message in found]
        return []

    def _envelope(self, message_id: str, body: bytes, rc: int) -> Envelope:
        value, key, headers = body, None, None
        if self.settings.headers == "envelope":
            value, key, headers = envelope_codec.unwrap(body)
        return Envelope(value, key, headers, self.qname, None, message_id, sent_time(message_id), max(rc, 1))

    async def settle(self, envelopes: Sequence[Envelope]) -> None:
        ids = [str(e.position) for e in envelopes]
        if ids:
            await asyncio.to_thread(self._require().delete, self.qname, ids)

    async def close(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            client.close()
