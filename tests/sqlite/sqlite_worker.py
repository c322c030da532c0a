"""A sqlite -> sqlite pass-through worker, run as a subprocess by the crash test.

    python sqlite_worker.py DATABASE INPUT OUTPUT VT HANDLER_SECONDS

It runs until killed (SIGTERM: graceful; SIGKILL: the crash under test).
``HANDLER_SECONDS`` slows the handler so that kills land mid-stream.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from typing import Any


def main(argv: list[str]) -> None:
    from volley import Engine

    path, source, output, vt, pause = argv
    config = {"path": path, "partitions": 4}
    raw = {"connector": "sqlite", "serializer": "none", "model_handler": "none"}
    app = Engine(
        app_name="sqlite-worker",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {**raw, "value": source, "config": {**config, "vt": float(vt)}},
            "out": {**raw, "value": output, "config": config},
        },
        metrics_port=None,
        poll_interval_seconds=0.05,
        on_failure="continue",
        max_deliveries=100,
    )
    seconds = float(pause)
    signature = {"headers": {"worker": str(os.getpid())}}  # which process produced an output, for the report

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes, dict[str, Any]]]:
        if seconds:
            time.sleep(seconds)
        return [("out", message, signature)]

    print("worker ready", flush=True)
    handler()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main(sys.argv[1:])
