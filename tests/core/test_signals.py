"""SIGINT / SIGTERM on an app run by calling it (``app()``, py-volley's way): a graceful stop within the
shutdown deadline, with finished work acknowledged and unfinished work given back, in a real process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

APP = textwrap.dedent('''
    import asyncio, json, logging, sys, threading, time
    from dataclasses import dataclass
    from volley import Engine, MemoryBroker

    @dataclass
    class Item:
        n: int

    logging.basicConfig(level=logging.INFO)
    broker = MemoryBroker()
    queues = {
        "in": {"value": "in", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
        "out": {"value": "out", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
    }
    engine = Engine(app_name="signalled", input_queue="in", output_queues=["out"], queue_config=queues,
                    metrics_port=None, poll_interval_seconds=0.05, shutdown_timeout_seconds=1.0)
    for n in range(10):
        broker.publish("in", json.dumps({"n": n}).encode())
    never = threading.Event()

    if sys.argv[1] == "async":
        @engine.stream_app
        async def handle(item: Item) -> list[tuple[str, Item]]:
            if item.n == 5:
                print("stuck", flush=True)
                await asyncio.Event().wait()
            return [("out", item)]
    else:
        @engine.stream_app
        def handle(item: Item) -> list[tuple[str, Item]]:
            if item.n == 4:
                time.sleep(0.6)  # very slow: from here on the handler runs on its own thread
            if item.n == 5:
                print("stuck", flush=True)
                never.wait(120)  # blocks that thread, not the event loop
            return [("out", item)]

    code = 0
    try:
        report = handle()
    except SystemExit as exit:  # a handler call still running past the deadline: app() exits non-zero
        code = exit.code
        report = handle.last_report
    print(json.dumps({"acked": report.acked, "abandoned": report.abandoned, "outputs": broker.depth("out"),
                      "unacked": broker.unacked("in"), "ready": broker.depth("in")}), flush=True)
    sys.exit(code)
''')


@pytest.mark.parametrize("handler", ["async", "sync"])
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_signal_stops_the_app_gracefully_within_the_deadline(tmp_path: Path, handler: str,
                                                                 sig: signal.Signals) -> None:
    script = tmp_path / "app.py"
    script.write_text(APP)
    process = subprocess.Popen([sys.executable, str(script), handler], stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        assert process.stdout is not None
        line = process.stdout.readline()  # blocks until the handler is stuck on message 5 (or the app died)
        assert line == "stuck\n", (line, process.stderr.read() if process.stderr else "")
        sent = time.monotonic()
        process.send_signal(sig)
        out, err = process.communicate(timeout=30)
        took = time.monotonic() - sent
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    if handler == "async":  # the stuck call is cancelled with its lane
        assert process.returncode == 0, err
    else:  # a thread cannot be cancelled: app() says which handler is stuck and exits non-zero
        assert process.returncode == 70, err
        assert "the handler handle is still running a call past the shutdown deadline" in err
    assert f"{sig.name} received: shutting down gracefully" in err
    report = json.loads(out.strip().splitlines()[-1])
    # Messages 0-4 are done and acked; 5 is stuck, and 6-9 were handed out or waiting: none of them is lost.
    assert report["acked"] == 5 and report["outputs"] == 5, report
    assert report["abandoned"] >= 1, report
    assert report["unacked"] + report["ready"] == 5, report
    assert took < 1.0 + 3.0, f"shutdown took {took:.1f} s with a 1 s deadline"
