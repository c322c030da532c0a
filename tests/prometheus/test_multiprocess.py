"""Multiprocess mode: with PROMETHEUS_MULTIPROC_DIR set, /metrics aggregates every worker process.

prometheus-client chooses its value storage when it is imported, so each
process here is a fresh interpreter started with the variable already set.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

from prometheus_client import CollectorRegistry

from volley_prometheus.server import MetricsServer

WRITER = textwrap.dedent("""
    import sys
    from volley_prometheus import PrometheusObserver

    consumed, in_flight, lag = (int(a) for a in sys.argv[1:4])
    observer = PrometheusObserver("mp")          # no port: this worker only writes
    observer.on_start("mp")
    observer.on_consumed("mp", "success", consumed)
    observer.on_delivery("mp", "success", consumed)
    observer.on_delivery("mp", "fail", 1)
    observer.on_process_time("mp", "cycle", 0.5 * consumed, consumed)
    observer.on_in_flight("mp", in_flight)
    observer.on_ready("mp", True)
    observer.on_lag("mp", {("orders", 0): lag, ("orders", 1): 9})
    observer.on_lag("mp", {("orders", 0): lag})  # partition 1 revoked: its series is withdrawn
    observer.on_commit("mp", 0.02)
    observer.on_heartbeat("mp")
    # The process exits without on_stop, as a live worker would look to the reader.
""")

READER = textwrap.dedent("""
    import urllib.request
    from volley_prometheus import PrometheusObserver

    observer = PrometheusObserver("reader", 0, host="127.0.0.1")
    observer.on_start("reader")
    with urllib.request.urlopen(f"http://127.0.0.1:{observer.port}/metrics", timeout=5) as reply:
        print(reply.read().decode())
    observer.on_stop("reader")
""")


def run(code: str, env: dict[str, str], *args: str) -> str:
    done = subprocess.run([sys.executable, "-W", "error", "-c", code, *args], env=env, capture_output=True, text=True,
                          timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout


def sample_lines(body: str) -> set[str]:
    return {line for line in body.splitlines() if line and not line.startswith("#")}


def test_two_writers_one_reader_aggregate(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run(WRITER, env, "10", "3", "100")
    run(WRITER, env, "5", "4", "50")
    assert len(list(tmp_path.glob("*.db"))) >= 2  # the writers kept their values in the shared directory

    lines = sample_lines(run(READER, env))
    # Counters and summaries add up over processes.
    assert 'messages_consumed_count_total{status="success",volley_app="mp"} 15.0' in lines
    assert 'delivery_report_status_total{status="success",volley_app="mp"} 15.0' in lines
    assert 'delivery_report_status_total{status="fail",volley_app="mp"} 2.0' in lines
    assert 'process_time_seconds_count{process_name="cycle",volley_app="mp"} 15.0' in lines
    assert 'process_time_seconds_sum{process_name="cycle",volley_app="mp"} 7.5' in lines
    assert "heartbeats_total 2.0" in lines
    assert 'volley_commit_seconds_count{volley_app="mp"} 2.0' in lines
    # In-flight and readiness add up over live workers; lag is the most recent report.
    assert 'volley_messages_in_flight{volley_app="mp"} 7.0' in lines
    assert 'volley_ready{volley_app="mp"} 2.0' in lines
    assert 'volley_consumer_lag{partition="0",topic="orders",volley_app="mp"} 50.0' in lines
    # Partition 1 was revoked from both: it has no lag series (it used to read 0.0, "caught up").
    assert not [line for line in lines if 'partition="1"' in line], lines


SECOND_WORKER = textwrap.dedent("""
    import logging, sys
    from volley.errors import ConfigurationError
    from volley_prometheus import PrometheusObserver

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    observer = PrometheusObserver("mp", int(sys.argv[1]), host="127.0.0.1")
    try:
        observer.on_start("mp")
    except ConfigurationError as exc:
        print("refused:", exc)
    else:
        observer.on_consumed("mp", "success", 1)
        print("serving:", observer.port)
        observer.on_stop("mp")
""")


REVOKER = textwrap.dedent("""
    import sys
    from volley_prometheus import PrometheusObserver

    observer = PrometheusObserver("mp")
    observer.on_start("mp")
    for step in sys.argv[1:]:                    # "p=lag,p=lag" is one lag report; "-" is an empty one
        observer.on_lag("mp", {("orders", int(p)): int(v) for p, v in
                               (pair.split("=") for pair in step.split(",") if pair != "-")})
""")


def lag_lines(env: dict[str, str]) -> set[str]:
    return {line for line in sample_lines(run(READER, env)) if line.startswith("volley_consumer_lag")}


def test_a_revoked_partition_has_no_lag_until_a_worker_reports_it_again(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run(REVOKER, env, "0=5,1=7", "0=5")                   # worker A loses partition 1 in a rebalance
    assert lag_lines(env) == {'volley_consumer_lag{partition="0",topic="orders",volley_app="mp"} 5.0'}
    run(REVOKER, env, "1=4")                              # worker B gets it and reports after A withdrew it
    assert lag_lines(env) == {'volley_consumer_lag{partition="0",topic="orders",volley_app="mp"} 5.0',
                              'volley_consumer_lag{partition="1",topic="orders",volley_app="mp"} 4.0'}
    run(REVOKER, env, "0=3", "-")                         # worker C owns partition 0 for a while, then nothing
    assert lag_lines(env) == {'volley_consumer_lag{partition="1",topic="orders",volley_app="mp"} 4.0'}


def test_a_second_worker_on_the_same_port_leaves_serving_to_the_first(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    first = MetricsServer("127.0.0.1", 0, CollectorRegistry(), str(tmp_path))  # the worker of this run that bound
    first.start()
    try:
        done = subprocess.run([sys.executable, "-W", "error", "-c", SECOND_WORKER, str(first.port)], env=env,
                              capture_output=True, text=True, timeout=60, check=False)
    finally:
        first.stop()
    assert done.returncode == 0, done.stderr
    assert "serving: None" in done.stdout
    assert "served by another worker of this run" in done.stderr


def test_a_worker_whose_port_an_unrelated_process_holds_fails_at_start(tmp_path: Path) -> None:
    """It used to log "another worker serves the multiprocess metrics" and carry on: nothing served the run."""
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    with socket.socket() as unrelated:
        unrelated.bind(("127.0.0.1", 0))
        unrelated.listen()
        done = subprocess.run([sys.executable, "-W", "error", "-c", SECOND_WORKER, str(unrelated.getsockname()[1])],
                              env=env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert "refused:" in done.stdout
    assert "not a worker of this run" in done.stdout
    assert "Choose a free metrics_port" in done.stdout


def test_missing_multiprocess_directory_is_a_configuration_error(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "absent")}
    code = textwrap.dedent("""
        from volley.errors import ConfigurationError
        from volley_prometheus import PrometheusObserver
        try:
            PrometheusObserver("x", 0, host="127.0.0.1")
        except ConfigurationError as exc:
            print(exc)
    """)
    assert "is not a directory" in run(code, env)


def test_a_worker_starting_under_the_supervisor_forgets_the_live_gauges_of_dead_workers(tmp_path: Path) -> None:
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path)}
    run(WRITER, env, "10", "3", "100")  # a worker that died without on_stop (kill -9)
    run(WRITER, env, "5", "4", "50")
    def live_pids() -> set[str]:
        return {p.stem.rsplit("_", 1)[-1] for p in tmp_path.glob("gauge_live*.db")}

    dead = live_pids()
    assert len(dead) == 2, dead
    # A reader outside the supervisor leaves them alone (above, they stand in for live workers) ...
    assert 'volley_ready{volley_app="mp"} 2.0' in sample_lines(run(READER, env))
    # ... a (re)started worker of `volley run --workers N` removes them.
    restarted = textwrap.dedent("""
        from volley_prometheus import PrometheusObserver
        PrometheusObserver("mp")
    """)
    run(restarted, {**env, "VOLLEY_WORKER_INDEX": "1"})
    assert not dead & live_pids(), "the dead workers' live gauges are gone (the new worker's own remain)"
    lines = sample_lines(run(READER, env))
    assert 'volley_messages_in_flight{volley_app="mp"} 7.0' not in lines
    assert 'messages_consumed_count_total{status="success",volley_app="mp"} 15.0' in lines, "counters stay"
