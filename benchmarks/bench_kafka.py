"""Kafka -> Kafka benchmark on a real Apache Kafka broker: a hand-written confluent-kafka loop, Volley, py-volley.

200,000 JSON orders of about 200 bytes in a 4-partition topic; each run reads them all with a consumer group of
its own and writes one output per input to a topic of its own, doing the same work per message: orjson decode,
Pydantic v2 validation of ``Order``, the handler (builds an ``Enriched``), JSON-mode dump, orjson encode, produce.

(a) the ceiling: a hand-written confluent-kafka loop with batched consume (500), produce, ``poll(0)`` and an
    asynchronous commit per batch (it does not wait for delivery before committing: faster, and not safe);
(b) Volley, the ``confluent`` profile with its default settings (idempotent producer, commits only what was
    delivered);
(c) py-volley 1.3.1 with its ``confluent`` profile, in its own virtualenv (``benchmarks/_pyvolley.py``), as a
    subprocess, over the first 30,000 messages (it is two orders of magnitude slower), timed from its first
    output to its 30,000th.

(a) and (b) are timed from the first message consumed to the last output delivered and its input committed;
they run three times each, alternating, and the best of each is compared (the median is printed too).
Then end-to-end latency at a steady 2,000 msg/s through Volley, from the broker's append time of each input to
that of its output (``LogAppendTime`` on both topics): ``kafka.latency_p50_ms`` / ``kafka.latency_p99_ms`` over
10 s, after 3 s at the same rate that are not counted (``kafka.latency_p99_with_warmup_ms`` counts them). The
generator runs in a process of its own with librdkafka's default batching (linger.ms=5) and an idempotent
producer; ``kafka.latency_from_send_*`` also count its own produce delay (from the send timestamp in the
payload: up to the 5 ms linger, so these figures are not comparable with runs before that setting).

Broker: ``KAFKA_BROKERS`` when set, otherwise a private one from ``tools/services/kafka.py``. Prints
``name: value`` lines, among them ``kafka.volley_msgs_per_s``, ``kafka.ceiling_msgs_per_s``,
``kafka.pyvolley_msgs_per_s``, ``kafka.efficiency`` (b / a, target >= 0.70), ``kafka.vs_pyvolley`` (b / c,
target >= 10), ``kafka.latency_p50_ms`` and ``kafka.latency_p99_ms`` (target p99 <= 50 ms).
"""

from __future__ import annotations

import asyncio
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
from typing import Any

N = 200_000
PYVOLLEY_N = 30_000
PARTITIONS = 4
BATCH = 500
REPEATS = 3  # (a) and (b) alternate; the best of each is compared, which discounts interference from
# whatever else the machine runs meanwhile
LATENCY_RATE = 2_000  # msg/s
LATENCY_SECONDS = 10.0  # measured, after
LATENCY_WARMUP_SECONDS = 3.0  # at the same rate, not counted: the broker's JIT compiles its produce and fetch
# paths for the new load in these first seconds, and on two cores that stalls everything running beside it
HERE = Path(__file__).resolve().parent

# The data model, as a module of its own so that py-volley (another venv) imports the very same classes.
MODEL_SOURCE = textwrap.dedent('''
    from datetime import datetime

    from pydantic import BaseModel


    class Order(BaseModel):
        order_id: int
        customer: str
        amount: float
        currency: str
        created_at: datetime
        tags: list[str]
        note: str | None = None
        sent_at: float | None = None


    class Enriched(BaseModel):
        order_id: int
        customer: str
        amount_cents: int
        currency: str
        created_at: datetime
        tags: list[str]
        priority: bool
        sent_at: float | None = None
        input_appended_at: float | None = None


    def handle(order: Order) -> Enriched:
        return Enriched(order_id=order.order_id, customer=order.customer, amount_cents=round(order.amount * 100),
                        currency=order.currency, created_at=order.created_at, tags=order.tags,
                        priority=order.amount > 1000, sent_at=order.sent_at)
''')

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


@contextlib.contextmanager
def kafka_address() -> Iterator[str]:
    external = os.environ.get("KAFKA_BROKERS", "").strip()
    if external:
        yield external
        return
    sys.path.insert(0, str(HERE.parent / "tools"))
    from services.kafka import KafkaBroker

    with KafkaBroker() as broker:
        yield broker.bootstrap_servers


def write_model(directory: Path) -> None:
    (directory / "bench_kafka_model.py").write_text(MODEL_SOURCE)
    (directory / "bench_pyvolley_kafka_worker.py").write_text(PYVOLLEY_WORKER)
    (directory / "bench_kafka_generator.py").write_text(GENERATOR)


def payload(i: int, sent_at: float | None = None) -> bytes:
    import orjson

    order: dict[str, Any] = {
        "order_id": i, "customer": f"customer-{i % 997:04d}", "amount": (i % 10_000) / 7, "currency": "EUR",
        "created_at": "2026-11-28T08:00:00+00:00", "tags": ["web", "eu", f"t{i % 13}"],
        "note": "deliver to the back door, please" if i % 3 else None,
    }
    if sent_at is not None:
        order["sent_at"] = sent_at
    return bytes(orjson.dumps(order))


class Cluster:
    """Topics, seeding and counting with plain confluent-kafka clients."""

    def __init__(self, brokers: str) -> None:
        from confluent_kafka.admin import AdminClient

        self.brokers = brokers
        self.admin = AdminClient({"bootstrap.servers": brokers})
        self._counter: Any = None

    def topic(self, label: str, config: dict[str, str] | None = None) -> str:
        from confluent_kafka.admin import NewTopic

        name = f"bench-{label}-{uuid.uuid4().hex[:8]}"
        futures = self.admin.create_topics([NewTopic(name, num_partitions=PARTITIONS, replication_factor=1,
                                                     config=config or {})])
        for future in futures.values():
            future.result(30)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            topics = self.admin.list_topics(timeout=10).topics
            if name in topics and len(topics[name].partitions) == PARTITIONS:
                break
            time.sleep(0.05)
        return name

    def seed(self, topic: str, count: int) -> None:
        from confluent_kafka import Producer

        producer = Producer({"bootstrap.servers": self.brokers, "linger.ms": 20, "batch.size": 1_000_000,
                             "enable.idempotence": True})
        for i in range(count):
            while True:
                try:
                    producer.produce(topic, payload(i), str(i).encode())
                    break
                except BufferError:
                    producer.poll(0.05)
        if producer.flush(120):
            raise SystemExit(f"seeding {topic} did not finish")

    def count(self, topic: str) -> int:
        """Records in the topic (the sum of its partitions' end offsets), asking again on transient errors."""
        from confluent_kafka import Consumer, KafkaException, TopicPartition

        if self._counter is None:
            self._counter = Consumer({"bootstrap.servers": self.brokers, "group.id": "bench-counter"})
        for attempt in range(50):
            try:
                return sum(self._counter.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                           for p in range(PARTITIONS))
            except KafkaException:  # a new topic's leader not known yet, and the like
                if attempt == 49:
                    raise
                time.sleep(0.1)
        raise AssertionError("unreachable")

    def lag(self, group: str, topic: str) -> int:
        from confluent_kafka import Consumer, TopicPartition

        consumer = Consumer({"bootstrap.servers": self.brokers, "group.id": group})
        try:
            committed = consumer.committed([TopicPartition(topic, p) for p in range(PARTITIONS)], timeout=10)
            ends = [consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)[1]
                    for p in range(PARTITIONS)]
            return sum(end - max(tp.offset, 0) for tp, end in zip(committed, ends, strict=True))
        finally:
            consumer.close()


def ceiling(cluster: Cluster, source: str) -> float:
    """(a) A hand-written loop: batched consume, process, produce, poll(0), async commit per batch."""
    import orjson
    from bench_kafka_model import Order, handle
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

    output = cluster.topic("ceiling-out")
    consumer = Consumer({"bootstrap.servers": cluster.brokers, "group.id": f"ceiling-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False})
    producer = Producer({"bootstrap.servers": cluster.brokers, "enable.idempotence": True})
    consumer.subscribe([source])
    validate, loads, dumps = Order.model_validate, orjson.loads, orjson.dumps
    produce, poll = producer.produce, producer.poll
    done = 0
    started = 0.0
    while done < N:
        messages = consumer.consume(BATCH, 1.0)
        if not messages:
            continue
        if not started:
            started = time.perf_counter()
        positions: dict[int, int] = {}
        for message in messages:
            if message.error() is not None:
                continue
            body = dumps(handle(validate(loads(message.value()))).model_dump(mode="json"))
            while True:
                try:
                    produce(output, body, message.key())
                    break
                except BufferError:
                    poll(0.05)
            positions[message.partition()] = message.offset() + 1
            done += 1
        poll(0)
        consumer.commit(offsets=[TopicPartition(source, p, o) for p, o in positions.items()], asynchronous=True)
    producer.flush(60)
    try:  # what the async commits may not have sent yet; "nothing stored" means they all went out already
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            raise
    elapsed = time.perf_counter() - started
    consumer.close()
    if cluster.count(output) != N:
        raise SystemExit(f"ceiling loop wrote {cluster.count(output)} of {N}")
    return N / elapsed


def volley_run(cluster: Cluster, source: str) -> float:
    """(b) The engine with the confluent profile and its default settings."""
    from bench_kafka_model import Enriched, Order, handle

    from volley import Engine
    from volley.plugins import get_registry

    if ("serializer", "orjson") not in get_registry():
        raise SystemExit("bench_kafka needs volley-serializers[orjson,pydantic] installed (profile confluent)")
    output = cluster.topic("volley-out")
    group = f"volley-{uuid.uuid4().hex[:6]}"
    app = Engine(
        app_name="bench-volley",
        input_queue="in",
        output_queues=["out"],
        queue_config={
            "in": {"value": source, "profile": "confluent", "data_model": Order,
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

    report = handler.run_until_drained(timeout=600, max_messages=N)
    elapsed = time.perf_counter() - first[0]
    if report.acked != N or cluster.count(output) != N:
        raise SystemExit(f"Volley run acked {report.acked}, wrote {cluster.count(output)} of {N}: {report}")
    lag = cluster.lag(group, source)
    if lag:
        raise SystemExit(f"Volley left {lag} input(s) uncommitted")
    return N / elapsed


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
        write_model(workdir)
        sys.path.insert(0, str(workdir))
        cluster = Cluster(brokers)
        source = cluster.topic("in")
        cluster.seed(source, N)
        tops: list[float] = []
        runs: list[float] = []
        for _ in range(REPEATS):
            tops.append(ceiling(cluster, source))
            runs.append(volley_run(cluster, source))
        old = pyvolley_run(cluster, source, workdir)
        best, top = max(runs), max(tops)
        print(f"kafka.messages: {N}")
        print(f"kafka.partitions: {PARTITIONS}")
        print(f"kafka.runs: {REPEATS}")
        print(f"kafka.ceiling_msgs_per_s: {top:.0f}")
        print(f"kafka.ceiling_msgs_per_s_median: {statistics.median(tops):.0f}")
        print(f"kafka.volley_msgs_per_s: {best:.0f}")
        print(f"kafka.volley_msgs_per_s_median: {statistics.median(runs):.0f}")
        print(f"kafka.pyvolley_messages: {PYVOLLEY_N}")
        print(f"kafka.pyvolley_msgs_per_s: {old:.0f}")
        print(f"kafka.efficiency: {best / top:.2f}")
        print(f"kafka.vs_pyvolley: {best / old:.2f}", flush=True)
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


if __name__ == "__main__":
    main()
