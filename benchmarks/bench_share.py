"""Kafka share groups (``confluent-share``) on a real broker: throughput scales with workers on ONE partition.

A one-partition topic; 1 to 4 Volley worker processes (``tests/kafka/kafka_worker.py --share``) in one share group, each
with a sync handler that blocks 5 ms per message (I/O-like, ``sync_handler_mode="thread"``, so one worker's rate
is bounded by its handler, not by the CPU), writing one output per input. Then the same four workers in a
consumer group (``confluent``), where the one partition belongs to one member: they stay at one worker's rate.

Per run: the workers start on an empty topic; a trickle of warm-up records flows until every worker has handled
one (in the consumer group: until one has, and all have subscribed), then ``N`` records are written in small
record batches (a share fetch acquires whole batches). The rate is ``N`` over the span of the outputs' timestamps
(each written by its worker as it produced it), so start-up and the test's own polling do not count.

Broker: ``KAFKA_BROKERS`` when set, otherwise a private one from ``tools/services/kafka.py``. Prints
``share.workers_1_msgs_per_s`` ... ``share.workers_4_msgs_per_s``, ``share.scale_4_over_1`` (target >= 3.0),
``share.consumer_group_4_msgs_per_s``, and per run the number of workers that handled records and the
duplicates (outputs beyond one per input).
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

from _kafka import kafka_address

HERE = Path(__file__).resolve().parent
WORKER = HERE.parent / "tests" / "kafka" / "kafka_worker.py"
N = 2000
HANDLER_SECONDS = 0.005
WORKERS = (1, 2, 3, 4)


class Run:
    """One topic pair, one group, ``count`` worker processes."""

    def __init__(self, brokers: str, workdir: Path, count: int, profile: str) -> None:
        from confluent_kafka import Producer
        from confluent_kafka.admin import AdminClient, NewTopic

        from volley_kafka.share_admin import configure_share_group

        self.brokers = brokers
        self.profile = profile
        tag = uuid.uuid4().hex[:8]
        self.source, self.sink, self.group = f"share-in-{tag}", f"share-out-{tag}", f"share-group-{tag}"
        admin = AdminClient({"bootstrap.servers": brokers})
        for future in admin.create_topics([NewTopic(t, 1, 1) for t in (self.source, self.sink)]).values():
            future.result(30)
        if profile == "confluent-share":
            configure_share_group({"bootstrap.servers": brokers}, self.group, auto_offset_reset="earliest")
        self.producer = Producer({"bootstrap.servers": brokers, "linger.ms": 5, "batch.num.messages": 20})
        self.logs = [workdir / f"{tag}-{i}.log" for i in range(count)]
        self.processes: list[subprocess.Popen[bytes]] = []
        for log in self.logs:
            with log.open("wb") as out:
                self.processes.append(subprocess.Popen(
                    [sys.executable, str(WORKER), "--share", brokers, self.source, self.sink, self.group,
                     str(HANDLER_SECONDS), profile], stdout=out, stderr=subprocess.STDOUT))

    def produce(self, ids: range) -> None:
        for i in ids:
            self.producer.produce(self.source, json.dumps({"id": i}).encode())
            self.producer.poll(0)
        assert self.producer.flush(60) == 0

    def texts(self) -> list[str]:
        return [log.read_text(errors="replace") for log in self.logs]

    def warm_up(self, within: float = 90.0) -> None:
        """A trickle of records (negative ids) until every worker handled one (a consumer group: until one did,
        and all subscribed)."""
        deadline = time.monotonic() + within
        next_id = -1
        while True:
            texts = self.texts()
            handled = sum("handled its first message" in t for t in texts)
            if self.profile == "confluent-share":
                if handled == len(texts):
                    return
            elif handled >= 1 and all("subscribed to" in t for t in texts):
                return
            for process, text in zip(self.processes, texts, strict=True):
                if process.poll() is not None:
                    raise RuntimeError(f"a worker exited:\n{text[-3000:]}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"warm-up not done within {within} s; {handled} of {len(texts)} workers handled "
                                   f"a record:\n{texts[-1][-3000:]}")
            self.produce(range(next_id, next_id - 10, -1))
            next_id -= 10
            time.sleep(0.05)  # the trickle's pace, not a wait for anything

    def measure(self, within: float = 180.0) -> tuple[float, int, int]:
        """Write N records, wait for their outputs; (msgs/s over the outputs' timestamps, workers that handled
        some, duplicates)."""
        self.produce(range(N))
        deadline = time.monotonic() + within
        while True:
            outputs = self.read_outputs()
            ids = Counter(o["id"] for o, _ in outputs if o["id"] >= 0)
            if len(ids) >= N:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"only {len(ids)} of {N} outputs within {within} s")
            time.sleep(0.5)  # polling the output topic: the measured span comes from the records' timestamps
        stamps = [stamp for o, stamp in outputs if o["id"] >= 0]
        rate = N / max(1e-3, (max(stamps) - min(stamps)) / 1000.0)
        workers = len({o["pid"] for o, _ in outputs if o["id"] >= 0})
        return rate, workers, sum(n - 1 for n in ids.values())

    def read_outputs(self) -> list[tuple[dict[str, Any], int]]:
        from confluent_kafka import Consumer, TopicPartition

        reader = Consumer({"bootstrap.servers": self.brokers, "group.id": f"reader-{uuid.uuid4().hex[:6]}",
                           "enable.auto.commit": False})
        try:
            _low, high = reader.get_watermark_offsets(TopicPartition(self.sink, 0), timeout=10)
            reader.assign([TopicPartition(self.sink, 0, 0)])
            out: list[tuple[dict[str, Any], int]] = []
            while len(out) < high:
                out.extend((json.loads(m.value()), m.timestamp()[1]) for m in reader.consume(1000, 1.0)
                           if m.error() is None)
            return out
        finally:
            reader.close()

    def stop(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.terminate()
        for process in self.processes:
            try:
                process.wait(30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait(10)


def run(brokers: str, workdir: Path, count: int, profile: str) -> tuple[float, int, int]:
    current = Run(brokers, workdir, count, profile)
    try:
        current.warm_up()
        return current.measure()
    finally:
        current.stop()


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="bench-share-") as tmp, kafka_address() as brokers:
        workdir = Path(tmp)
        rates: dict[int, float] = {}
        print(f"share.messages: {N}")
        print(f"share.handler_ms: {HANDLER_SECONDS * 1000:.0f}")
        for count in WORKERS:
            rate, active, duplicates = run(brokers, workdir, count, "confluent-share")
            rates[count] = rate
            print(f"share.workers_{count}_msgs_per_s: {rate:.0f}")
            print(f"share.workers_{count}_active: {active}")
            print(f"share.workers_{count}_duplicates: {duplicates}", flush=True)
        print(f"share.scale_4_over_1: {rates[4] / rates[1]:.2f}")
        rate, active, duplicates = run(brokers, workdir, 4, "confluent")
        print(f"share.consumer_group_4_msgs_per_s: {rate:.0f}")
        print(f"share.consumer_group_4_active: {active}")
        print(f"share.consumer_group_4_over_share_1: {rate / rates[1]:.2f}", flush=True)


if __name__ == "__main__":
    main()
