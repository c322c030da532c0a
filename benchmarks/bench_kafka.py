"""Kafka -> Kafka benchmark on a real Apache Kafka broker: two hand-written ceilings, Volley, py-volley.

200,000 JSON orders of about 200 bytes in a 4-partition topic; each run reads them all with a consumer group of
its own and writes one output per input to a topic of its own, doing the same work per message (``_orders.py``):
orjson decode, Pydantic v2 validation of ``Order``, the handler (builds an ``Enriched``), JSON-mode dump, orjson
encode, produce.

(a) the simple ceiling: a hand-written confluent-kafka loop that commits without waiting for delivery and never
    overlaps fetching with processing (``_kafka_ceilings.simple``);
(b) the pipelined ceiling: the best hand-written program with Volley's safety, a fetch thread feeding the
    processing thread through a bounded queue, offsets stored after delivery reports and committed
    asynchronously (``_kafka_ceilings.pipelined``);
(c) Volley, the ``confluent`` profile with its default settings (idempotent producer, commits only what was
    delivered), then the ``confluent-eos`` profile (exactly-once: a transaction every 100 ms or 10,000 inputs), whose
    output a ``read_committed`` reader counts in the same run (every output once, no duplicate);
(d) py-volley 1.3.1 with its ``confluent`` profile, in its own virtualenv (``benchmarks/_pyvolley.py``), as a
    subprocess, over the first 30,000 messages (it is two orders of magnitude slower), timed from its first
    output to its 30,000th.

(a)-(c) are timed from the first message consumed to the last output delivered and its input committed; each
run checks every output was written and no lag is left. They run three times each, alternating, and the best
of each is compared (the median is printed too).
Then end-to-end latency at a steady 2,000 msg/s through Volley, from the broker's append time of each input to
that of its output (``LogAppendTime`` on both topics): ``kafka.latency_p50_ms`` / ``kafka.latency_p99_ms`` over
10 s, after 3 s at the same rate that are not counted (``kafka.latency_p99_with_warmup_ms`` counts them). The
generator runs in a process of its own with librdkafka's default batching (linger.ms=5) and an idempotent
producer; ``kafka.latency_from_send_*`` also count its own produce delay (from the send timestamp in the
payload: up to the 5 ms linger, so these figures are not comparable with runs before that setting).

Broker: ``KAFKA_BROKERS`` when set, otherwise a private one from ``tools/services/kafka.py``. Prints
``name: value`` lines, among them ``kafka.ceiling_msgs_per_s`` (a), ``kafka.ceiling_pipelined_msgs_per_s`` (b),
``kafka.volley_msgs_per_s``, ``kafka.efficiency`` (c / the better of a and b, target >= 0.85),
``kafka.vs_pyvolley`` (c / d, target >= 10), ``kafka.eos_msgs_per_s``, ``kafka.eos_over_alo`` (target >= 0.6),
``kafka.eos_duplicates`` (must be 0), ``kafka.latency_p50_ms`` and ``kafka.latency_p99_ms`` (target p99 <=
50 ms). The peers (Quix Streams, FastStream, faust-streaming) are ``bench_peers.py``: ``python3 dev.py bench
peers``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import time
import uuid
from pathlib import Path
from typing import Any

import _kafka_ceilings
from _kafka import HERE, PARTITIONS, Cluster, N, kafka_address, write_model
from _orders import payload

PYVOLLEY_N = 30_000
REPEATS = 3  # the ceilings and Volley alternate; the best of each is compared, which discounts interference
# from whatever else the machine runs meanwhile
LATENCY_RATE = 2_000  # msg/s
LATENCY_SECONDS = 10.0  # measured, after
LATENCY_WARMUP_SECONDS = 3.0  # at the same rate, not counted: the broker's JIT compiles its produce and fetch
# paths for the new load in these first seconds, and on two cores that stalls everything running beside it
PYVOLLEY_WORKER = textwrap.dedent('''
    import logging
    import sys

    from volley import Engine

    from bench_kafka_model import Enriched, handle

    brokers, source, output, group = sys.argv[1:5]
    app = Engine(
        app_name="bench-pyvolley",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"value": source, "profile": "confluent", "data_model": "bench_kafka_model.Order",
                   "config": {"bootstrap.servers": brokers, "group.id": group, "auto.offset.reset": "earliest"}},
            "out": {"value": output, "profile": "confluent", "data_model": "bench_kafka_model.Enriched",
                    "config": {"bootstrap.servers": brokers}},
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


GENERATOR = textwrap.dedent('''
    """Produce RATE orders per second for SECONDS, each stamped with its send time (a process of its own, so
    that it competes with the measured worker for no lock)."""
    import sys
    import time

    import orjson
    from confluent_kafka import Producer

    brokers, topic, rate, count = sys.argv[1], sys.argv[2], float(sys.argv[3]), int(sys.argv[4])
    # librdkafka's defaults (linger.ms=5), as an upstream service would have them. With linger.ms=0 each record
    # is a request of its own, and at 2,000 requests/s the broker alone takes a whole core of this machine.
    producer = Producer({"bootstrap.servers": brokers, "enable.idempotence": True})
    # Connect, learn the topic and get a producer id first: not part of what is measured.
    producer.produce(topic, orjson.dumps({"order_id": -2, "customer": "warm-up", "amount": 0, "currency": "EUR",
                                          "created_at": "2026-11-28T08:00:00+00:00", "tags": []}))
    producer.flush(30)
    start = time.perf_counter()
    for i in range(count):
        pause = start + i / rate - time.perf_counter()
        if pause > 0:
            time.sleep(pause)
        body = {"order_id": i, "customer": f"customer-{i % 997:04d}", "amount": (i % 10_000) / 7,
                "currency": "EUR", "created_at": "2026-11-28T08:00:00+00:00", "tags": ["web", "eu", f"t{i % 13}"],
                "note": "deliver to the back door, please" if i % 3 else None, "sent_at": time.time()}
        producer.produce(topic, orjson.dumps(body), str(i).encode())
        producer.poll(0)
    producer.flush(30)
''')


def write_programs(directory: Path) -> None:
    write_model(directory)
    (directory / "bench_pyvolley_kafka_worker.py").write_text(PYVOLLEY_WORKER)
    (directory / "bench_kafka_generator.py").write_text(GENERATOR)


class EosResult:
    """An exactly-once run: its throughput, and what a read_committed reader of its output saw."""

    def __init__(self, rate: float, transactions: int, elapsed: float, duplicates: int) -> None:
        self.rate, self.transactions, self.elapsed, self.duplicates = rate, transactions, elapsed, duplicates

    @property
    def transaction_ms(self) -> float:
        """The mean time from one transaction's commit to the next: how often outputs become visible."""
        return self.elapsed / max(self.transactions, 1) * 1000.0


def volley_run(cluster: Cluster, source: str, n: int = N, *, exactly_once: bool = False) -> float | EosResult:
    """(c) The engine with its default settings: the ``confluent`` profile, or ``confluent-eos``."""
    from bench_kafka_model import Enriched, Order, handle

    from volley import Engine
    from volley.plugins import get_registry

    if ("serializer", "orjson") not in get_registry():
        raise SystemExit("bench_kafka needs volley-serializers[orjson,pydantic] installed (profile confluent)")
    label = "volley-eos" if exactly_once else "volley"
    output = cluster.topic(f"{label}-out")
    group = f"{label}-{uuid.uuid4().hex[:6]}"
    app = Engine(
        app_name=f"bench-{label}",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"value": source, "profile": "confluent-eos" if exactly_once else "confluent", "data_model": Order,
                   "config": {"bootstrap.servers": cluster.brokers, "group.id": group}},
            "out": {"value": output, "profile": "confluent", "data_model": Enriched,
                    "config": {"bootstrap.servers": cluster.brokers}},
        },
        metrics_port=None,
    )
    first: list[float] = []

    @app.stream_app
    def handler(order: Order) -> list[tuple[str, Enriched]]:
        if not first:
            first.append(time.perf_counter())
        return [("out", handle(order))]

    report = handler.run_until_drained(timeout=600, max_messages=n)
    elapsed = time.perf_counter() - first[0]
    lag = cluster.lag(group, source)
    if lag:
        raise SystemExit(f"Volley ({label}) left {lag} input(s) uncommitted")
    if not exactly_once:
        if report.acked != n or cluster.count(output) != n:
            raise SystemExit(f"Volley run acked {report.acked}, wrote {cluster.count(output)} of {n}: {report}")
        return n / elapsed
    # Each committed transaction leaves one control record in every output partition it wrote to: with
    # outputs spread over every partition, (end offsets - outputs) / partitions is the transactions' count.
    distinct, duplicates = cluster.committed_outputs(output, n)
    if distinct != n:
        raise SystemExit(f"Volley ({label}) made {distinct} of {n} outputs visible to read_committed: {report}")
    transactions = (cluster.count(output) - distinct - duplicates) // PARTITIONS
    return EosResult(n / elapsed, transactions, elapsed, duplicates)


def pyvolley_run(cluster: Cluster, source: str, workdir: Path) -> float:
    """(c) py-volley 1.3.1 as a subprocess in its own venv, timed from its first output to its PYVOLLEY_N-th."""
    sys.path.insert(0, str(HERE))
    from _pyvolley import ensure_pyvolley_venv, venv_python

    python = venv_python(ensure_pyvolley_venv())
    output = cluster.topic("pyvolley-out")
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    for name in ("KAFKA_BROKERS", "KAFKA_CONSUMER_GROUP"):
        env.pop(name, None)
    process = subprocess.Popen([str(python), str(workdir / "bench_pyvolley_kafka_worker.py"), cluster.brokers,
                                source, output, f"pyvolley-{uuid.uuid4().hex[:6]}"], env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 900
        while (produced := cluster.count(output)) == 0:
            if process.poll() is not None:
                error = process.stderr.read().decode()[-3000:] if process.stderr else ""
                raise SystemExit(f"py-volley worker exited early:\n{error}")
            if time.monotonic() > deadline:
                raise SystemExit("py-volley never produced an output")
            time.sleep(0.002)
        started, base = time.perf_counter(), produced
        while (produced := cluster.count(output)) < PYVOLLEY_N:
            if process.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"py-volley stopped after {produced} outputs")
            time.sleep(0.01)
        elapsed = time.perf_counter() - started
    finally:
        process.kill()
        process.wait()
    return (produced - base) / elapsed


def latency(cluster: Cluster, workdir: Path) -> dict[str, float]:
    """End-to-end latency through Volley at a steady LATENCY_RATE msg/s, in milliseconds."""
    import orjson
    from bench_kafka_model import Enriched, Order, handle
    from confluent_kafka import Consumer, Producer, TopicPartition

    from volley import Engine

    source = cluster.topic("latency-in", {"message.timestamp.type": "LogAppendTime"})
    output = cluster.topic("latency-out", {"message.timestamp.type": "LogAppendTime"})
    warmup = int(LATENCY_RATE * LATENCY_WARMUP_SECONDS)  # the first records: order_id < warmup
    count = int(LATENCY_RATE * LATENCY_SECONDS)
    app = Engine(
        app_name="bench-latency",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"value": source, "profile": "confluent", "data_model": Order,
                   "config": {"bootstrap.servers": cluster.brokers, "group.id": f"latency-{uuid.uuid4().hex[:6]}"}},
            "out": {"value": output, "profile": "confluent", "data_model": Enriched,
                    "config": {"bootstrap.servers": cluster.brokers}},
        },
        metrics_port=None,
    )

    @app.stream_app
    def handler(order: Order, msg_ctx: Any) -> list[tuple[str, Enriched]]:
        enriched = handle(order)
        enriched.input_appended_at = msg_ctx.envelope.timestamp  # the broker's append time of the input
        return [("out", enriched)]

    first = Producer({"bootstrap.servers": cluster.brokers})
    first.produce(source, payload(-1, time.time()))  # goes through first: the group is joined when it is out
    first.flush(10)

    async def run() -> None:
        # and the generator's connection record and the group-join record
        task = asyncio.ensure_future(handler.run_async(max_messages=warmup + count + 2))
        deadline = time.monotonic() + 60
        while await asyncio.to_thread(cluster.count, output) == 0:
            if time.monotonic() > deadline or task.done():
                raise SystemExit("latency run: the warm-up record never came out")
        generator = await asyncio.create_subprocess_exec(
            sys.executable, str(workdir / "bench_kafka_generator.py"), cluster.brokers, source, str(LATENCY_RATE),
            str(warmup + count))  # exactly the records the app waits for
        if await generator.wait() != 0:
            raise SystemExit("latency run: the generator failed")
        await asyncio.wait_for(task, 120)

    asyncio.run(run())
    reader = Consumer({"bootstrap.servers": cluster.brokers, "group.id": f"latency-reader-{uuid.uuid4().hex[:6]}",
                       "enable.auto.commit": False})
    reader.assign([TopicPartition(output, p, 0) for p in range(PARTITIONS)])
    through: list[float] = []  # input appended -> output appended: Volley's part, broker to broker
    from_send: list[float] = []  # generator's send -> output appended: also the generator's own produce delay
    during_warmup: list[float] = []  # through, for the warm-up records
    deadline = time.monotonic() + 60
    while len(through) < count and time.monotonic() < deadline:
        for message in reader.consume(1000, 0.5):
            if message.error() is not None:
                continue
            record = orjson.loads(message.value())
            if record["order_id"] < 0:
                continue
            appended = message.timestamp()[1] / 1000.0
            if record["order_id"] < warmup:
                during_warmup.append((appended - record["input_appended_at"]) * 1000.0)
                continue
            through.append((appended - record["input_appended_at"]) * 1000.0)
            from_send.append((appended - record["sent_at"]) * 1000.0)
    reader.close()
    if len(through) < count:
        raise SystemExit(f"latency run: {len(through)} of {count} outputs found")
    through.sort()
    from_send.sort()
    everything = sorted(through + during_warmup)
    return {"p50": through[count // 2], "p99": through[int(count * 0.99)], "max": through[-1], "samples": count,
            "from_send_p50": from_send[count // 2], "from_send_p99": from_send[int(count * 0.99)],
            "with_warmup_p99": everything[int(len(everything) * 0.99)]}


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("volley").setLevel(logging.ERROR)  # "no dead_letter_queue configured" is expected here
    with tempfile.TemporaryDirectory(prefix="bench-kafka-") as tmp, kafka_address() as brokers:
        workdir = Path(tmp)
        write_programs(workdir)
        sys.path.insert(0, str(workdir))
        cluster = Cluster(brokers)
        source = cluster.topic("in")
        cluster.seed(source, N)
        simple: list[float] = []
        pipelined: list[float] = []
        runs: list[float] = []
        eos: list[EosResult] = []
        for _ in range(REPEATS):
            simple.append(_kafka_ceilings.simple(cluster, source, N))
            pipelined.append(_kafka_ceilings.pipelined(cluster, source, N))
            alo = volley_run(cluster, source)
            exactly = volley_run(cluster, source, exactly_once=True)
            assert isinstance(alo, float) and isinstance(exactly, EosResult)
            runs.append(alo)
            eos.append(exactly)
        old = pyvolley_run(cluster, source, workdir)
        best, top = max(runs), max(*simple, *pipelined)
        best_eos = max(eos, key=lambda result: result.rate)
        print(f"kafka.messages: {N}")
        print(f"kafka.partitions: {PARTITIONS}")
        print(f"kafka.runs: {REPEATS}")
        print(f"kafka.ceiling_msgs_per_s: {max(simple):.0f}")
        print(f"kafka.ceiling_msgs_per_s_median: {statistics.median(simple):.0f}")
        print(f"kafka.ceiling_pipelined_msgs_per_s: {max(pipelined):.0f}")
        print(f"kafka.ceiling_pipelined_msgs_per_s_median: {statistics.median(pipelined):.0f}")
        print(f"kafka.volley_msgs_per_s: {best:.0f}")
        print(f"kafka.volley_msgs_per_s_median: {statistics.median(runs):.0f}")
        print(f"kafka.pyvolley_messages: {PYVOLLEY_N}")
        print(f"kafka.pyvolley_msgs_per_s: {old:.0f}")
        print(f"kafka.efficiency: {best / top:.2f}")
        print(f"kafka.efficiency_vs_simple: {best / max(simple):.2f}")
        # The simple loop commits without waiting for delivery reports (not safe): against the one program with
        # Volley's safety alone, what Volley's own bookkeeping costs.
        print(f"kafka.efficiency_vs_pipelined: {best / max(pipelined):.2f}")
        print(f"kafka.vs_pyvolley: {best / old:.2f}")
        print(f"kafka.eos_msgs_per_s: {best_eos.rate:.0f}")
        print(f"kafka.eos_msgs_per_s_median: {statistics.median(result.rate for result in eos):.0f}")
        print(f"kafka.eos_over_alo: {best_eos.rate / best:.2f}")
        print(f"kafka.eos_transactions: {best_eos.transactions}")
        print(f"kafka.eos_transaction_ms: {best_eos.transaction_ms:.1f}")
        print(f"kafka.eos_duplicates: {sum(result.duplicates for result in eos)}", flush=True)
        result = latency(cluster, workdir)
        print(f"kafka.latency_rate_msgs_per_s: {LATENCY_RATE}")
        print(f"kafka.latency_samples: {result['samples']:.0f}")
        print(f"kafka.latency_p50_ms: {result['p50']:.1f}")
        print(f"kafka.latency_p99_ms: {result['p99']:.1f}")
        print(f"kafka.latency_max_ms: {result['max']:.1f}")
        print(f"kafka.latency_warmup_seconds: {LATENCY_WARMUP_SECONDS:.0f}")
        print(f"kafka.latency_p99_with_warmup_ms: {result['with_warmup_p99']:.1f}")
        print(f"kafka.latency_from_send_p50_ms: {result['from_send_p50']:.1f}")
        print(f"kafka.latency_from_send_p99_ms: {result['from_send_p99']:.1f}")
        cluster.close()  # before the broker stops


if __name__ == "__main__":
    main()
