"""RSMQ -> RSMQ benchmark on a real redis-server: a sequential PyRSMQ loop, Volley, and py-volley 1.3.1.

Each of the three moves the same 20,000 JSON orders from an input queue to an
output queue of their own, doing the same work per message: orjson decode,
Pydantic v2 validation of ``Order``, the handler (builds an ``Enriched``),
``model_dump``, orjson encode, send, and delete the input once the output is
stored.

(a) a plain sequential PyRSMQ receive -> process -> send -> delete loop;
(b) Volley, the ``rsmq`` profile (orjson + Pydantic), default Engine settings;
(c) py-volley 1.3.1 with its ``rsmq`` profile, in its own virtualenv
    (``benchmarks/_pyvolley.py``) as a subprocess, timed from its first receive
    to its last output (its start-up is not counted).

Redis: ``REDIS_HOST`` (host or host:port) when set, otherwise a private
redis-server from ``tools/services/redis.py`` (no persistence). Prints
``name: value`` lines, among them ``rsmq.volley_msgs_per_s``,
``rsmq.vs_sequential`` (b / a, target >= 3) and ``rsmq.vs_pyvolley`` (b / c,
target >= 5). In the same run, the same work on volley-sqlite (one durable
database file, ``synchronous=full``, see ``bench_sqlite.py``):
``sqlite.volley_msgs_per_s`` and ``sqlite.vs_rsmq`` (sqlite / b, target >= 0.5).
"""

from __future__ import annotations

import contextlib
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import _orders as orders

N = 20_000
VOLLEY_REPEATS = 3
HERE = Path(__file__).resolve().parent

PYVOLLEY_WORKER = textwrap.dedent('''
    import logging
    import sys

    from volley import Engine

    from bench_rsmq_model import Enriched, handle

    host, port, source, output = sys.argv[1:5]
    config = {"host": host, "port": int(port)}
    app = Engine(
        app_name="bench-pyvolley",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"value": source, "profile": "rsmq", "data_model": "bench_rsmq_model.Order", "config": dict(config)},
            "out": {"value": output, "profile": "rsmq", "data_model": "bench_rsmq_model.Enriched",
                    "config": dict(config)},
        },
        metrics_port=None,
        poll_interval_seconds=0.01,
    )


    @app.stream_app
    def handler(order):
        return [("out", handle(order))]


    logging.disable(logging.WARNING)
    handler()
''')


@contextlib.contextmanager
def redis_address() -> Iterator[tuple[str, int]]:
    external = os.environ.get("REDIS_HOST", "").strip()
    if external:
        host, _, port = external.removeprefix("redis://").partition(":")
        yield host, int(port.split("/")[0] or 6379)
        return
    sys.path.insert(0, str(HERE.parent / "tools"))
    from services.redis import RedisServer

    with RedisServer() as server:
        yield server.host, server.port


def write_model(directory: Path) -> None:
    orders.write_model(directory, "bench_rsmq_model")
    (directory / "bench_pyvolley_worker.py").write_text(PYVOLLEY_WORKER)


class Queues:
    """Seeds input queues and checks output queues, with Volley's batched client (PyRSMQ's data layout)."""

    def __init__(self, host: str, port: int) -> None:
        from volley_rsmq import RsmqClient, parse_settings

        self.client = RsmqClient(parse_settings({"host": host, "port": port}, "bench", "output"))
        self.redis = self.client.redis

    def fresh(self, label: str) -> tuple[str, str]:
        stem = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        return stem + "-in", stem + "-out"

    def seed(self, qname: str, bodies: list[bytes]) -> None:
        for start in range(0, len(bodies), 1000):
            self.client.send(qname, [(None, body) for body in bodies[start:start + 1000]])

    def count(self, qname: str) -> int:
        return int(self.redis.zcard(f"rsmq:{qname}"))

    def received(self, qname: str) -> int:
        return int(self.redis.hget(f"rsmq:{qname}:Q", "totalrecv") or 0)

    def check(self, source: str, output: str, what: str) -> None:
        left, produced = self.count(source), self.count(output)
        if left or produced != N:
            raise SystemExit(f"{what}: {left} input(s) left and {produced} output(s) instead of {N}")

    def drop(self, *names: str) -> None:
        for qname in names:
            self.redis.delete(f"rsmq:{qname}", f"rsmq:{qname}:Q", f"rsmq:{qname}:volley:errors")
            self.redis.srem("rsmq:QUEUES", qname)


def sequential(queues: Queues, host: str, port: int, bodies: list[bytes]) -> float:
    """(a) One message at a time with PyRSMQ: receive, process, send, delete."""
    from bench_rsmq_model import work

    from rsmq import RedisSMQ

    source, output = queues.fresh("sequential")
    queues.seed(source, bodies)
    rsmq = RedisSMQ(host=host, port=port, options={"decode_responses": False})
    rsmq.createQueue(qname=output).exceptions(enabled=False).execute()
    started = time.perf_counter()
    while True:
        message = rsmq.receiveMessage(qname=source, vt=30, quiet=True).exceptions(enabled=False).execute()
        if not message:
            break
        body = work(message["message"])
        rsmq.sendMessage(qname=output, message=body).execute()
        rsmq.deleteMessage(qname=source, id=message["id"]).execute()
    elapsed = time.perf_counter() - started
    queues.check(source, output, "sequential loop")
    queues.drop(source, output)
    return N / elapsed


def volley_run(queues: Queues, host: str, port: int, bodies: list[bytes]) -> float:
    """(b) The engine with the rsmq profile and its default settings."""
    from bench_rsmq_model import Enriched, Order, handle

    from volley import Engine
    from volley.plugins import get_registry

    if ("serializer", "orjson") not in get_registry():
        raise SystemExit("bench_rsmq needs volley-serializers[orjson,pydantic] installed (profile rsmq)")
    source, output = queues.fresh("volley")
    queues.seed(source, bodies)
    config = {"host": host, "port": port}
    app = Engine(
        app_name="bench-volley",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"value": source, "profile": "rsmq", "data_model": Order, "config": config},
            "out": {"value": output, "profile": "rsmq", "data_model": Enriched, "config": config},
        },
        metrics_port=None,
    )

    @app.stream_app
    def handler(order: Order) -> list[tuple[str, Enriched]]:
        return [("out", handle(order))]

    started = time.perf_counter()
    report = handler.run_until_drained(timeout=600, max_messages=N)
    elapsed = time.perf_counter() - started
    if report.acked != N:
        raise SystemExit(f"Volley run acked {report.acked} of {N}: {report}")
    queues.check(source, output, "Volley")
    queues.drop(source, output)
    return N / elapsed


def pyvolley_run(queues: Queues, host: str, port: int, bodies: list[bytes], workdir: Path) -> float:
    """(c) py-volley 1.3.1 as a subprocess in its own venv, timed from its first receive to its N-th output."""
    sys.path.insert(0, str(HERE))
    from _pyvolley import ensure_pyvolley_venv, venv_python

    python = venv_python(ensure_pyvolley_venv())
    source, output = queues.fresh("pyvolley")
    queues.seed(source, bodies)
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    env.pop("REDIS_HOST", None)
    process = subprocess.Popen([str(python), str(workdir / "bench_pyvolley_worker.py"), host, str(port), source,
                                output], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 600
        while queues.received(source) == 0:
            if process.poll() is not None:
                raise SystemExit(f"py-volley worker exited early:\n{process.stderr.read().decode()[-3000:]}"
                                 if process.stderr else "py-volley worker exited early")
            if time.monotonic() > deadline:
                raise SystemExit("py-volley never received a message")
            time.sleep(0.001)
        started = time.perf_counter()
        while queues.count(output) < N:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit("py-volley worker stopped before producing every output")
            time.sleep(0.005)
        elapsed = time.perf_counter() - started
    finally:
        process.kill()
        process.wait()
    queues.drop(source, output)
    return N / elapsed


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("volley").setLevel(logging.ERROR)  # "no dead_letter_queue configured" is expected here
    bodies = orders.payloads(N)
    with tempfile.TemporaryDirectory(prefix="bench-rsmq-") as tmp, redis_address() as (host, port):
        workdir = Path(tmp)
        write_model(workdir)
        sys.path.insert(0, str(workdir))
        queues = Queues(host, port)
        seq = sequential(queues, host, port, bodies)
        runs = [volley_run(queues, host, port, bodies) for _ in range(VOLLEY_REPEATS)]
        old = pyvolley_run(queues, host, port, bodies, workdir)
        queues.client.close()
        # The same work on volley-sqlite, in this run so that the ratio compares like with like.
        from bench_sqlite import sqlite_run

        sqlite_runs = [sqlite_run(bodies, workdir) for _ in range(VOLLEY_REPEATS)]
    best = max(runs)
    print(f"rsmq.messages: {N}")
    print(f"rsmq.sequential_msgs_per_s: {seq:.0f}")
    print(f"rsmq.pyvolley_msgs_per_s: {old:.0f}")
    print(f"rsmq.volley_msgs_per_s: {best:.0f}")
    print(f"rsmq.volley_msgs_per_s_median: {statistics.median(runs):.0f}")
    print(f"rsmq.vs_sequential: {best / seq:.2f}")
    print(f"rsmq.vs_pyvolley: {best / old:.2f}")
    print(f"sqlite.volley_msgs_per_s: {max(sqlite_runs):.0f}")
    print(f"sqlite.volley_msgs_per_s_median: {statistics.median(sqlite_runs):.0f}")
    print(f"sqlite.vs_rsmq: {max(sqlite_runs) / best:.2f}")


if __name__ == "__main__":
    main()
