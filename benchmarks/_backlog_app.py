"""The worker that ``_backlog.py`` measures, run as ``volley run _backlog_app:app`` (from this folder).

SQLite in and out (one file, ``BACKLOG_DB``), the core bench's work per message (orjson, Pydantic ``Order`` ->
``Enriched``), and a slow handler: it blocks ``BACKLOG_HANDLER_SECONDS`` per message on the handler thread, so
that the backlog stays far larger than what the worker may fetch ahead (``max_buffered``).
"""

from __future__ import annotations

import os
import time

from _orders import load_model

from volley import Engine

_MODEL = load_model()
Order, Enriched, handle = _MODEL.Order, _MODEL.Enriched, _MODEL.handle
PATH = os.environ["BACKLOG_DB"]
PAUSE = float(os.environ.get("BACKLOG_HANDLER_SECONDS", "0.001"))

engine = Engine(
    app_name="bench-backlog",
    input_queue="in",
    output_queues=["out"],
    queue_config={
        "in": {"value": "orders", "profile": "sqlite-orjson-pydantic", "data_model": Order,
               "config": {"path": PATH}},
        "out": {"value": "enriched", "profile": "sqlite-orjson-pydantic", "data_model": Enriched,
                "config": {"path": PATH}},
    },
    metrics_port=None,
    sync_handler_mode="thread",
)


@engine.stream_app
def app(order: Order) -> list[tuple[str, Enriched]]:
    time.sleep(PAUSE)
    return [("out", handle(order))]
