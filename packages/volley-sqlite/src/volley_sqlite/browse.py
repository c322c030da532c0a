"""Reading a queue in place for ``volley dlq``, and deleting messages once they are dealt with.

Satisfies ``volley.ports.QueueBrowser`` and ``SettlingBrowser``: rows are read without a lease or an attempt, so a
consumer of the queue is not disturbed, and ``settle`` deletes exactly the given rows.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from volley.message import Envelope
from volley_sqlite import database as databases
from volley_sqlite import schema
from volley_sqlite.database import Database, open_database
from volley_sqlite.settings import SqliteSettings


class SqliteBrowser:
    removes_each = True

    def __init__(self, queue: str, settings: SqliteSettings) -> None:
        self.queue = queue
        self.settings = settings
        self._db: Database | None = None
        self._after = 0
        self._upto = 0

    def _require(self) -> Database:
        if self._db is None:
            raise RuntimeError("SqliteBrowser used before start()")
        return self._db

    async def start(self) -> None:
        if self._db is not None:
            return
        self._db = await open_database(self.settings)
        self._upto = await self._db.call(schema.last_id)

    async def browse(self, max_messages: int) -> Sequence[Envelope]:
        after, upto, queue = self._after, self._upto, self.queue
        found = await self._require().call(lambda db: schema.browse(db, queue, after, upto, max_messages))
        if found:
            self._after = found[-1].position
        return found

    async def settle(self, envelopes: Sequence[Envelope]) -> None:
        ids = [int(e.position) for e in envelopes]
        queue = self.queue
        if ids:
            await self._require().call(lambda db: schema.delete(db, queue, ids))

    async def close(self) -> None:
        db, self._db = self._db, None
        if db is not None:
            await asyncio.to_thread(databases.release, db)
