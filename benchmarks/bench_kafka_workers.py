"""Kafka worker processes: throughput with ``volley run --workers 1`` and ``--workers 2`` on 8 partitions, and how
long a joining worker pauses the group, under both group protocols.

Both use ``_workers_app.py`` (the Kafka bench's work per message, profile ``confluent`` at its defaults) started
as ``volley run`` subprocesses, on a real broker (``KAFKA_BROKERS``, else a private one).

Scaling: 200,000 orders in an 8-partition topic; per run a fresh group and output topic, ``volley run --workers N
_workers_app:app``. The rate is timed from the moment the group is stable with every member assigned (so the
workers' start and the join are not counted) to the last output: (outputs still to come) / time. Runs alternate,
best of ``ROUNDS``. Each run is checked: every output written (more is a redelivery across the start-up
rebalance, printed as duplicates) and no lag left. Prints ``kafka.workers_1_msgs_per_s``,
``kafka.workers_2_msgs_per_s`` and ``kafka.workers_2_over_1`` (at most 2 on a two-core machine, which also runs
the broker and this script).

Rebalance pause, per group protocol (``classic``: librdkafka's default eager assignors and 3 s heartbeat;
``consumer``: KIP-848, the broker's assignor, the test broker's 500 ms heartbeat): one worker consumes a steady
2,000 msg/s (a generator process); after 3 s a second ``volley run`` process joins. The pause is the longest gap
between consecutive outputs (their ``LogAppendTime``) from the second process's start until 2 s after the group
is stable with both members assigned: ``kafka.rebalance_pause_ms_classic``, ``kafka.rebalance_pause_ms_consumer``
(``kafka.rebalance_pause_ms``: the default protocol's, classic). ``kafka.rebalance_gap_ms_before_*``: the longest
gap in the seconds before the join, for scale. Every generated record must come out, with no lag left.
"""

from __future__ import annotations

import itertools
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from _kafka import Cluster, kafka_address

HERE = Path(__file__).resolve().parent
N = 200_000
PARTITIONS = 8
ROUNDS = 2
RATE = 2_000
GENERATED = RATE * 20  # 20 s of steady input per pause run
JOIN_AFTER = 3.0  # seconds of outputs before the second worker starts
SETTLED = 2.0  # seconds after the group is stable that still count towards the pause


class VolleyRun:
    """``volley run [--workers N] _workers_app:app`` in its own session, its output in a log file."""

    def __init__(self, cluster: Cluster, workdir: Path, *, source: str, output: str, group: str, workers: int = 1,
                 protocol: str = "classic") -> None:
        env = {**os.environ, "BENCH_BROKERS": cluster.brokers, "BENCH_SOURCE": source, "BENCH_OUTPUT": output,
               "BENCH_GROUP": group, "BENCH_GROUP_PROTOCOL": protocol,
               "PYTHONPATH": os.pathsep.join(filter(None, [str(workdir), str(HERE), os.environ.get("PYTHONPATH")]))}
        env.pop("KAFKA_CONSUMER_GROUP", None)
        self.log = workdir / f"{group}-{uuid.uuid4().hex[:4]}.log"
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "volley.cli", "--log-level", "WARNING", "run", "--workers", str(workers),
                 "_workers_app:app"], cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT,
                start_new_session=True)

    def check_alive(self) -> None:
        if self.process.poll() is not None:
            raise SystemExit(f"volley run exited with {self.process.returncode}:\n{self.tail()}")

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]

    def stop(self) -> None:
        """SIGTERM (the supervisor forwards it to its workers) and a clean exit."""
        self.check_alive()
        self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(90)
        except subprocess.TimeoutExpired:
            raise SystemExit(f"volley run ignored SIGTERM for 90 s:\n{self.tail()}") from None
        finally:
            self.cleanup()
        if code != 0:
            raise SystemExit(f"volley run stopped with {code}:\n{self.tail()}")

    def cleanup(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()


def members_assigned(cluster: Cluster, group: str, members: int) -> bool:
    """The group is stable with ``members`` members, each assigned some partitions, together all of them."""
    from confluent_kafka import ConsumerGroupState, KafkaException

    try:
        description = cluster.admin.describe_consumer_groups([group], request_timeout=5)[group].result(10)
    except (KafkaException, TimeoutError):  # the group not known yet, the coordinator loading, a busy broker
        return False
    if description.state != ConsumerGroupState.STABLE or len(description.members) != members:
        return False
    owned = [{tp.partition for tp in m.assignment.topic_partitions} for m in description.members]
    return all(owned) and sorted(p for parts in owned for p in parts) == list(range(cluster.partitions))


def wait(check: Any, within: float, what: str, run: VolleyRun, every: float = 0.05) -> None:
    deadline = time.monotonic() + within
    while not check():
        run.check_alive()
        if time.monotonic() > deadline:
            raise SystemExit(f"{what} not reached within {within:.0f} s:\n{run.tail()}")
        time.sleep(every)


def no_lag(cluster: Cluster, group: str, source: str, run: VolleyRun) -> None:
    wait(lambda: cluster.lag(group, source) == 0, 60, f"no lag for {group}", run, every=0.2)


def scale_run(cluster: Cluster, workdir: Path, source: str, workers: int) -> tuple[float, int]:
    """(messages per second once the group is stable, outputs beyond one per input)."""
    output = cluster.topic(f"workers-{workers}-out")
    group = f"bench-workers-{workers}-{uuid.uuid4().hex[:6]}"
    run = VolleyRun(cluster, workdir, source=source, output=output, group=group, workers=workers)
    try:
        wait(lambda: cluster.count(output) > 0, 120, f"{workers} worker(s) producing", run, every=0.02)
        first, first_base = time.perf_counter(), cluster.count(output)
        wait(lambda: members_assigned(cluster, group, workers), 120, f"{workers} worker(s) stable", run, every=0.1)
        started, base = time.perf_counter(), cluster.count(output)
        if N - base < N // 2:  # a fast machine got through most of it before the group was stable: count from
            started, base = first, first_base  # the first outputs (the start-up rebalance included)
        wait(lambda: cluster.count(output) >= N, 600, f"{N} outputs", run, every=0.02)
        elapsed = time.perf_counter() - started
        no_lag(cluster, group, source, run)
        run.stop()
    finally:
        run.cleanup()
    written = cluster.count(output)
    return (N - base) / elapsed, written - N


def output_records(cluster: Cluster, topic: str) -> list[tuple[float, int]]:
    """(append time in seconds, order id) of every record of ``topic``."""
    import orjson
    from confluent_kafka import Consumer, TopicPartition

    ends = cluster.end_offsets(topic)
    reader = Consumer({"bootstrap.servers": cluster.brokers, "group.id": f"bench-reader-{uuid.uuid4().hex[:6]}",
                       "enable.auto.commit": False})
    reader.assign([TopicPartition(topic, p, 0) for p in range(cluster.partitions) if ends[p]])
    records: list[tuple[float, int]] = []
    deadline = time.monotonic() + 120
    while len(records) < sum(ends) and time.monotonic() < deadline:
        records.extend((message.timestamp()[1] / 1000.0, orjson.loads(message.value())["order_id"])
                       for message in reader.consume(1000, 0.5) if message.error() is None)
    reader.close()
    return records


def pause_run(cluster: Cluster, workdir: Path, protocol: str) -> tuple[float, float]:
    """(longest gap between outputs while a second worker joins, longest gap before it), in milliseconds."""
    source = cluster.topic(f"pause-{protocol}-in")
    output = cluster.topic(f"pause-{protocol}-out", {"message.timestamp.type": "LogAppendTime"})
    group = f"bench-pause-{protocol}-{uuid.uuid4().hex[:6]}"
    names = {"source": source, "output": output, "group": group, "protocol": protocol}
    first = VolleyRun(cluster, workdir, **names)
    second: VolleyRun | None = None
    generator: subprocess.Popen[bytes] | None = None
    try:
        wait(lambda: members_assigned(cluster, group, 1), 120, "the first worker assigned", first, every=0.1)
        generator = subprocess.Popen([sys.executable, str(workdir / "bench_kafka_generator.py"), cluster.brokers,
                                      source, str(RATE), str(GENERATED)])
        wait(lambda: cluster.count(output) > 0, 60, "the first outputs", first)
        time.sleep(JOIN_AFTER)  # outputs flow at RATE meanwhile: the gaps before the join
        joined_at = time.time()
        second = VolleyRun(cluster, workdir, **names)
        wait(lambda: members_assigned(cluster, group, 2), 120, "both workers assigned", second, every=0.05)
        settled_at = time.time() + SETTLED
        if generator.wait(120) != 0:
            raise SystemExit("the generator failed")
        if time.time() < settled_at:
            raise SystemExit("the generator finished before the group settled: raise GENERATED")
        expected = GENERATED + 1  # and the generator's warm-up record
        wait(lambda: cluster.count(output) >= expected, 120, f"{expected} outputs", first)
        no_lag(cluster, group, source, first)
        second.stop()
        first.stop()
    finally:
        for run in (first, second):
            if run is not None:
                run.cleanup()
        if generator is not None and generator.poll() is None:
            generator.kill()
            generator.wait()
    records = output_records(cluster, output)
    distinct = {order_id for _, order_id in records}
    if len(distinct) != expected:
        raise SystemExit(f"pause run ({protocol}): {len(distinct)} distinct outputs of {expected}")
    times = sorted(at for at, _ in records)
    gaps = [(later - earlier, earlier, later) for earlier, later in itertools.pairwise(times)]
    during = max(gap for gap, earlier, later in gaps if later >= joined_at and earlier <= settled_at)
    before = max(gap for gap, earlier, later in gaps if later < joined_at and earlier >= times[0] + 1.0)
    return during * 1000.0, before * 1000.0


def measure(brokers: str, workdir: Path) -> None:
    """Print every figure (the clients made here are gone when it returns, before the broker stops)."""
    cluster = Cluster(brokers, partitions=PARTITIONS)
    source = cluster.topic("workers-in")
    cluster.seed(source, N)
    rates: dict[int, list[float]] = {1: [], 2: []}
    duplicates = 0
    for _ in range(ROUNDS):
        for workers in (1, 2):
            rate, extra = scale_run(cluster, workdir, source, workers)
            rates[workers].append(rate)
            duplicates += extra
    one, two = max(rates[1]), max(rates[2])
    print(f"kafka.workers_messages: {N}")
    print(f"kafka.workers_partitions: {PARTITIONS}")
    print(f"kafka.workers_runs: {ROUNDS}")
    print(f"kafka.workers_1_msgs_per_s: {one:.0f}")
    print(f"kafka.workers_2_msgs_per_s: {two:.0f}")
    print(f"kafka.workers_2_over_1: {two / one:.2f}")
    print(f"kafka.workers_duplicates: {duplicates}", flush=True)
    pauses = {}
    for protocol in ("classic", "consumer"):
        pause, before = pause_run(cluster, workdir, protocol)
        pauses[protocol] = pause
        print(f"kafka.rebalance_pause_ms_{protocol}: {pause:.0f}")
        print(f"kafka.rebalance_gap_ms_before_{protocol}: {before:.0f}", flush=True)
    print(f"kafka.rebalance_pause_ms: {pauses['classic']:.0f}")
    cluster.close()


def main() -> None:
    sys.path.insert(0, str(HERE))
    from bench_kafka import write_programs

    logging.basicConfig(level=logging.WARNING)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-workers-") as tmp, kafka_address() as brokers:
        write_programs(Path(tmp))
        measure(brokers, Path(tmp))
    print(f"kafka.workers_bench_seconds: {time.monotonic() - started:.0f}")


if __name__ == "__main__":
    main()
