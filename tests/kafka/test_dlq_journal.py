"""``volley dlq replay``'s journal on a real Kafka broker, found by a review (session 31): the journal, which on Kafka
was never compacted, remembered letter ids (partition:offset) for ever; each test failed on the code before its
fix."""

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

from volley.dlq import DeadLetterQueue, Journal, LetterFilter, ReplayOptions, inspect, replay
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


def test_a_complete_replay_on_kafka_keeps_only_what_it_still_needs_in_the_journal(topics: Topics,
                                                                                   tmp_path: Path) -> None:
    """journal.py's docstring: "a later complete run keeps only what it still needs"; the docs: keep the journal
    "until later replays have passed them". On Kafka (``removes_each`` False) ``_Replay.run`` never rewrites it:
    every intent and sent id of every replay stays for ever (and is loaded into memory by every inspect and
    replay), though the replay group's commit is past all of them."""
    topics.letters([f"h{n}" for n in range(20)])
    app = scenario_app(topics.config(), Fix())
    path = tmp_path / "journal.jsonl"
    assert asyncio.run(replay(DeadLetterQueue(app), Journal(path), ReplayOptions(batch_size=5))).moved == 20
    again = asyncio.run(replay(DeadLetterQueue(app), Journal(path), ReplayOptions()))
    assert again.moved == 0  # the commit is past every letter: nothing left to deal with
    journal = Journal(path)
    assert (len(journal.sent), len(journal.intended)) == (0, 0), (
        f"{len(journal.sent)} sent and {len(journal.intended)} intended ids kept though the commit passed them all")


def test_new_letters_of_a_recreated_dead_letter_topic_are_not_swallowed_by_an_old_journal(topics: Topics,
                                                                                          tmp_path: Path) -> None:
    """Kafka cannot delete single letters, so an operator empties a DLQ topic by deleting and re-creating it.
    Offsets start at 0 again; the journal still lists ``0:0`` ... as sent, so the next replay takes the new
    letters at those offsets for "already replayed": it commits past them without sending them anywhere.
    They are lost, and the summary calls them "already replayed earlier"."""
    topics.letters(["old0", "old1", "old2"])
    app = scenario_app(topics.config(), Fix())
    path = tmp_path / "journal.jsonl"
    assert asyncio.run(replay(DeadLetterQueue(app), Journal(path), ReplayOptions())).moved == 3
    recreate_dlq(topics)
    topics.letters(["new0", "new1"])
    app = scenario_app(topics.config(), Fix())
    seen = asyncio.run(inspect(DeadLetterQueue(app), LetterFilter(), Journal(path)))
    summary = asyncio.run(replay(DeadLetterQueue(app), Journal(path), ReplayOptions()))
    replayed = topics.keys_in("orders")
    assert sorted(k for k in replayed if k.startswith("new")) == ["new0", "new1"], (
        f"inspect: total {seen.total}, already replayed {seen.already_replayed}; replay: {summary.as_dict()}")


# ------------------------------------------------------------------ found by a second review of the fixes


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
