"""SQLite -> SQLite benchmark: Volley with the sqlite connector, the same work as the RSMQ benchmark, no server.

Each run moves the same 20,000 JSON orders from an input queue to an output
queue of one database file, doing per message what ``bench_rsmq.py`` does:
orjson decode, Pydantic v2 validation of ``Order``, the handler (builds an
``Enriched``), ``model_dump``, orjson encode, a durable insert of the output,
and the input's ack (a delete) once the output is committed. Default Engine
and connector settings (``synchronous=full``: every commit is fsynced), with
``sqlite-orjson-pydantic`` profiles.

``bench_rsmq.py`` calls :func:`sqlite_run` in its own run and prints
``sqlite.volley_msgs_per_s`` and ``sqlite.vs_rsmq`` (target >= 0.5). Run on
its own, this script prints the figures for each durability setting:
``sqlite.full_msgs_per_s``, ``sqlite.normal_msgs_per_s``, ``sqlite.off_msgs_per_s``.
"""

from __future__ import annotations

import logging
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPEATS = 3


def sqlite_run(bodies: list[bytes], directory: Path, synchronous: str = "full") -> float:
    """Volley, sqlite in and out (one file), default settings; messages per second from start to drained."""
    from bench_rsmq_model import Enriched, Order, handle

    from volley import Engine
    from volley_sqlite import admin

    path = directory / f"bench-{synchronous}-{time.monotonic_ns()}.sqlite3"
    admin.publish(path, "orders", bodies)
    config = {"path": str(path), "synchronous": synchronous}
    app = Engine(
        app_name="bench-sqlite",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"value": "orders", "profile": "sqlite-orjson-pydantic", "data_model": Order, "config": config},
            "out": {"value": "enriched", "profile": "sqlite-orjson-pydantic", "data_model": Enriched,
                    "config": config},
        },
        metrics_port=None,
    )

    @app.stream_app
    def handler(order: Order) -> list[tuple[str, Enriched]]:
        return [("out", handle(order))]

    started = time.perf_counter()
    report = handler.run_until_drained(timeout=600, max_messages=len(bodies))
    elapsed = time.perf_counter() - started
    if report.acked != len(bodies):
        raise SystemExit(f"sqlite run acked {report.acked} of {len(bodies)}: {report}")
    stats = admin.stats(path)
    if sum(stats["orders"].values()) or stats["enriched"]["ready"] != len(bodies):
        raise SystemExit(f"sqlite run left {stats}")
    path.unlink()
    return len(bodies) / elapsed


def main() -> None:
    sys.path.insert(0, str(HERE))
    import _orders as orders
    import bench_rsmq

    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("volley").setLevel(logging.ERROR)  # "no dead_letter_queue configured" is expected here
    bodies = orders.payloads(bench_rsmq.N)
    with tempfile.TemporaryDirectory(prefix="bench-sqlite-") as tmp:
        workdir = Path(tmp)
        bench_rsmq.write_model(workdir)
        sys.path.insert(0, str(workdir))
        print(f"sqlite.messages: {len(bodies)}")
        for synchronous in ("full", "normal", "off"):
            best = max(sqlite_run(bodies, workdir, synchronous) for _ in range(REPEATS))
            print(f"sqlite.{synchronous}_msgs_per_s: {best:.0f}")


if __name__ == "__main__":
    main()
