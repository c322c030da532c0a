"""The command line of ``tools/services/kafka.py``: start, status, restart, stop and fetch a broker that outlives
the call (``stop`` finds it again through a state file)."""

from __future__ import annotations

import argparse
import struct
import sys
import time
import warnings
from pathlib import Path

from services._proc import ServiceError, read_state, state_dir, write_state
from services.kafka import DEFAULT_KAFKA_VERSION, KafkaBroker, KafkaError, fetch_kafka, request_metadata


def _state_file() -> Path:
    return state_dir() / "kafka.json"


def _running_from_state() -> KafkaBroker | None:
    state = read_state(_state_file())
    if state is None:
        return None
    broker = KafkaBroker.from_state(state)
    return broker if broker.is_running() else None


def _recorded() -> KafkaBroker | None:
    """The broker the state file names, with a stale PID dropped (never signal a PID that is no longer ours)."""
    state = read_state(_state_file())
    if state is None:
        return None
    broker = KafkaBroker.from_state(state)
    if broker.pid is not None and not broker.is_running():
        broker.pid = None
    return broker


def _boot_and_record(broker: KafkaBroker, action: str) -> int:
    try:
        broker.start()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    write_state(_state_file(), broker.to_state())
    print(
        f"{action} Kafka {broker.version} pid={broker.pid} in {broker.startup_seconds:.1f}s; log: {broker.log_path}",
        file=sys.stderr,
    )
    print(f"KAFKA_BROKERS={broker.bootstrap_servers}")
    # The broker must outlive this process: it was started in its own session and its output goes to a file.
    warnings.simplefilter("ignore", ResourceWarning)
    return 0


def _cli_start(args: argparse.Namespace) -> int:
    recorded = _recorded()
    if recorded is not None and recorded.is_running():
        print(f"KAFKA_BROKERS={recorded.bootstrap_servers}")
        return 0
    if recorded is not None and recorded.has_storage():
        # Stopped with --keep-data (or crashed): bring the same broker back, same ports, same data.
        recorded.start_timeout = args.timeout
        return _boot_and_record(recorded, "restarted")
    return _boot_and_record(KafkaBroker(version=args.version, heap=args.heap, start_timeout=args.timeout), "started")


def _cli_restart(args: argparse.Namespace) -> int:
    recorded = _recorded()
    if recorded is None or not recorded.has_storage():
        print("Kafka: nothing to restart (no broker started from the CLI of this checkout)", file=sys.stderr)
        return 1
    recorded.start_timeout = args.timeout
    try:
        recorded.halt()
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return _boot_and_record(recorded, "restarted")


def _cli_stop(args: argparse.Namespace) -> int:
    state_file = _state_file()
    broker = _recorded()
    if broker is None:
        print("Kafka: nothing started from the CLI is recorded", file=sys.stderr)
        return 0
    if args.keep_data:
        broker.halt()
        if broker.has_storage():
            write_state(state_file, {**broker.to_state(), "pid": None})
            print(f"Kafka: stopped; data and ports kept for `start` ({broker.work_dir})", file=sys.stderr)
            return 0
    broker.stop()
    state_file.unlink(missing_ok=True)
    print("Kafka: stopped", file=sys.stderr)
    return 0


def _cli_status(_: argparse.Namespace) -> int:
    broker = _running_from_state()
    if broker is None or broker.port is None:
        print("Kafka: not running", file=sys.stderr)
        return 1
    try:
        meta = request_metadata(broker.host, broker.port)
    except (OSError, KafkaError, struct.error) as exc:
        print(f"Kafka: pid {broker.pid} alive but not answering: {exc!r}", file=sys.stderr)
        return 1
    print(f"Kafka: running pid={broker.pid} cluster_id={meta.cluster_id} brokers={len(meta.brokers)}", file=sys.stderr)
    print(f"KAFKA_BROKERS={broker.bootstrap_servers}")
    return 0


def _cli_fetch(args: argparse.Namespace) -> int:
    began = time.monotonic()
    try:
        libs = fetch_kafka(args.version)
    except ServiceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"Kafka jars ready in {time.monotonic() - began:.1f}s: {libs}", file=sys.stderr)
    print(libs)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kafka.py", description="Run a throwaway single-node Kafka for tests.")
    sub = parser.add_subparsers(dest="command", required=True)
    start = sub.add_parser("start", help="start a detached broker and print KAFKA_BROKERS=host:port")
    start.add_argument("--version", default=None, help=f"Kafka version (default {DEFAULT_KAFKA_VERSION})")
    start.add_argument("--heap", default="512m")
    start.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the broker to answer")
    start.set_defaults(func=_cli_start)
    stop = sub.add_parser("stop", help="stop the CLI-started broker and delete its data")
    stop.add_argument("--keep-data", action="store_true", help="keep data and ports: the next `start` resumes it")
    stop.set_defaults(func=_cli_stop)
    restart = sub.add_parser("restart", help="stop and start the CLI-started broker, keeping its data and ports")
    restart.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the broker to answer")
    restart.set_defaults(func=_cli_restart)
    sub.add_parser("status", help="exit 0 and print KAFKA_BROKERS if it answers").set_defaults(func=_cli_status)
    fetch = sub.add_parser("fetch", help="only resolve the broker jars into the cache")
    fetch.add_argument("--version", default=None)
    fetch.set_defaults(func=_cli_fetch)
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result
