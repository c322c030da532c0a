"""The connector through an Engine, configured by name, as a user would."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest
from volley_sqlite.store import Store

from volley import ConfigurationError, Engine, OutgoingMessage


def test_orders_to_invoices_with_a_dead_letter(tmp_path: Path) -> None:
    database = str(tmp_path / "shop.db")
    app = Engine(
        app_name="invoicer",
        input_queue="orders",
        output_queues=["invoices"],
        dead_letter_queue="dead-letters",
        queue_config={
            "orders": {
                "value": "orders",
                "profile": "sqlite",
                "config": {"path": database},
            },
            "invoices": {
                "value": "invoices",
                "profile": "sqlite",
                "config": {"path": database},
            },
            "dead-letters": {
                "value": "orders-dlq",
                "profile": "sqlite-dlq",
                "config": {"path": database},
            },
        },
        metrics_port=None,
    )

    @app.stream_app
    def invoice(order: dict) -> list[tuple[str, dict]]:
        return [
            (
                "invoices",
                {"order_id": order["order_id"], "cents": round(order["amount"] * 100)},
            )
        ]

    # seed the input as another application would
    store = Store(database, busy_timeout=5.0)
    store.insert(
        [
            OutgoingMessage("orders", b'{"order_id": 1, "amount": 2.5}'),
            OutgoingMessage("orders", b"oops"),
        ],
        default_delay=0.0,
    )
    store.close()

    report = invoice.run_until_drained(timeout=30)

    assert (report.acked, report.dead_lettered) == (1, 1)
    with sqlite3.connect(database) as db:
        rows = dict(db.execute("SELECT queue, value FROM volley_messages").fetchall())
    assert rows == {"invoices": b'{"order_id":1,"cents":250}', "orders-dlq": b"oops"}


def test_a_missing_path_fails_when_the_engine_is_built() -> None:
    with pytest.raises(ConfigurationError, match="needs config 'path'"):
        Engine(
            app_name="x",
            input_queue="in",
            queue_config={"in": {"value": "in", "profile": "sqlite"}},
            metrics_port=None,
        )
