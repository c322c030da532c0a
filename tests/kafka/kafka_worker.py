"""A Kafka -> Kafka worker, run as a subprocess by the crash and rebalance tests.

    python kafka_worker.py BOOTSTRAP INPUT OUTPUT GROUP INSTANCE_ID HANDLER_SECONDS [GROUP_PROTOCOL]

``INSTANCE_ID`` is a static group membership id ("-" for none): a worker restarted after kill -9 with the
same id takes its partitions back at once instead of waiting for the dead member's session to time out.
``VOLLEY_TEST_CONSUMER_CONFIG`` (JSON) adds consumer settings.
Runs until killed (SIGTERM: graceful shutdown; SIGKILL: the crash under test). ``HANDLER_SECONDS`` slows
the handler so that kills and rebalances land mid-stream. Outputs carry the input's id and the worker's pid.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


def main(argv: list[str]) -> None:
    from volley import Engine

    bootstrap, source, output, group, instance, pause, protocol = [*argv, "classic"][:7]
    codec = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}
    # Small fetches interleave the partitions, so that every partition is still mid-stream when a second
    # member joins (librdkafka otherwise drains one partition's large prefetch after another).
    consumer_config: dict[str, Any] = {"bootstrap.servers": bootstrap, "group.id": group,
                                       "volley.commit.interval.seconds": 0.2, "max.partition.fetch.bytes": 8192,
                                       "queued.max.messages.kbytes": 256, "group.protocol": protocol}
    # More librdkafka settings for the consumer, as JSON (e.g. a short session for a test that freezes the worker).
    consumer_config.update(json.loads(os.environ.get("VOLLEY_TEST_CONSUMER_CONFIG", "{}")))
    if instance != "-":
        consumer_config["group.instance.id"] = instance
        if protocol == "classic":  # under the consumer protocol the session timeout is the broker's
            consumer_config["session.timeout.ms"] = 10_000
    app = Engine(
        app_name="kafka-worker",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"profile": "confluent", **codec, "value": source, "config": consumer_config},
            "out": {"profile": "confluent", **codec, "value": output, "config": {"bootstrap.servers": bootstrap}},
        },
        metrics_port=None,
        poll_interval_seconds=0.1,
        shutdown_timeout_seconds=15.0,
    )
    seconds = float(pause)
    pid = os.getpid()
    handled = [False]

    @app.stream_app
    def handler(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        if not handled[0]:
            handled[0] = True
            print("worker handled its first message", flush=True)  # the tests wait for this line
        if seconds:
            time.sleep(seconds)
        return [("out", {"id": message["id"], "pid": pid, "p": msg_ctx.partition, "o": msg_ctx.position})]

    print("worker ready", flush=True)
    handler()


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(sys.argv[1:])
