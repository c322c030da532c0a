"""`volley run module:app --workers 2` on a real broker: partitions split, a kill -9 is survived, SIGTERM stops all.

The supervisor runs as a subprocess with its own process group. Its children are plain ``volley run`` processes,
each a member of one consumer group (static membership by worker index: tests/e2e/e2e_kafka_worker.py).

Note: the worker module is imported as ``e2e_kafka_worker`` with tests/e2e on PYTHONPATH, not as
``tests.e2e.e2e_kafka_worker``: PyRSMQ (a dependency of volley-rsmq) installs a top-level ``tests`` package into
site-packages, and a regular package there wins over this repository's ``tests`` folder, which has no __init__.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import pytest
from confluent_kafka import Consumer, ConsumerGroupState, KafkaException, Producer
from confluent_kafka.admin import AdminClient, NewTopic

pytestmark = [pytest.mark.kafka, pytest.mark.slow, pytest.mark.timeout(180)]

ROOT = Path(__file__).resolve().parents[2]
HERE = Path(__file__).resolve().parent
PARTITIONS = 4
FIRST_BATCH = 2_000
TAIL_BATCH = 200
STARTED = re.compile(r"worker (\d+) started \(pid (\d+)\)")

T = TypeVar("T")


def eventually(check: Callable[[], T | None], within: float, what: str, detail: Callable[[], str] = str) -> T:
    """Poll ``check`` until it returns something other than None/False, or fail after ``within`` seconds."""
    deadline = time.monotonic() + within
    while True:
        result = check()
        if result is not None and result is not False:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s; {detail()}")
        time.sleep(0.05)


def alive(pid: int) -> bool:
    """True for a running process; a zombie (dead, not yet reaped) counts as gone."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError, IndexError):
        return False
    return state not in ("Z", "X")


@dataclass
class Outputs:
    """Everything the workers produced to the output topic, read by a consumer of its own."""

    consumer: Consumer
    records: list[dict[str, Any]] = field(default_factory=list)

    def poll(self) -> None:
        for message in self.consumer.consume(num_messages=1000, timeout=0.1):
            if message.error() is None:
                self.records.append(json.loads(message.value()))

    def ids(self) -> set[int]:
        return {record["id"] for record in self.records}

    def pids(self) -> set[int]:
        return {record["pid"] for record in self.records}

    def partitions_by_pid(self) -> dict[int, set[int]]:
        owners: dict[int, set[int]] = {}
        for record in self.records:
            owners.setdefault(record["pid"], set()).add(record["partition"])
        return owners


@pytest.fixture
def names() -> dict[str, str]:
    suffix = uuid.uuid4().hex[:8]
    return {"VOLLEY_E2E_INPUT": f"e2e-workers-in-{suffix}", "VOLLEY_E2E_OUTPUT": f"e2e-workers-out-{suffix}",
            "VOLLEY_E2E_GROUP": f"e2e-workers-{suffix}"}


@pytest.fixture
def outputs(kafka_bootstrap: str, names: dict[str, str]) -> Iterator[Outputs]:
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    futures = admin.create_topics([
        NewTopic(names["VOLLEY_E2E_INPUT"], num_partitions=PARTITIONS, replication_factor=1),
        NewTopic(names["VOLLEY_E2E_OUTPUT"], num_partitions=1, replication_factor=1),
    ])
    for future in futures.values():
        future.result(30)
    consumer = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{names['VOLLEY_E2E_GROUP']}-reader",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    consumer.subscribe([names["VOLLEY_E2E_OUTPUT"]])
    yield Outputs(consumer)
    consumer.close()


def seed(bootstrap: str, topic: str, ids: range) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
    for i in ids:
        producer.produce(topic, json.dumps({"id": i}).encode(), key=str(i).encode(), partition=i % PARTITIONS)
    assert producer.flush(30) == 0


def assignment(admin: AdminClient, group: str) -> dict[int, set[int]] | None:
    """Worker index -> partitions once the group is stable with both static members and every partition assigned.

    Members are told apart by ``group.instance.id`` (group-<VOLLEY_WORKER_INDEX>): with static membership a
    restarted worker takes over its predecessor's member entry, client id included, so only the index is reliable.
    """
    try:
        description = admin.describe_consumer_groups([group])[group].result(10)
    except KafkaException:
        return None
    if description.state != ConsumerGroupState.STABLE:
        return None
    owners = {int(m.group_instance_id.rsplit("-", 1)[1]): {tp.partition for tp in m.assignment.topic_partitions}
              for m in description.members if m.group_instance_id}
    every = [p for parts in owners.values() for p in parts]
    if set(owners) != {0, 1} or sorted(every) != list(range(PARTITIONS)) or not all(owners.values()):
        return None
    return owners


@dataclass
class Supervised:
    """``volley run e2e_kafka_worker:app --workers 2`` in its own process group, its output in a log file."""

    process: subprocess.Popen[bytes]
    log_path: Path

    @classmethod
    def start(cls, kafka_bootstrap: str, names: dict[str, str], log_path: Path) -> Supervised:
        env = {**os.environ, **names, "KAFKA_BROKERS": kafka_bootstrap, "PYTHONUNBUFFERED": "1",
               "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
               "VOLLEY_SHUTDOWN_DEADLINE": "30"}
        with log_path.open("wb") as log:
            process = subprocess.Popen(
                [sys.executable, "-m", "volley.cli", "run", "e2e_kafka_worker:app", "--workers", "2"],
                cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        return cls(process, log_path)

    def log(self) -> str:
        return self.log_path.read_text()

    def log_tail(self) -> str:
        return "supervisor log:\n" + self.log()[-5000:]

    def started(self) -> dict[int, int]:
        """pid -> worker index, for every worker the supervisor ever started."""
        return {int(pid): int(index) for index, pid in STARTED.findall(self.log())}

    def cleanup(self) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.started():
            if alive(pid):
                os.kill(pid, signal.SIGKILL)


def test_two_workers_split_partitions_survive_kill_and_stop_on_sigterm(
    kafka_bootstrap: str, names: dict[str, str], outputs: Outputs, tmp_path: Path
) -> None:
    began = time.monotonic()
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    group = names["VOLLEY_E2E_GROUP"]
    supervisor = Supervised.start(kafka_bootstrap, names, tmp_path / "supervisor.log")
    log_tail, started = supervisor.log_tail, supervisor.started
    try:
        # Both workers joined the group and the four partitions are split between them.
        first = eventually(lambda: started() if len(started()) == 2 else None, 30, "two workers started", log_tail)
        by_index = eventually(lambda: assignment(admin, group), 60, "both workers assigned partitions", log_tail)
        owners = {pid: by_index[index] for pid, index in first.items()}
        assert all(len(parts) == 2 for parts in owners.values()), owners

        # Mid-stream: both are producing, each only from its own partitions.
        seed(kafka_bootstrap, names["VOLLEY_E2E_INPUT"], range(FIRST_BATCH))

        def both_busy() -> bool:
            outputs.poll()
            return len(outputs.records) >= 300 and outputs.pids() == set(first)

        eventually(both_busy, 30, "outputs from both workers", lambda: f"{len(outputs.records)} outputs; {log_tail()}")
        seen_by = outputs.partitions_by_pid()
        for pid, parts in seen_by.items():
            assert parts <= owners[pid], f"pid {pid} handled partitions {parts}, assigned {owners[pid]}"

        # kill -9 a worker while the stream is still going.
        victim = min(first, key=lambda pid: sum(r["pid"] == pid for r in outputs.records))
        os.kill(victim, signal.SIGKILL)
        killed_at = len(outputs.ids())
        assert killed_at < FIRST_BATCH, "the stream was over before the kill; raise VOLLEY_E2E_WORK_SECONDS"

        # The supervisor starts a replacement with the same index, which gets the partitions back.
        third = eventually(lambda: [p for p in started() if p not in first] or None, 30, "a restarted worker",
                           log_tail)
        assert len(third) == 1 and started()[third[0]] == first[victim], started()
        replacement = third[0]
        survivor = next(pid for pid in first if pid != victim)

        # Every message gets through: the first batch, and a tail that the replacement must take part in.
        seed(kafka_bootstrap, names["VOLLEY_E2E_INPUT"], range(FIRST_BATCH, FIRST_BATCH + TAIL_BATCH))

        def complete() -> bool:
            outputs.poll()
            return len(outputs.ids()) == FIRST_BATCH + TAIL_BATCH

        missing = lambda: sorted(set(range(FIRST_BATCH + TAIL_BATCH)) - outputs.ids())  # noqa: E731
        eventually(complete, 60, "every id in the output", lambda: f"missing {missing()[:20]}...; {log_tail()}")
        assert outputs.ids() == set(range(FIRST_BATCH + TAIL_BATCH))
        assert outputs.pids() == {victim, survivor, replacement}
        # The victim had not finished (and committed) its partitions when it died: others handled some of them.
        assert [r for r in outputs.records
                if r["id"] < FIRST_BATCH and r["partition"] in owners[victim] and r["pid"] != victim]
        # After the restart the partitions are split again, between the survivor and the replacement.
        by_index = eventually(lambda: assignment(admin, group), 30, "a stable group after the restart", log_tail)
        owners_after = {survivor: by_index[first[survivor]], replacement: by_index[first[victim]]}
        tail = [r for r in outputs.records if r["id"] >= FIRST_BATCH]
        assert {r["partition"] for r in tail if r["pid"] == replacement} == owners_after[replacement]
        assert all(r["partition"] in owners_after[r["pid"]] for r in tail)
        duplicates = len(outputs.records) - len(outputs.ids())

        # SIGTERM: the supervisor stops both workers gracefully and exits 0 within the deadline.
        stop_began = time.monotonic()
        supervisor.process.send_signal(signal.SIGTERM)
        assert supervisor.process.wait(40) == 0, log_tail()
        stop_seconds = time.monotonic() - stop_began
        assert not [pid for pid in (*first, replacement) if alive(pid)]
        log = supervisor.log()
        assert "SIGTERM received: stopping 2 worker(s)" in log
        assert log.count("SIGTERM received: stopping 1 app(s)") == 2
        assert log.count("e2e-workers: stopped (RunReport(") == 2, log_tail()  # both finished gracefully
        assert "did not stop within the deadline" not in log
        print(f"workers e2e: {time.monotonic() - began:.1f} s; kill at {killed_at}/{FIRST_BATCH} outputs; "
              f"{duplicates} duplicates after the kill; SIGTERM to exit {stop_seconds:.1f} s")
    finally:
        supervisor.cleanup()


@pytest.fixture
def two_consuming(kafka_bootstrap: str, names: dict[str, str], outputs: Outputs,
                  tmp_path: Path) -> Iterator[Supervised]:
    """The supervisor with both workers consuming; cleaned up whatever the test did to it."""
    supervisor = Supervised.start(kafka_bootstrap, names, tmp_path / "supervisor.log")
    try:
        eventually(lambda: supervisor.log().count("e2e-workers: consuming in") == 2, 30, "two workers consuming",
                   supervisor.log_tail)
        yield supervisor
    finally:
        supervisor.cleanup()


def both_stopped_gracefully(supervisor: Supervised) -> bool:
    return supervisor.log().count("e2e-workers: stopped (RunReport(") == 2


def test_ctrl_c_in_a_terminal_stops_workers_gracefully(two_consuming: Supervised) -> None:
    os.killpg(two_consuming.process.pid, signal.SIGINT)  # what Ctrl-C does: the whole foreground process group
    code = two_consuming.process.wait(40)
    assert both_stopped_gracefully(two_consuming), two_consuming.log_tail()
    assert code == 0


def test_workers_stop_gracefully_when_the_supervisor_is_killed(two_consuming: Supervised) -> None:
    """kill -9 of the supervisor: its workers get SIGTERM from the kernel (PR_SET_PDEATHSIG) and stop gracefully."""
    workers = list(two_consuming.started())
    os.kill(two_consuming.process.pid, signal.SIGKILL)  # the supervisor alone, not its workers
    two_consuming.process.wait(10)
    eventually(lambda: not any(alive(pid) for pid in workers), 40, "both workers gone", two_consuming.log_tail)
    assert both_stopped_gracefully(two_consuming), two_consuming.log_tail()
