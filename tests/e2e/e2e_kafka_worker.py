"""A Kafka -> Kafka app for ``volley run e2e_kafka_worker:app --workers N`` (tests/e2e/test_workers.py).

Everything comes from the environment, so each worker process the supervisor spawns builds the same app:
``KAFKA_BROKERS``, ``VOLLEY_E2E_INPUT``, ``VOLLEY_E2E_OUTPUT``, ``VOLLEY_E2E_GROUP``, ``VOLLEY_E2E_WORK_SECONDS``
(how long the handler works on one message, so that a kill lands mid-stream) and the supervisor's
``VOLLEY_WORKER_INDEX``. The index gives each worker a static group membership (``group.instance.id``), so a
worker restarted after a crash takes its partitions back at once instead of waiting for the dead member's session
to time out. Each output carries the input's id, the pid that handled it and the partition it came from.
"""

from __future__ import annotations

import os
import time
from typing import Any

from volley import Engine

PID = os.getpid()
WORK_SECONDS = float(os.environ.get("VOLLEY_E2E_WORK_SECONDS", "0.005"))
GROUP = os.environ.get("VOLLEY_E2E_GROUP", "volley-e2e-workers")
INDEX = os.environ.get("VOLLEY_WORKER_INDEX", "0")

codec = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}
engine = Engine(
    app_name="e2e-workers",
    input_queue="in",
    output_queues=["out"],
    queue_config={
        "in": {"profile": "confluent", **codec, "value": "${VOLLEY_E2E_INPUT}",
               "config": {"group.id": GROUP, "group.instance.id": f"{GROUP}-{INDEX}",
                          "session.timeout.ms": 10_000, "volley.commit.interval.seconds": 0.2}},
        "out": {"profile": "confluent", **codec, "value": "${VOLLEY_E2E_OUTPUT}"},
    },
    metrics_port=None,
    poll_interval_seconds=0.1,
    consume_batch_size=100,
    shutdown_timeout_seconds=15.0,
)


@engine.stream_app
def app(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    if WORK_SECONDS:
        time.sleep(WORK_SECONDS)
    return [("out", {"id": message["id"], "pid": PID, "partition": msg_ctx.partition}, {"key": str(message["id"])})]
