"""Two hand-written confluent-kafka programs doing the Kafka benchmark's work: the ceilings Volley is held to.

(a) ``simple``: batched consume (500), process, produce, ``poll(0)`` and an asynchronous commit per batch. It
    commits without waiting for delivery (faster, and not safe) and never overlaps fetching with processing.
(b) ``pipelined``: the best program we can write with Volley's safety. A fetch thread feeds the processing
    thread batches through a bounded queue (so fetching overlaps processing, and memory stays bounded); the
    processing thread produces each batch (one delivery callback per message, counting down its batch), and
    serves delivery reports with ``poll(0)`` between batches; a batch whose every output was delivered has its
    offsets stored, in consumption order (never past a batch still in flight), and the stored offsets are
    committed asynchronously. At-least-once, like Volley: an input is committed only after its output was
    acknowledged by the broker.

Both do the work with ``_orders.work`` (Pydantic's own JSON parser and encoder, as Volley does) and set
``fetch.queue.backoff.ms`` as Volley's consumer does (``FETCH``). Both are timed from the first message consumed
to the last output delivered and its input committed.
"""

from __future__ import annotations

import collections
import queue
import threading
import time
import uuid
from typing import Any

from _kafka import BATCH, Cluster

PIPELINE_DEPTH = 4  # batches fetched ahead of processing: about Volley's default max_buffered (2,000) messages
COMMIT_EVERY_S = 0.1  # at most one asynchronous commit of the stored offsets per this many seconds
# What a program tuned for throughput sets, and Volley's consumer default: librdkafka's 1,000 ms backoff of a
# partition's next fetch, once its prefetch queue is full, stalled these loops about 0.6 s per run (a third of
# their throughput) once the loop had emptied the queue before the backoff was over.
FETCH = {"fetch.queue.backoff.ms": 50}

def simple(cluster: Cluster, source: str, n: int) -> float:
    """(a) A hand-written loop: batched consume, process, produce, poll(0), async commit per batch."""
    from bench_kafka_model import work
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

    output = cluster.topic("ceiling-out")
    consumer = Consumer({"bootstrap.servers": cluster.brokers, "group.id": f"ceiling-{uuid.uuid4().hex[:6]}",
                         "auto.offset.reset": "earliest", "enable.auto.commit": False, **FETCH})
    producer = Producer({"bootstrap.servers": cluster.brokers, "enable.idempotence": True})
    consumer.subscribe([source])
    produce, poll = producer.produce, producer.poll
    done = 0
    started = 0.0
    while done < n:
        messages = consumer.consume(BATCH, 1.0)
        if not messages:
            continue
        if not started:
            started = time.perf_counter()
        positions: dict[int, int] = {}
        for message in messages:
            if message.error() is not None:
                continue
            body = work(message.value())
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
    if cluster.count(output) != n:
        raise SystemExit(f"ceiling loop wrote {cluster.count(output)} of {n}")
    return n / elapsed




class _Batch:
    """One consumed batch on its way out: outputs not yet delivered, and the offsets to store once none is."""

    __slots__ = ("error", "offsets", "pending")

    def __init__(self, pending: int) -> None:
        self.pending = pending
        self.offsets: list[Any] = []
        self.error: Any = None

    def delivered(self, error: Any, _message: Any) -> None:
        self.pending -= 1
        if error is not None:
            self.error = error


def pipelined(cluster: Cluster, source: str, n: int) -> float:
    """(b) A fetch thread, a bounded queue, batched produce, offsets stored after delivery, async commits."""
    from bench_kafka_model import work
    from confluent_kafka import Consumer, KafkaError, KafkaException, Producer, TopicPartition

    output = cluster.topic("pipelined-out")
    group = f"pipelined-{uuid.uuid4().hex[:6]}"
    consumer = Consumer({"bootstrap.servers": cluster.brokers, "group.id": group, "auto.offset.reset": "earliest",
                         "enable.auto.commit": False, "enable.auto.offset.store": False, **FETCH})
    producer = Producer({"bootstrap.servers": cluster.brokers, "enable.idempotence": True})
    consumer.subscribe([source])
    batches: queue.Queue[list[Any] | None] = queue.Queue(PIPELINE_DEPTH)
    started: list[float] = []
    failures: list[BaseException] = []

    def fetch() -> None:
        fetched = 0
        try:
            while fetched < n:
                messages = consumer.consume(BATCH, 0.5)
                if not messages:
                    continue
                if not started:
                    started.append(time.perf_counter())
                good = [message for message in messages if message.error() is None]
                fetched += len(good)
                batches.put(good)
        except BaseException as exc:  # handed to the processing thread, which raises it
            failures.append(exc)
        finally:
            batches.put(None)

    fetcher = threading.Thread(target=fetch, name="fetch", daemon=True)
    fetcher.start()
    produce, poll = producer.produce, producer.poll
    in_flight: collections.deque[_Batch] = collections.deque()

    def store_delivered() -> bool:
        """Store the offsets of the leading batches whose every output was delivered; True if any was."""
        stored = False
        while in_flight and in_flight[0].pending == 0:
            batch = in_flight.popleft()
            if batch.error is not None:
                raise SystemExit(f"pipelined loop: an output was not delivered: {batch.error}")
            consumer.store_offsets(offsets=batch.offsets)
            stored = True
        return stored

    last_commit = 0.0
    uncommitted = False
    while (messages := batches.get()) is not None:
        batch = _Batch(len(messages))  # counted before the first produce: a poll below may report deliveries
        delivered = batch.delivered
        positions: dict[int, int] = {}
        for message in messages:
            body = work(message.value())
            while True:
                try:
                    produce(output, body, message.key(), on_delivery=delivered)
                    break
                except BufferError:
                    poll(0.05)
            positions[message.partition()] = message.offset() + 1
        batch.offsets = [TopicPartition(source, p, o) for p, o in positions.items()]
        in_flight.append(batch)
        poll(0)
        uncommitted = store_delivered() or uncommitted
        now = time.perf_counter()
        if uncommitted and now - last_commit >= COMMIT_EVERY_S:
            consumer.commit(asynchronous=True)  # the stored offsets
            last_commit, uncommitted = now, False
    fetcher.join()
    if failures:
        raise failures[0]
    if producer.flush(60):
        raise SystemExit("pipelined loop: outputs still undelivered after 60 s")
    store_delivered()
    if in_flight:
        raise SystemExit(f"pipelined loop: {len(in_flight)} batch(es) without delivery reports")
    try:  # "nothing stored" means the async commits already carried every stored offset
        consumer.commit(asynchronous=False)
    except KafkaException as exc:
        if exc.args[0].code() != KafkaError._NO_OFFSET:
            raise
    elapsed = time.perf_counter() - started[0]
    consumer.close()
    if cluster.count(output) != n:
        raise SystemExit(f"pipelined loop wrote {cluster.count(output)} of {n}")
    lag = cluster.lag(group, source)
    if lag:
        raise SystemExit(f"pipelined loop left {lag} input(s) uncommitted")
    return n / elapsed
