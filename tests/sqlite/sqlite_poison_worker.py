"""A sqlite -> sqlite pass-through worker that dies (SIGKILL, by its own hand) on one poison message.

    python sqlite_poison_worker.py DATABASE INPUT OUTPUT DLQ VT MAX_DELIVERIES POISON ORDERED

Run (and restarted after each death) by tests/sqlite/test_crash_poison.py. It stands for a segfault in a C
extension or an OOM kill: the process is gone without a chance to nack, give back or close. Each output carries
the delivery count (``attempt``) the input had when it was handled.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from typing import Any


def main(argv: list[str]) -> None:
    from volley import Engine, MessageContext

    path, source, output, dlq, vt, max_deliveries, poison, ordered = argv
    config = {"path": path, "partitions": 4}
    raw = {"connector": "sqlite", "serializer": "none", "model_handler": "none"}
    app = Engine(
        app_name="sqlite-poison-worker",
        input_queue="in",
        output_queues=["out"],
        dead_letter_queue="dlq",
        queue_config={
            "in": {**raw, "value": source, "config": {**config, "vt": float(vt), "ordered": ordered}},
            "out": {**raw, "value": output, "config": config},
            "dlq": {**raw, "value": dlq, "config": config},
        },
        metrics_port=None,
        poll_interval_seconds=0.05,
        max_deliveries=int(max_deliveries),
    )
    deadly = poison.encode()

    @app.stream_app
    def handler(message: bytes, msg_ctx: MessageContext) -> list[tuple[str, bytes, dict[str, Any]]]:
        if message == deadly:
            os.kill(os.getpid(), signal.SIGKILL)
        return [("out", message, {"headers": {"attempt": str(msg_ctx.attempt)}})]

    print("worker ready", flush=True)
    handler()


if __name__ == "__main__":
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    main(sys.argv[1:])
