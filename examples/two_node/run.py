"""Run the two-node example end to end on real servers, then stop everything it started.

    python examples/two_node/run.py                  # starts its own Kafka and redis-server (tools/services)
    KAFKA_BROKERS=localhost:9092 REDIS_HOST=localhost python examples/two_node/run.py   # uses yours
    python examples/two_node/run.py --backend sqlite   # no server: two `volley run` processes on one SQLite file

It creates a fresh topic (and RSMQ queue names) for this run, seeds ``{"my_values": [1, 2, 3]}``, runs node one
and node two in this process until node two logs "That's it, we are done!", shuts both down gracefully, prints the
maxima and exits 0 (1 if the example did not finish within ``--timeout`` seconds, 130 when interrupted).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from types import FrameType, ModuleType
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
EXPECTED = [3.0, 5.0, 7.0, 9.0, 11.0]

logger = logging.getLogger("examples.two_node.run")


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    """SIGINT or SIGTERM (outside the event loop): unwind, so that the servers started here are stopped."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


def start_kafka(stack: contextlib.ExitStack) -> str:
    from services.kafka import KafkaBroker

    logger.info("KAFKA_BROKERS is not set: starting a private Kafka broker (tools/services/kafka.py)")
    broker = KafkaBroker()
    stack.callback(broker.stop)
    broker.start()
    logger.info("Kafka %s up at %s in %.1f s", broker.version, broker.bootstrap_servers, broker.startup_seconds or 0)
    return broker.bootstrap_servers


def start_redis(stack: contextlib.ExitStack) -> str:
    from services.redis import RedisServer

    logger.info("REDIS_HOST is not set: starting a private redis-server (tools/services/redis.py)")
    server = RedisServer()
    stack.callback(server.stop)
    server.start()
    logger.info("redis-server up at %s:%d", server.host, server.port)
    return f"{server.host}:{server.port}"


def create_topics(bootstrap: str, topics: Sequence[str]) -> None:
    from confluent_kafka import KafkaError
    from confluent_kafka.admin import AdminClient, NewTopic

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics([NewTopic(t, num_partitions=1, replication_factor=1) for t in topics])
    for topic, future in futures.items():
        try:
            future.result(30)
        except Exception as exc:
            error = exc.args[0] if exc.args else None
            if getattr(error, "code", lambda: None)() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise
            logger.info("topic %s exists already", topic)


def seed(bootstrap: str, topic: str, values: Sequence[float]) -> None:
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": bootstrap})
    producer.produce(topic, json.dumps({"my_values": list(values)}).encode())
    if producer.flush(30) != 0:
        raise RuntimeError(f"could not seed {topic} on {bootstrap} within 30 s")
    logger.info("seeded %s with %s", topic, {"my_values": list(values)})


async def run_nodes(worker: ModuleType, timeout: float) -> bool:
    """Run both nodes until node two is done (True) or the deadline passes (False); always stop them gracefully."""
    loop = asyncio.get_running_loop()
    apps = (worker.node_one, worker.node_two)
    interrupted: list[str] = []

    def on_signal(sig: signal.Signals) -> None:
        interrupted.append(sig.name)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    tasks = [asyncio.ensure_future(app.run_async()) for app in apps]
    deadline = loop.time() + timeout
    try:
        while not worker.finished.is_set():
            crashed = [task for task in tasks if task.done()]
            if crashed:
                crashed[0].result()  # raises what the app died of
                raise RuntimeError("a node stopped before the example was done")
            if interrupted:
                raise KeyboardInterrupt(interrupted[0])
            if loop.time() > deadline:
                logger.error("not done within %.0f s; maxima so far: %s", timeout, worker.maxima_seen)
                return False
            await asyncio.sleep(0.02)
        return True
    finally:
        for app in apps:
            app.stop()
        await asyncio.gather(*tasks, return_exceptions=True)  # each node logs its own report
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)  # resets to the default action: keep the servers' clean-up instead
            signal.signal(sig, _interrupt)


DONE_LINE = "That's it, we are done!"


def _echo(name: str, stream: Any, lines: list[str], done: threading.Event) -> None:
    """Print a node's output with its name in front, and notice node two's done line."""
    for raw in stream:
        line = raw.rstrip("\n")
        lines.append(line)
        print(f"[{name}] {line}", flush=True)
        if DONE_LINE in line:
            done.set()


def run_sqlite(args: argparse.Namespace) -> int:
    """Both nodes as two separate `volley run` processes on one SQLite file: no server anywhere."""
    from volley_sqlite import admin

    directory = tempfile.mkdtemp(prefix="two-node-sqlite-") if args.database is None else None
    database = args.database or os.path.join(directory or ".", "two-node.sqlite3")
    env = {**os.environ, "VOLLEY_EXAMPLE_BACKEND": "sqlite", "VOLLEY_SQLITE_PATH": database, "PYTHONUNBUFFERED": "1"}
    run_id = uuid.uuid4().hex[:8]
    env.setdefault("VOLLEY_EXAMPLE_TOPIC", f"volley.example.values.{run_id}")
    env.setdefault("VOLLEY_EXAMPLE_QUEUE", f"volley-example-maxima-{run_id}")
    logger.info("queues in %s (no server)", database)
    began = time.monotonic()
    done = threading.Event()
    nodes: dict[str, subprocess.Popen[str]] = {}
    output: dict[str, list[str]] = {}
    try:
        for node in ("node_one", "node_two"):
            # Two processes, as in two terminals: `volley run examples.two_node.worker:node_one` and node_two.
            process = subprocess.Popen([sys.executable, "-m", "volley.cli", "run", f"examples.two_node.worker:{node}"],
                                       cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            nodes[node] = process
            output[node] = []
            threading.Thread(target=_echo, args=(node, process.stdout, output[node], done), daemon=True).start()
        admin.publish(database, env["VOLLEY_EXAMPLE_TOPIC"], [json.dumps({"my_values": list(args.seed)}).encode()])
        logger.info("seeded %s with %s", env["VOLLEY_EXAMPLE_TOPIC"], {"my_values": list(args.seed)})
        deadline = time.monotonic() + args.timeout
        while not done.wait(0.05):
            exited = [name for name, process in nodes.items() if process.poll() is not None]
            if exited:
                logger.error("%s exited before the example was done", exited[0])
                return 1
            if time.monotonic() > deadline:
                logger.error("not done within %.0f s", args.timeout)
                return 1
    except KeyboardInterrupt as exc:
        logger.warning("%s received: stopped", exc)
        return 130
    finally:
        for process in nodes.values():
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        codes = [process.wait(60) for process in nodes.values()]
        if directory is not None:
            shutil.rmtree(directory, ignore_errors=True)
    maxima = [float(line.rsplit(":", 1)[1]) for line in output["node_two"] if "The maximum:" in line]
    print(f"maxima: {', '.join(str(m) for m in maxima)}")
    print(f"done in {time.monotonic() - began:.1f} s (exit codes {codes})")
    return 0 if codes == [0, 0] else 1


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds the nodes may take (default 120)")
    parser.add_argument("--seed", type=float, nargs="+", default=[1, 2, 3], help="first list of values")
    parser.add_argument("--backend", choices=("servers", "sqlite"), default="servers",
                        help="servers: Kafka and Redis (default); sqlite: two processes on one SQLite file")
    parser.add_argument("--database", default=None, help="with --backend sqlite: the file (default: a temporary one)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    if args.backend == "sqlite":
        signal.signal(signal.SIGTERM, _interrupt)
        return run_sqlite(args)
    for path in (ROOT, ROOT / "tools"):  # the example package, and the server tooling
        if str(path) not in sys.path:
            sys.path.insert(0, str(path))
    began = time.monotonic()
    previous = {sig: signal.signal(sig, _interrupt) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        with contextlib.ExitStack() as stack:  # stops, in reverse order, whatever servers were started
            redis_host = os.environ.get("REDIS_HOST") or start_redis(stack)
            brokers = os.environ.get("KAFKA_BROKERS") or start_kafka(stack)
            os.environ["REDIS_HOST"], os.environ["KAFKA_BROKERS"] = redis_host, brokers
            logger.info("using Kafka at %s and Redis at %s", brokers, redis_host)
            # Fresh names per run, so that leftovers of an earlier run on the same servers cannot interfere.
            run_id = uuid.uuid4().hex[:8]
            names: dict[str, Any] = {"VOLLEY_EXAMPLE_TOPIC": f"volley.example.values.{run_id}",
                                     "VOLLEY_EXAMPLE_QUEUE": f"volley-example-maxima-{run_id}",
                                     "VOLLEY_EXAMPLE_GROUP": f"volley-example-node-one-{run_id}"}
            for key, value in names.items():
                os.environ.setdefault(key, value)
            worker = importlib.import_module("examples.two_node.worker")  # reads the environment set above
            create_topics(brokers, [worker.VALUES_TOPIC, worker.VALUES_DLQ])
            seed(brokers, worker.VALUES_TOPIC, args.seed)
            done = asyncio.run(run_nodes(worker, args.timeout))
    except KeyboardInterrupt as exc:
        logger.warning("%s received: stopped", exc)
        return 130
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print(f"maxima: {', '.join(str(m) for m in worker.maxima_seen)}")
    print(f"{'done' if done else 'NOT done'} in {time.monotonic() - began:.1f} s")
    return 0 if done else 1


if __name__ == "__main__":
    sys.exit(main())
