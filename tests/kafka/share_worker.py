"""A Kafka -> Kafka worker on a share group (or, for comparison, a consumer group), run as a subprocess by
the share-group crash test and the share-group benchmark.

    python share_worker.py BOOTSTRAP INPUT OUTPUT GROUP HANDLER_SECONDS [PROFILE [DELIVERY_LIMIT]]

``PROFILE`` is ``confluent-share`` (the default) or ``confluent``; ``DELIVERY_LIMIT`` is the share
group's ``share.delivery.count.limit`` (5, the broker's default, unless the test raised it). The handler is
sync and runs on the handler thread (``sync_handler_mode="thread"``), sleeping ``HANDLER_SECONDS`` per message
like I/O would, so that one worker's rate is bounded by its handler and not by the CPU. Outputs carry the
input's id, the worker's pid and the delivery count. Runs until killed (SIGTERM: graceful shutdown; SIGKILL:
the crash under test).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any


def main(argv: list[str]) -> None:
    from volley import Engine

    defaults = ["confluent-share", "5"]  # PROFILE, DELIVERY_LIMIT
    bootstrap, source, output, group, pause, profile, limit = [*argv, *defaults[len(argv) - 5:]][:7]
    codec = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}
    config: dict[str, Any] = {"bootstrap.servers": bootstrap, "group.id": group}
    if profile == "confluent-share":
        config["volley.share.delivery.limit"] = int(limit)
    else:
        config["auto.offset.reset"] = "earliest"
        config["volley.commit.interval.seconds"] = 0.2
    app = Engine(
        app_name="share-worker",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"profile": profile, **codec, "value": source, "config": config},
            "out": {"profile": "confluent", **codec, "value": output, "config": {"bootstrap.servers": bootstrap}},
        },
        metrics_port=None,
        poll_interval_seconds=0.1,
        shutdown_timeout_seconds=15.0,
        sync_handler_mode="thread",
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
        return [("out", {"id": message["id"], "pid": pid, "attempt": msg_ctx.attempt})]

    print("worker ready", flush=True)
    handler()


if __name__ == "__main__":
    import faulthandler
    import signal

    faulthandler.register(signal.SIGUSR1, all_threads=True)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)
    main(sys.argv[1:])
