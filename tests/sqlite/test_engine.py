"""The sqlite connector through an Engine, configured by profile name as a user would, and the sqlite harness."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from volley import ConfigurationError, Engine
from volley.message import MessageContext
from volley.plugins import get_registry
from volley_sqlite import admin
from volley_sqlite.plugin import PROFILES
from volley_sqlite.testing import sqlite_harness


def test_orders_to_invoices_with_a_dead_letter(tmp_path: Path) -> None:
    database = str(tmp_path / "shop.sqlite3")
    config = {"path": database}
    app = Engine(
        app_name="invoicer",
        input_queue="orders",
        output_queues=["invoices"],
        dead_letter_queue="dead-letters",
        queue_config={
            "orders": {"value": "orders", "profile": "sqlite", "config": config},
            "invoices": {"value": "invoices", "profile": "sqlite", "config": config},
            "dead-letters": {"value": "orders-dlq", "profile": "sqlite-dlq", "config": config},
        },
        metrics_port=None,
        poll_interval_seconds=0.05,
    )

    @app.stream_app
    def invoice(order: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [("invoices", {"order_id": order["order_id"], "cents": round(order["amount"] * 100)})]

    orders = [json.dumps({"order_id": i, "amount": i + 0.5}).encode() for i in range(200)]
    admin.publish(database, "orders", [*orders[:100], b"oops", *orders[100:]])

    report = invoice.run_until_drained(timeout=60, drain_idle_seconds=0.1)

    assert (report.acked, report.dead_lettered) == (200, 1), report
    invoices = [json.loads(v) for v in admin.values(database, "invoices")]
    assert sorted(i["order_id"] for i in invoices) == list(range(200))
    assert admin.stats(database)["orders"] == {"ready": 0, "delayed": 0, "held": 0, "acked": 0}
    [dead] = admin.messages(database, "orders-dlq")
    assert dead.value == b"oops"
    assert dead.headers is not None and dead.headers["volley-source-queue"] == b"orders"


class Reading(BaseModel):
    sensor: str
    seq: int


def test_pydantic_profile_keeps_order_per_key_across_partitions(tmp_path: Path) -> None:
    database = str(tmp_path / "sensors.sqlite3")
    config = {"path": database, "partitions": 4}
    app = Engine(
        app_name="sensors",
        input_queue="readings",
        output_queues=["seen"],
        queue_config={
            "readings": {"value": "readings", "profile": "sqlite-orjson-pydantic", "data_model": Reading,
                         "config": config},
            "seen": {"value": "seen", "profile": "sqlite-orjson-pydantic", "data_model": Reading, "config": config},
        },
        metrics_port=None,
        poll_interval_seconds=0.05,
        max_in_flight=50,
    )

    @app.stream_app
    async def forward(reading: Reading, msg_ctx: MessageContext) -> list[tuple[str, Reading, dict[str, Any]]]:
        assert msg_ctx.partition is not None and msg_ctx.attempt == 1
        return [("seen", reading, {"key": reading.sensor})]

    for seq in range(50):
        for sensor in ("a", "b", "c", "d", "e"):
            admin.publish(database, "readings", [Reading(sensor=sensor, seq=seq).model_dump_json().encode()],
                          key=sensor.encode())
    report = forward.run_until_drained(timeout=60, drain_idle_seconds=0.1)
    assert report.acked == 250
    seen = [Reading.model_validate_json(m.value) for m in admin.messages(database, "seen")]
    for sensor in "abcde":
        assert [r.seq for r in seen if r.sensor == sensor] == list(range(50)), f"order broken for {sensor}"


def test_redelivery_counts_attempts_through_the_engine(tmp_path: Path) -> None:
    """A message the handler gives back comes again with the next attempt number, from the broker's count."""
    database = str(tmp_path / "flaky.sqlite3")
    config = {"path": database}
    app = Engine(
        app_name="flaky",
        input_queue="in",
        dead_letter_queue="dlq",
        queue_config={"in": {"value": "in", "profile": "sqlite", "config": config},
                      "dlq": {"value": "in-dlq", "profile": "sqlite-dlq", "config": config}},
        metrics_port=None,
        poll_interval_seconds=0.05,
        redelivery_delay_seconds=0.0,
    )
    attempts: list[int] = []

    @app.stream_app
    def handler(message: dict[str, Any], msg_ctx: MessageContext) -> bool:
        attempts.append(msg_ctx.attempt)
        return msg_ctx.attempt >= 3  # give it back twice

    admin.publish(database, "in", [b'{"x": 1}'])
    report = handler.run_until_drained(timeout=60, drain_idle_seconds=0.1)
    assert attempts == [1, 2, 3]
    assert (report.acked, report.nacked) == (1, 2)
    assert admin.messages(database, "in") == []


def test_harness_runs_an_app_on_a_temporary_database() -> None:
    app = Engine(app_name="doubler", input_queue="in", output_queues=["out"],
                 queue_config={"in": {"value": "in", "profile": "memory"},
                               "out": {"value": "out", "profile": "memory"}},
                 metrics_port=None)

    @app.stream_app
    def double(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [("out", {"value": message["value"] * 2})]

    h = sqlite_harness(double)
    try:
        h.send_many([{"value": i} for i in range(5)])
        result = h.run()
        assert result.outputs("out") == [{"value": 2 * i} for i in range(5)]
        assert result.report.acked == 5
        assert h.pending("in") == []
        h.send({"value": 21})
        # Each run's result holds what that run produced, as the memory harness's does (docs/testing.md); the
        # file keeps its queues between runs, so before this it held the first run's five outputs too.
        assert h.run().outputs("out") == [{"value": 42}]
        assert len(admin.messages(h.path, "out")) == 6
    finally:
        h.close()


def test_profiles_are_registered_by_the_distribution() -> None:
    registry = get_registry()
    for name in PROFILES:
        assert ("profile", name) in registry
        assert registry.entries["profile"][name].distribution == "volley-sqlite"
    assert registry.entries["connector"]["sqlite"].distribution == "volley-sqlite"


def test_bad_settings_fail_when_the_engine_is_built(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="unknown config key"):
        Engine(app_name="x", input_queue="in",
               queue_config={"in": {"value": "in", "profile": "sqlite", "config": {"path": "x", "vt_seconds": 3}}},
               metrics_port=None)


def test_unknown_name_hints_name_the_distribution() -> None:
    """Where volley-sqlite is not installed, its profile names say what to install; its serializers, likewise."""
    from volley.plugins import Registry

    empty = Registry()
    assert empty.unknown_message("profile", "sqlite-dlq").endswith("(pip install volley-sqlite)")
    assert empty.unknown_message("connector", "sqlite").endswith("(pip install volley-sqlite)")
    assert empty.unknown_message("serializer", "orjson").endswith("(pip install 'volley-serializers[orjson]')")
