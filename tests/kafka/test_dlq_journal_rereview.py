"""The replay journal on a re-created Kafka dead-letter topic, found by a second review of session 31's fixes; the
test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient, NewTopic

from volley.dlq import DeadLetterQueue, Journal, ReplayOptions, replay
from volley.testing.deadletters import DLQ, INPUT, OUTPUT, Fix, scenario_app

pytestmark = pytest.mark.kafka

ORDER = "volley.testing.deadletters.Order"


class Topics:
    def __init__(self, bootstrap: str) -> None:
        self.bootstrap = bootstrap
        self.prefix = f"dlqj-{uuid.uuid4().hex[:10]}"
        self.admin = AdminClient({"bootstrap.servers": bootstrap})

    def name(self, what: str) -> str:
        return f"{self.prefix}-{what}"

    def create(self, *names: str) -> None:
        for future in self.admin.create_topics([NewTopic(self.name(n), num_partitions=1, replication_factor=1)
                                                for n in names]).values():
            future.result(30)

    def delete(self, *names: str) -> None:
        for future in self.admin.delete_topics([self.name(n) for n in names]).values():
            future.result(30)

    def config(self) -> dict[str, Any]:
        model = {"serializer": "json", "model_handler": "dataclass", "data_model": ORDER}
        where = {"bootstrap.servers": self.bootstrap}
        return {INPUT: {"value": self.name("orders"), "connector": "confluent", **model,
                        "config": {**where, "group.id": self.name("app"), "auto.offset.reset": "earliest"}},
                OUTPUT: {"value": self.name("shipped"), "connector": "confluent", **model, "config": where},
                DLQ: {"value": self.name("dlq"), "profile": "confluent-dlq", "config": where}}

    def letters(self, keys: list[str]) -> None:
        """Dead letters as the engine writes them, straight into the DLQ topic."""
        producer = Producer({"bootstrap.servers": self.bootstrap})
        for key in keys:
            producer.produce(self.name("dlq"), json.dumps({"order_id": 1, "key": key}).encode(), key.encode(),
                             headers=[("volley-error-stage", b"handler"), ("volley-error-type", b"ValueError"),
                                      ("volley-error-reason", b"boom"),
                                      ("volley-source-queue", self.name("orders").encode())])
        assert producer.flush(30) == 0

    def keys_in(self, what: str) -> list[str]:
        consumer = Consumer({"bootstrap.servers": self.bootstrap, "group.id": f"reader-{uuid.uuid4().hex}",
                             "auto.offset.reset": "earliest", "enable.partition.eof": True})
        consumer.subscribe([self.name(what)])
        keys: list[str] = []
        try:
            while True:
                message = consumer.poll(30)
                assert message is not None, "no end of partition within 30 s"
                if message.error() is not None:
                    break  # end of the one partition
                keys.append((message.key() or b"").decode())
        finally:
            consumer.close()
        return keys


@pytest.fixture
def topics(kafka_bootstrap: str) -> Topics:
    topics = Topics(kafka_bootstrap)
    topics.create("orders", "shipped", "dlq")
    return topics


def recreate_dlq(topics: Topics) -> None:
    topics.delete("dlq")
    for attempt in range(100):  # topic deletion is asynchronous on the broker
        try:
            topics.create("dlq")
            return
        except Exception:
            if attempt == 99:
                raise
            time.sleep(0.1)  # polling the broker's asynchronous deletion, not synchronisation between threads


def test_a_replayed_letter_that_fails_again_into_a_recreated_topic_is_not_swallowed(topics: Topics,
                                                                                  tmp_path: Path) -> None:
    """journal.py names a sent letter by partition:offset and a digest of key and value only. On Kafka the
    journal keeps a settled letter's entry until a later complete run no longer sees it, so right after a
    replay it still holds ``0:0 -> digest(k, v)``. The operator re-creates the DLQ topic (the case a49bb0f
    targets); the replayed message fails again and its new dead letter - the same key and value - lands at
    offset 0. The next replay takes it for "already replayed", commits past it and sends it nowhere: lost."""
    topics.letters(["same"])
    app = scenario_app(topics.config(), Fix())
    path = tmp_path / "journal.jsonl"
    assert asyncio.run(replay(DeadLetterQueue(app), Journal(path), ReplayOptions())).moved == 1
    recreate_dlq(topics)
    topics.letters(["same"])  # the replayed message failed again: the same key and value, at offset 0
    app = scenario_app(topics.config(), Fix())
    summary = asyncio.run(replay(DeadLetterQueue(app), Journal(path), ReplayOptions()))
    assert topics.keys_in("orders") == ["same", "same"], summary.as_dict()
