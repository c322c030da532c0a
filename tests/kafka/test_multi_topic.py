"""One input queue over several topics (``"a,b"``), on a real broker."""

from __future__ import annotations

import json
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition

from volley import Engine

pytestmark = pytest.mark.kafka

PARTITIONS = 3
PER_TOPIC = 200
CODEC = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}


def committed(bootstrap: str, group: str, topics: Sequence[str]) -> dict[tuple[str, int], int]:
    """The group's committed offsets of every partition of the topics, as the broker has them."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group, "enable.auto.commit": False})
    try:
        wanted = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
        return {(tp.topic, tp.partition): tp.offset for tp in consumer.committed(wanted, timeout=10)}
    finally:
        consumer.close()


def test_one_input_queue_consumes_two_topics(kit: Any) -> None:
    """Both topics are consumed to their end, each message once; the handler and the DLQ see each message's own
    topic (not the first of the list, nor the list); both topics' offsets are committed to their end."""
    topic_a = kit.topic("multi-a", PARTITIONS)
    topic_b = kit.topic("multi-b", PARTITIONS)
    sink = kit.topic("multi-out", PARTITIONS)
    dlq = kit.topic("multi-dlq")
    group = kit.unique("g")
    bad = {topic_a: 57, topic_b: 123}  # one undecodable record per topic, at these ids
    for base, topic in ((0, topic_a), (10_000, topic_b)):
        values = [json.dumps({"id": base + i, "topic": topic}).encode() for i in range(PER_TOPIC)]
        values[bad[topic]] = b"{not json"
        kit.produce(topic, values, keys=[str(i).encode() for i in range(PER_TOPIC)])
    expected = {base + i: topic for base, topic in ((0, topic_a), (10_000, topic_b))
                for i in range(PER_TOPIC) if i != bad[topic]}

    engine = Engine(
        app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
        queue_config={
            "input": {"value": f"{topic_a},{topic_b}", "profile": "confluent", **CODEC,
                      "config": {"bootstrap.servers": kit.bootstrap, "group.id": group,
                                 "volley.commit.interval.seconds": 0.1,
                                 # small fetches, so that batches mix the two topics' partitions
                                 "max.partition.fetch.bytes": 2048}},
            "out": {"value": sink, "profile": "confluent", **CODEC, "config": {"bootstrap.servers": kit.bootstrap}},
            "dlq": {"value": dlq, "profile": "confluent-dlq", "config": {"bootstrap.servers": kit.bootstrap}},
        },
        metrics_port=None, poll_interval_seconds=0.2, consume_batch_size=50,
    )
    seen: list[tuple[int, str, str]] = []  # (id, envelope.source, raw record's topic), in the handler
    lock = threading.Lock()

    @engine.stream_app
    def handler(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        with lock:
            seen.append((message["id"], msg_ctx.envelope.source, msg_ctx.raw.topic()))
        return [("out", {"id": message["id"], "source": msg_ctx.envelope.source, "p": msg_ctx.partition,
                         "o": msg_ctx.position})]

    report = handler.run_until_drained(timeout=60, drain_idle_seconds=0.2)
    assert report.acked == len(expected) and report.dead_lettered == 2 and report.failed == 0, report

    assert sorted(i for i, _, _ in seen) == sorted(expected), "the handler saw every good input once"
    wrong = [(i, source, raw) for i, source, raw in seen if not source == raw == expected[i]]
    assert not wrong, f"msg_ctx reported the wrong topic (id, envelope.source, raw topic): {wrong[:5]}"
    assert {source for _, source, _ in seen} == {topic_a, topic_b}

    outputs = [json.loads(m.value()) for m in kit.read_topic(sink)]
    ids = Counter(o["id"] for o in outputs)
    assert set(ids) == set(expected), f"missing {sorted(set(expected) - set(ids))[:10]}"
    assert all(n == 1 for n in ids.values()), f"produced twice: {[i for i, n in ids.items() if n > 1][:10]}"
    assert all(o["source"] == expected[o["id"]] for o in outputs)
    # Offsets are tracked per (topic, partition): the same partition numbers of the two topics stay apart.
    positions = {(o["source"], o["p"], o["o"]) for o in outputs}
    assert len(positions) == len(outputs), "two inputs reported the same topic, partition and offset"

    dead = {dict(m.headers())["volley-source-queue"].decode(): m for m in kit.read_topic(dlq)}
    assert set(dead) == {topic_a, topic_b}, "each dead letter names its own topic"
    assert all(m.value() == b"{not json" for m in dead.values())

    ends = {(t, p): offset for t in (topic_a, topic_b) for p, offset in kit.end_offsets(t, PARTITIONS).items()}
    assert sum(ends.values()) == 2 * PER_TOPIC
    assert committed(kit.bootstrap, group, [topic_a, topic_b]) == ends, "both topics are committed to their end"

