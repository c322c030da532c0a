"""A Kafka -> Kafka worker, run as a subprocess by the crash and rebalance tests (a consumer group) and by the
share-group crash test and benchmark (``--share``).

    python kafka_worker.py BOOTSTRAP INPUT OUTPUT GROUP INSTANCE_ID HANDLER_SECONDS [GROUP_PROTOCOL]
    python kafka_worker.py --share BOOTSTRAP INPUT OUTPUT GROUP HANDLER_SECONDS [PROFILE [DELIVERY_LIMIT]]

Consumer group: ``INSTANCE_ID`` is a static group membership id ("-" for none): a worker restarted after
kill -9 with the same id takes its partitions back at once instead of waiting for the dead member's session to
time out. ``VOLLEY_TEST_CONSUMER_CONFIG`` (JSON) adds consumer settings.

``--share``: ``PROFILE`` is ``confluent-share`` (the default) or ``confluent`` (for comparison);
``DELIVERY_LIMIT`` is the share group's ``share.delivery.count.limit`` (5, the broker's default, unless the
test raised it). The handler is sync and runs on the handler thread (``sync_handler_mode="thread"``), so that
one worker's rate is bounded by its handler's sleep, like I/O would, and not by the CPU.

Runs until killed (SIGTERM: graceful shutdown; SIGKILL: the crash under test). ``HANDLER_SECONDS`` slows the
handler so that kills and rebalances land mid-stream. Outputs carry the input's id, the worker's pid, the
input's partition and position, and its delivery count.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


def consumer_group_input(argv: list[str]) -> tuple[dict[str, Any], str, str, dict[str, Any]]:
    """The input queue's profile and config, the handler's seconds, the app name and extra Engine settings."""
    bootstrap, _source, _output, group, instance, pause, protocol = [*argv, "classic"][:7]
    # Small fetches interleave the partitions, so that every partition is still mid-stream when a second
    # member joins (librdkafka otherwise drains one partition's large prefetch after another).
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "group.id": group,
                              "volley.commit.interval.seconds": 0.2, "max.partition.fetch.bytes": 8192,
                              "queued.max.messages.kbytes": 256, "group.protocol": protocol}
    # More librdkafka settings for the consumer, as JSON (e.g. a short session for a test that freezes the worker).
    config.update(json.loads(os.environ.get("VOLLEY_TEST_CONSUMER_CONFIG", "{}")))
    if instance != "-":
        config["group.instance.id"] = instance
        if protocol == "classic":  # under the consumer protocol the session timeout is the broker's
            config["session.timeout.ms"] = 10_000
    return {"profile": "confluent", "config": config}, pause, "kafka-worker", {}


def share_group_input(argv: list[str]) -> tuple[dict[str, Any], str, str, dict[str, Any]]:
    defaults = ["confluent-share", "5"]  # PROFILE, DELIVERY_LIMIT
    bootstrap, _source, _output, group, pause, profile, limit = [*argv, *defaults[len(argv) - 5:]][:7]
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "group.id": group}
    if profile == "confluent-share":
        config["volley.share.delivery.limit"] = int(limit)
    else:
        config["auto.offset.reset"] = "earliest"
        config["volley.commit.interval.seconds"] = 0.2
    return {"profile": profile, "config": config}, pause, "share-worker", {"sync_handler_mode": "thread"}


def main(argv: list[str]) -> None:
    from volley import Engine

    share = argv[:1] == ["--share"]
    argv = argv[1:] if share else argv
    source_queue, pause, app_name, engine_settings = (share_group_input if share else consumer_group_input)(argv)
    bootstrap, source, output = argv[:3]
    codec = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}
    app = Engine(
        app_name=app_name,
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {**source_queue, **codec, "value": source},
            "out": {"profile": "confluent", **codec, "value": output, "config": {"bootstrap.servers": bootstrap}},
        },
        metrics_port=None,
        poll_interval_seconds=0.1,
        shutdown_timeout_seconds=15.0,
        **engine_settings,
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
        return [("out", {"id": message["id"], "pid": pid, "p": msg_ctx.partition, "o": msg_ctx.position,
                         "attempt": msg_ctx.attempt})]

    print("worker ready", flush=True)
    handler()


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(sys.argv[1:])
