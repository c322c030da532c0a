"""Crash and rebalance: real worker subprocesses, kill -9 mid-stream, members joining and leaving.

The worker (kafka_worker.py) runs the engine Kafka -> Kafka. What the tests check is what Kafka holds
afterwards: every input id in the output topic (zero loss), and how many came out twice.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

import pytest
from confluent_kafka import KafkaException

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

WORKER = Path(__file__).with_name("kafka_worker.py")
PARTITIONS = 4


class Worker:
    started: ClassVar[list[Worker]] = []

    def __init__(self, kit: Any, source: str, sink: str, group: str, instance: str, log: Path,
                 seconds: float, protocol: str = "classic") -> None:
        self.log = log
        self._file = log.open("ab")
        self.process = subprocess.Popen(
            [sys.executable, str(WORKER), kit.bootstrap, source, sink, group, instance, str(seconds), protocol],
            stdout=self._file, stderr=subprocess.STDOUT,
        )
        Worker.started.append(self)

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(30)
        self._file.close()

    def terminate(self, timeout: float = 60.0) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
        try:
            code = self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(30)
            raise AssertionError(f"worker ignored SIGTERM for {timeout} s; log: {self.tail()}") from None
        finally:
            self._file.close()
        return code

    def alive(self) -> bool:
        return self.process.poll() is None

    def tail(self) -> str:
        return self.log.read_text(errors="replace")[-3000:]


@pytest.fixture(autouse=True)
def _no_worker_left_behind() -> Iterator[None]:
    """A failing test must not leave worker processes running."""
    yield
    while Worker.started:
        worker = Worker.started.pop()
        if worker.alive():
            worker.process.kill()
            worker.process.wait(30)
        worker._file.close()  # an unclosed log would surface later as an unraisable-exception warning


def produced(kit: Any, topic: str) -> int:
    return sum(kit.end_offsets(topic, PARTITIONS).values())


def wait_until(condition: Any, within: float, what: str, workers: list[Worker]) -> None:
    deadline = time.monotonic() + within
    while not condition():
        for worker in workers:
            assert worker.alive(), f"a worker died: {worker.tail()}"
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s; log: {workers[-1].tail()}")
        time.sleep(0.05)


def seed(kit: Any, count: int) -> tuple[str, str]:
    source = kit.topic("crash-in", PARTITIONS)
    sink = kit.topic("crash-out", PARTITIONS)
    kit.produce(source, [json.dumps({"id": i}).encode() for i in range(count)],
                keys=[str(i).encode() for i in range(count)])
    return source, sink


def output_ids(kit: Any, sink: str) -> Counter[int]:
    return Counter(json.loads(m.value())["id"] for m in kit.read_topic(sink, timeout=60))


def all_committed(kit: Any, group: str, source: str, ends: dict[int, int]) -> bool:
    try:
        return kit.committed(group, source, PARTITIONS, within=5.0) == ends
    except KafkaException as exc:  # right after a broker restart the coordinator may stay away longer: "not yet"
        if kit.coordinator_busy(exc):
            return False
        raise


def test_kill_9_three_times_loses_nothing(kit: Any, tmp_path: Path, record_property: Any, group_protocol: str) -> None:
    # Under the consumer protocol a worker restarted after kill -9 with the same group.instance.id is refused
    # (UNRELEASED_INSTANCE_ID, fatal in librdkafka 2.16: the worker stops) until the dead member's session expires,
    # so there the restarted workers are dynamic members, and the dead one's partitions wait for its session
    # (the test broker's group.consumer.session.timeout.ms, 10 s).
    instance = "crash-worker-0" if group_protocol == "classic" else "-"
    count = 20_000
    source, sink = seed(kit, count)
    ends = kit.end_offsets(source, PARTITIONS)
    group = kit.unique("crash")
    seed_value = random.randrange(2**32)
    rng = random.Random(seed_value)
    record_property("seed", seed_value)
    print(f"crash test seed {seed_value}")
    log = tmp_path / "worker.log"
    for round_number in range(1, 4):
        # Each kill comes a random amount of new output after this worker's start (10-30 % of the input count
        # for the first, 5-25 % for the others), not at independent draws over the whole run, which could
        # cluster and kill a restarted worker before it handled anything. The third kill lands by about 80 %
        # of the input count, so the last worker has work left.
        at_start = produced(kit, sink)
        share = rng.uniform(0.1, 0.3) if round_number == 1 else rng.uniform(0.05, 0.25)
        threshold = at_start + share * count
        worker = Worker(kit, source, sink, group, instance, log, seconds=0.0002,
                        protocol=group_protocol)
        wait_until(lambda t=threshold: produced(kit, sink) >= t, 90, f"{threshold:.0f} outputs", [worker])
        started = log.read_text(errors="replace").count("handled its first message")
        assert started == round_number, f"worker #{round_number} was killed before it handled a message"
        worker.kill()
        print(f"kill -9 #{round_number}: {at_start} outputs at its start, {produced(kit, sink)} at the kill")
    worker = Worker(kit, source, sink, group, instance, log, seconds=0.0, protocol=group_protocol)
    wait_until(lambda: all_committed(kit, group, source, ends), 120, "every input committed", [worker])
    assert worker.terminate() == 0, worker.tail()

    ids = output_ids(kit, sink)
    missing = sorted(set(range(count)) - set(ids))
    duplicates = sum(n - 1 for n in ids.values() if n > 1)
    print(f"crash test: {count} inputs, {sum(ids.values())} outputs, {len(missing)} missing, "
          f"{duplicates} duplicates after 3 kills")
    record_property("duplicates", duplicates)
    assert not missing, f"{len(missing)} ids lost, first {missing[:10]}"
    assert set(ids) == set(range(count)), "only the input ids came out"


def test_members_join_and_leave_mid_stream_without_loss(kit: Any, tmp_path: Path, group_protocol: str) -> None:
    """Two workers in one group while input keeps arriving: the second joins after a quarter, leaves gracefully
    after two thirds. Nothing is lost, and since every rebalance finishes in-flight work and commits it, nothing
    is done twice either."""
    count = 12_000
    source = kit.topic("rebalance-in", PARTITIONS)
    sink = kit.topic("rebalance-out", PARTITIONS)
    group = kit.unique("rebalance")
    # The first half arrives over about three seconds; the second half only once the second member has its
    # partitions, so that it has work to do however long it took to start.
    both_members = threading.Event()
    feeder = threading.Thread(target=feed, args=(kit, source, count, 2000.0, both_members), daemon=True)
    feeder.start()
    first = Worker(kit, source, sink, group, "-", tmp_path / "first.log", seconds=0.0002, protocol=group_protocol)
    workers = [first]
    try:
        wait_until(lambda: produced(kit, sink) >= count / 4, 90, "a quarter of the outputs", workers)
        second = Worker(kit, source, sink, group, "-", tmp_path / "second.log", seconds=0.0002,
                        protocol=group_protocol)
        workers.append(second)
        wait_until(lambda: "assigned" in second.log.read_text(errors="replace"), 60,
                   "the second worker's partitions", workers)
        both_members.set()
        wait_until(lambda: "handled its first message" in second.log.read_text(errors="replace"), 60,
                   "the second worker's first message", workers)
        wait_until(lambda: produced(kit, sink) >= 2 * count / 3, 90, "two thirds of the outputs", workers)
        assert second.terminate() == 0, second.tail()
        workers.remove(second)
    finally:
        both_members.set()
        feeder.join(60)
    ends = kit.end_offsets(source, PARTITIONS)
    assert sum(ends.values()) == count
    wait_until(lambda: all_committed(kit, group, source, ends), 120, "every input committed", workers)
    assert first.terminate() == 0, first.tail()

    copies = [json.loads(m.value()) for m in kit.read_topic(sink, timeout=60)]
    ids = Counter(c["id"] for c in copies)
    pids = Counter(c["pid"] for c in copies)
    assert pids[second.process.pid] > 0, (
        f"the second worker never produced: no rebalance happened?\nfirst: {first.tail()}\nsecond: {second.tail()}")
    assert pids[first.process.pid] > 0
    missing = sorted(set(range(count)) - set(ids))
    duplicated = sorted(i for i, n in ids.items() if n > 1)
    assert not missing, f"{len(missing)} ids lost, first {missing[:10]}"
    if duplicated:
        detail = sorted((c["id"], c["pid"], c["p"], c["o"]) for c in copies if c["id"] in set(duplicated[:5]))
        raise AssertionError(f"{len(duplicated)} ids produced twice across graceful rebalances: {detail}")


def feed(kit: Any, topic: str, count: int, rate: float, halfway: threading.Event) -> None:
    """Produce ids 0..count-1 at about ``rate`` per second; the second half once ``halfway`` is set."""
    from confluent_kafka import Producer

    producer = Producer({"bootstrap.servers": kit.bootstrap, "linger.ms": 5, "enable.idempotence": True})
    started = time.monotonic()
    for i in range(count):
        if i == count // 2:
            producer.flush(60)
            assert halfway.wait(120), "the test never let the second half go"
            started = time.monotonic() - i / rate
        producer.produce(topic, json.dumps({"id": i}).encode(), str(i).encode())
        if i % 100 == 99:
            producer.poll(0)
            ahead = started + (i + 1) / rate - time.monotonic()
            if ahead > 0:
                time.sleep(ahead)  # pacing the feed, not waiting for a condition
    assert producer.flush(60) == 0


# Seconds the broker stays down: shorter and longer than the worker's 10 s session timeout (kafka_worker.py, static
# member). The outage length is the condition under test, so it is a fixed time, not a wait for something.
OUTAGES = {"shorter-than-session": 3.0, "longer-than-session": 16.0}


def wait_supervised(condition: Any, within: float, what: str, worker: Worker, restart: Any,
                    record_property: Any) -> Worker:
    """``wait_until`` for one worker, restarted as its supervisor would when it stopped for a fatal consumer error
    (and only then: any other end fails the test). Returns the worker running at the end."""
    deadline = time.monotonic() + within
    restarts = 0
    while not condition():
        if not worker.alive():
            code = worker.terminate()
            text = worker.log.read_text(errors="replace")
            assert code == 1 and text.count("ConsumerFailedError") > restarts and restarts < 3, \
                f"the worker died (exit code {code}): {worker.tail()}"
            restarts += 1
            print(f"the worker stopped for a fatal consumer error; restarted ({restarts})")
            worker = restart()
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s; log: {worker.tail()}")
        time.sleep(0.05)
    record_property("restarts_after_fatal_errors", restarts)
    return worker


@pytest.mark.parametrize("outage", sorted(OUTAGES))
def test_a_broker_outage_mid_stream_loses_nothing(kit: Any, tmp_path: Path, outage: str, group_protocol: str,
                                                  record_property: Any) -> None:
    """The broker stops mid-stream and comes back on its ports with its data (services' KafkaBroker.halt/start):
    the worker finishes the stream with nothing lost. Past the session timeout its partitions are lost and
    assigned back, the path where a pause used to outlive the assignment.

    The worker is a static member (group.instance.id). Now and then, as the coordinator comes back, one of its
    own requests still under way with its old member id fences it (FENCED_INSTANCE_ID, fatal in librdkafka): it
    then stops with a ConsumerFailedError and exit code 1, and is restarted as its supervisor would do, with
    the same id. It must never stay alive consuming nothing (what it did before: see
    test_a_worker_fenced_out_of_its_group_instance_id_exits_saying_so)."""
    from services.kafka import KafkaBroker

    count = 6000
    with KafkaBroker() as broker:  # our own: the session's broker must not go down under other tests
        own = type(kit)(broker.bootstrap_servers)
        source, sink = seed(own, count)
        ends = own.end_offsets(source, PARTITIONS)
        group = own.unique("outage")
        def start() -> Worker:
            return Worker(own, source, sink, group, "outage-worker-0", tmp_path / "worker.log", seconds=0.002,
                          protocol=group_protocol)

        worker = start()
        wait_until(lambda: produced(own, sink) >= count / 5, 90, "a fifth of the outputs", [worker])
        broker.halt()
        down_until = time.monotonic() + OUTAGES[outage]
        while time.monotonic() < down_until:
            assert worker.alive(), f"the worker died while the broker was down: {worker.tail()}"
            time.sleep(0.1)
        broker.start()
        worker = wait_supervised(lambda: all_committed(own, group, source, ends), 180, "every input committed",
                                 worker, start, record_property)
        assert worker.terminate() == 0, worker.tail()
        ids = output_ids(own, sink)
    log = (tmp_path / "worker.log").read_text(errors="replace")
    if OUTAGES[outage] > 10.0 and group_protocol == "classic":
        # (Under the consumer protocol the session is the broker's own, and its clock starts again with the broker:
        # the member keeps its partitions.)
        assert " lost" in log, "the outage outlived the session, so the worker must have lost its partitions"
    missing = sorted(set(range(count)) - set(ids))
    assert not missing, f"{len(missing)} ids lost after a {OUTAGES[outage]} s outage, first {missing[:10]}"
    assert set(ids) == set(range(count))


def test_a_worker_fenced_out_of_its_group_instance_id_exits_saying_so(kit: Any, tmp_path: Path,
                                                                      group_protocol: str) -> None:
    """A static member whose group.instance.id another consumer takes is dead for librdkafka (a fatal error:
    FENCED_INSTANCE_ID under the classic protocol, UNRELEASED_INSTANCE_ID for the newcomer under KIP-848). The
    worker must not stay alive consuming nothing: it shuts down and exits non-zero naming the error, for its
    supervisor to restart it. Under the classic protocol the newcomer fences the member in place; under the
    consumer protocol the id's holder keeps it and the newcomer fails, so there the worker comes second."""
    from confluent_kafka import Consumer

    count = 2000
    source, sink = seed(kit, count)
    group = kit.unique("fenced")
    instance = kit.unique("static")
    settings = {"bootstrap.servers": kit.bootstrap, "group.id": group, "group.instance.id": instance,
                "group.protocol": group_protocol, "enable.auto.commit": False, "auto.offset.reset": "latest"}
    log = tmp_path / "worker.log"
    intruder: Any = None
    try:
        if group_protocol == "classic":
            worker = Worker(kit, source, sink, group, instance, log, seconds=0.005, protocol=group_protocol)
            wait_until(lambda: "handled its first message" in log.read_text(errors="replace"), 90,
                       "the worker's first message", [worker])
            intruder = Consumer({**settings, "session.timeout.ms": 10_000})
            intruder.subscribe([source])
        else:
            intruder = Consumer(settings)
            intruder.subscribe([source])
            deadline = time.monotonic() + 60
            while not intruder.assignment():
                assert time.monotonic() < deadline, "the first holder of the instance id never got partitions"
                intruder.poll(0.1)
            worker = Worker(kit, source, sink, group, instance, log, seconds=0.005, protocol=group_protocol)
        deadline = time.monotonic() + 60
        while worker.alive():
            assert time.monotonic() < deadline, f"the fenced worker is still alive after 60 s: {worker.tail()}"
            intruder.poll(0.1)  # serve the intruder's membership while waiting for the worker to exit
        code = worker.process.wait()
    finally:
        if intruder is not None:
            intruder.close()
    text = log.read_text(errors="replace")
    assert code == 1, f"exit code {code}: {text[-3000:]}"
    assert "ConsumerFailedError" in text and "fatal Kafka error" in text, text[-3000:]
    assert "group.instance.id" in text, "the error names the static membership"
    assert "kafka-worker: stopped (" in text, f"the run shut down in order: {text[-3000:]}"
