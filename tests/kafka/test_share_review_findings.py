"""The share-group consumer (KIP-932) and its dead-letter path, found by a review (session 31): each test failed
on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from typing import Any

import pytest
from confluent_kafka import Producer

from volley import Engine
from volley.errors import DeliveryError
from volley.ports import QueueSpec
from volley_kafka.connector import KafkaConnector
from volley_kafka.share_admin import configure_share_group
from volley_kafka.share_connector import ShareConnector
from volley_kafka.share_consumer import ShareKafkaConsumer

pytestmark = pytest.mark.kafka

JSON_DICT = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}


def share_group(kit: Any, **group_config: Any) -> str:
    group = kit.unique("share-review")
    configure_share_group({"bootstrap.servers": kit.bootstrap}, group, auto_offset_reset="earliest", **group_config)
    return group


def produce(kit: Any, topic: str, values: list[bytes], batch: int = 20) -> None:
    producer = Producer({"bootstrap.servers": kit.bootstrap, "linger.ms": 5, "batch.num.messages": batch})
    for value in values:
        producer.produce(topic, value)
        producer.poll(0)
    assert producer.flush(30) == 0


async def group_is_empty(kit: Any, group: str, source: str, sink: str) -> list[Any]:
    """What a fresh member of the group still gets (it waits 3 s idle before it stops)."""
    engine = Engine(app_name=kit.unique("check"), input_queue="input", output_queues=[], metrics_port=None,
                    queue_config={"input": {"value": source, "profile": "confluent-share", **JSON_DICT,
                                            "config": {"bootstrap.servers": kit.bootstrap, "group.id": group,
                                                       "volley.share.delivery.limit": 2}}},
                    poll_interval_seconds=0.2)
    seen: list[Any] = []

    @engine.stream_app
    def check(message: dict[str, Any]) -> bool:
        seen.append(message)
        return True

    await asyncio.wait_for(check.run_async(stop_when_drained=True, drain_idle_seconds=3.0), 60)
    return seen


async def test_a_dead_letter_that_cannot_be_written_on_the_last_delivery_is_not_lost_silently(
        kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    """A failing record whose dead letter the DLQ refuses (larger than the DLQ producer's message.max.bytes) was
    given back (RELEASE) on every delivery. On its last delivery (the group's share.delivery.count.limit) the broker
    archives a released record: it is gone from the group, and it never reached the DLQ. Volley said "will be
    delivered again". Expected: either the record is still there to be delivered, or the run says it is lost.
    Since a dead letter refused for itself stops the app (whatever on_failure says: it would be refused however
    often it came back), the record is given back on its first delivery and stays in the group."""
    source, sink, dlq = kit.topic("share-bigdl-in"), kit.topic("share-bigdl-out"), kit.topic("share-bigdl-dlq")
    group = share_group(kit, delivery_count_limit=2)
    big = json.dumps({"id": 1, "pad": "x" * 1500}).encode()  # fits the input topic, not the DLQ's limit of 1000
    produce(kit, source, [big])
    queue_config = {
        "input": {"value": source, "profile": "confluent-share", **JSON_DICT,
                  "config": {"bootstrap.servers": kit.bootstrap, "group.id": group,
                             "volley.share.delivery.limit": 2, "volley.share.consumers": 1}},
        "out": {"value": sink, "profile": "confluent", **JSON_DICT, "config": {"bootstrap.servers": kit.bootstrap}},
        "dlq": {"value": dlq, "profile": "confluent-share-dlq",
                "config": {"bootstrap.servers": kit.bootstrap, "message.max.bytes": 1000}},
    }
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                    metrics_port=None, queue_config=queue_config, on_failure="continue", max_retries=0,
                    poll_interval_seconds=0.2)
    attempts: list[int] = []

    @engine.stream_app
    def handler(message: dict[str, Any], msg_ctx: Any) -> Any:
        attempts.append(msg_ctx.attempt)
        raise RuntimeError("boom")

    caplog.set_level(logging.INFO)
    with pytest.raises(DeliveryError, match=r"dead letter .* could not be written .*Message size too large"):
        await asyncio.wait_for(handler.run_async(max_messages=2), 60)
    assert attempts == [1], attempts  # stopped on its first delivery: the second would be its last
    assert kit.read_topic(dlq) == []
    left = await group_is_empty(kit, group, source, sink)
    lost_reported = [r for r in caplog.records if r.levelno >= logging.ERROR and "archiv" in r.getMessage()]
    assert left or lost_reported, (
        "the record was archived by the broker (given back on its last delivery) and never reached the DLQ, but "
        f"nothing said it was lost; the log said: "
        f"{[r.getMessage()[:160] for r in caplog.records if r.levelno >= logging.ERROR]}")


@pytest.mark.xfail(strict=True, reason="open: a record given up past its lock must not reach a handler (and a member "
                   "must not acquire it again while its stale copy is queued in the engine); see session 31's note")
async def test_records_held_past_their_lock_are_not_dead_lettered_without_ever_being_handled(kit: Any) -> None:
    """A worker acquires more than it handles within the group's lock (one member, 20-record polls, 1 s lock,
    10 records/s): each lock period the member gives its batch up and acquires it again, and each acquisition
    counts a delivery, also for the records still queued, never handed to a handler. The docs promise duplicates
    at worst ("Nothing is lost, but that is a duplicate"). Observed: healthy records (the handler never fails)
    reach max_deliveries and go to the DLQ as "delivered 5 times" although no handler ever saw them (without a DLQ
    they are released on their last delivery: archived by the broker, lost)."""
    source, sink, dlq = kit.topic("share-held-in"), kit.topic("share-held-out"), kit.topic("share-held-dlq")
    group = share_group(kit, record_lock_ms=1000)
    count = 60
    produce(kit, source, [json.dumps({"id": i}).encode() for i in range(count)])
    queue_config = {
        "input": {"value": source, "profile": "confluent-share", **JSON_DICT,
                  "config": {"bootstrap.servers": kit.bootstrap, "group.id": group,
                             "volley.share.consumers": 1, "max.poll.records": 20}},
        "out": {"value": sink, "profile": "confluent", **JSON_DICT, "config": {"bootstrap.servers": kit.bootstrap}},
        "dlq": {"value": dlq, "profile": "confluent-share-dlq", "config": {"bootstrap.servers": kit.bootstrap}},
    }
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                    metrics_port=None, queue_config=queue_config, max_in_flight=2, poll_interval_seconds=0.2)
    handled: Counter[int] = Counter()

    @engine.stream_app
    async def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        await asyncio.sleep(0.2)
        handled[message["id"]] += 1
        return [("out", message)]

    run = asyncio.ensure_future(handler.run_async())
    try:
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline and not run.done():
            dead = {json.loads(m.value())["id"] for m in kit.read_topic(dlq)}
            if set(handled) | dead >= set(range(count)):
                break
            await asyncio.sleep(0.5)
    finally:
        handler.stop()
        report = await asyncio.wait_for(run, 60)
    letters = kit.read_topic(dlq)
    dead_ids = sorted(json.loads(m.value())["id"] for m in letters)
    never_handled = [i for i in dead_ids if i not in handled]
    assert not letters, (
        f"{len(letters)} healthy record(s) dead-lettered ({report.dead_lettered} in the report; "
        f"{len(never_handled)} of them never reached the handler: {never_handled[:10]}); stage "
        f"{dict(letters[0].headers()).get('volley-error-stage')!r}, reason "
        f"{dict(letters[0].headers()).get('volley-error-reason')!r}")



async def test_a_record_acquired_late_in_a_long_poll_is_not_reported_as_a_late_ack(kit: Any) -> None:
    """A record's lock begins when the poll slice that acquired it began, not when the whole poll began: a poll
    that waited empty (here 2 s of a 10 s consume, with a 1 s lock) and then got records counted their quick acks
    as settled past the lock ("possible duplicates") that were none."""
    source = kit.topic("share-poll-late-in")
    group = share_group(kit, record_lock_ms=1000)
    consumer = ShareConnector(KafkaConnector()).create_consumer(QueueSpec(
        name="input", value=source, connector="confluent-share", app_name="late",
        config={"bootstrap.servers": kit.bootstrap, "group.id": group, "volley.share.consumers": 1}))
    await consumer.start()
    try:
        assert isinstance(consumer, ShareKafkaConsumer)
        consuming = asyncio.ensure_future(consumer.consume(10, 10.0))
        deadline = time.monotonic() + 10
        while consumer._members[0].poll is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        await asyncio.sleep(2.0)  # the scenario itself: the poll has waited empty past the 1 s lock
        produce(kit, source, [json.dumps({"id": n}).encode() for n in range(5)])
        got = list(await consuming)
        while len(got) < 5 and time.monotonic() < deadline + 10:
            got += await consumer.consume(10, 1.0)
        assert len(got) == 5
        await consumer.ack(got)
        assert consumer.late_acks == 0
    finally:
        await consumer.close()
