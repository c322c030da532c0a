"""The two-node example on real servers: Kafka -> node one -> RSMQ -> node two -> Kafka, until the maximum passes 10.

Node one consumes ``{"my_values": [...]}`` from a Kafka topic and publishes ``{"max_value": X}`` to an RSMQ queue.
Node two consumes that queue; while X <= 10 it sends ``[X, X+1, X+2]`` back to node one's topic. Seeded with
``[1, 2, 3]`` the maxima are 3.0, 5.0, 7.0, 9.0 and 11.0, as in ``volley demo``.

Where the servers are comes from the environment, as in py-volley: ``KAFKA_BROKERS`` (host:port) and
``REDIS_HOST`` (host or host:port). Run both nodes in one process with::

    KAFKA_BROKERS=localhost:9092 REDIS_HOST=localhost \
        volley run examples.two_node.worker:node_one examples.two_node.worker:node_two

or each in its own process (``volley run examples.two_node.worker:node_one``, and the same for ``node_two``).
With ``VOLLEY_EXAMPLE_BACKEND=sqlite`` every queue lives in one SQLite file instead (``VOLLEY_SQLITE_PATH``, default
``./volley.sqlite3``, needs volley-sqlite): the two nodes run as two processes on one machine with no server.
``VOLLEY_EXAMPLE_TOPIC``, ``VOLLEY_EXAMPLE_QUEUE`` and ``VOLLEY_EXAMPLE_GROUP`` rename the topic, the queue and
node one's consumer group.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

from pydantic import BaseModel

from volley import Engine

logger = logging.getLogger("examples.two_node")

VALUES_TOPIC = os.environ.get("VOLLEY_EXAMPLE_TOPIC", "volley.example.values")
MAXIMA_QUEUE = os.environ.get("VOLLEY_EXAMPLE_QUEUE", "volley-example-maxima")
CONSUMER_GROUP = os.environ.get("VOLLEY_EXAMPLE_GROUP", "volley-example-node-one")
VALUES_DLQ = f"{VALUES_TOPIC}.dlq"
MAXIMA_DLQ = f"{MAXIMA_QUEUE}-dlq"
LIMIT = 10


class ValuesMessage(BaseModel):
    my_values: list[float]


class MaxMessage(BaseModel):
    max_value: float


# VOLLEY_EXAMPLE_BACKEND=sqlite moves every queue into one SQLite file (VOLLEY_SQLITE_PATH, default
# ./volley.sqlite3): the same nodes then run as two processes with no server at all.
BACKEND = os.environ.get("VOLLEY_EXAMPLE_BACKEND", "servers")
if BACKEND not in ("servers", "sqlite"):
    raise SystemExit(f"VOLLEY_EXAMPLE_BACKEND must be 'servers' or 'sqlite', not {BACKEND!r}")

queue_config: dict[str, Any]
if BACKEND == "sqlite":
    # The same codecs as confluent / rsmq (orjson + Pydantic); the database file comes from VOLLEY_SQLITE_PATH.
    queue_config = {
        "values": {"value": VALUES_TOPIC, "profile": "sqlite-orjson-pydantic", "data_model": ValuesMessage},
        "values-dlq": {"value": VALUES_DLQ, "profile": "sqlite-dlq"},
        "maxima": {"value": MAXIMA_QUEUE, "profile": "sqlite-orjson-pydantic", "data_model": MaxMessage},
        "maxima-dlq": {"value": MAXIMA_DLQ, "profile": "sqlite-dlq"},
    }
else:
    # Both connectors would also read KAFKA_BROKERS / REDIS_HOST on their own; spelling them out with defaults
    # lets the example run against servers on localhost without any environment.
    kafka = {"bootstrap.servers": "${KAFKA_BROKERS:-localhost:9092}"}
    redis = {"host": "${REDIS_HOST:-localhost}"}
    queue_config = {
        "values": {"value": VALUES_TOPIC, "profile": "confluent", "data_model": ValuesMessage,
                   "config": {**kafka, "group.id": CONSUMER_GROUP}},
        "values-dlq": {"value": VALUES_DLQ, "profile": "confluent-dlq", "config": kafka},
        "maxima": {"value": MAXIMA_QUEUE, "profile": "rsmq", "data_model": MaxMessage, "config": redis},
        "maxima-dlq": {"value": MAXIMA_DLQ, "profile": "rsmq-dlq", "config": redis},
    }

node_one_engine = Engine(app_name="node-one", input_queue="values", output_queues=["maxima"],
                         dead_letter_queue="values-dlq", queue_config=queue_config, metrics_port=None,
                         poll_interval_seconds=0.1)
node_two_engine = Engine(app_name="node-two", input_queue="maxima", output_queues=["values"],
                         dead_letter_queue="maxima-dlq", queue_config=queue_config, metrics_port=None,
                         poll_interval_seconds=0.1)

# What node two has seen in this process, for run.py (and tests) to wait on; `volley run` ignores them.
maxima_seen: list[float] = []
finished = threading.Event()


@node_one_engine.stream_app
def node_one(message: ValuesMessage) -> list[tuple[str, MaxMessage]]:
    logger.info("Received %s", message)
    the_max = max(message.my_values)
    logger.info("the_max=%s", the_max)
    return [("maxima", MaxMessage(max_value=the_max))]


@node_two_engine.stream_app
def node_two(message: MaxMessage) -> bool | list[tuple[str, ValuesMessage]]:
    value = message.max_value
    logger.info("The maximum: %s", value)
    maxima_seen.append(value)
    if value > LIMIT:
        logger.info("That's it, we are done!")
        finished.set()
        return True
    return [("values", ValuesMessage(my_values=[value, value + 1, value + 2]))]
