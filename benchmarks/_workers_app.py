"""The app ``bench_kafka_workers.py`` runs with ``volley run [--workers N] _workers_app:app``.

The Kafka bench's work per message (``bench_kafka_model``, on PYTHONPATH), the ``confluent`` profile at its
defaults; only the group protocol is chosen (``BENCH_GROUP_PROTOCOL``: classic or consumer).
"""

from __future__ import annotations

import os

from bench_kafka_model import Enriched, Order, handle

from volley import Engine

BROKERS = os.environ["BENCH_BROKERS"]

engine = Engine(
    app_name="bench-workers",
    input_queue="in",
    output_queues=["out"],
    queue_config={
        "in": {"value": os.environ["BENCH_SOURCE"], "profile": "confluent", "data_model": Order,
               "config": {"bootstrap.servers": BROKERS, "group.id": os.environ["BENCH_GROUP"],
                          "group.protocol": os.environ.get("BENCH_GROUP_PROTOCOL", "classic")}},
        "out": {"value": os.environ["BENCH_OUTPUT"], "profile": "confluent", "data_model": Enriched,
                "config": {"bootstrap.servers": BROKERS}},
    },
    metrics_port=None,
)


@engine.stream_app
def app(order: Order) -> list[tuple[str, Enriched]]:
    return [("out", handle(order))]
