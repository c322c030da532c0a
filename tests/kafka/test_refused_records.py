"""Records Kafka refuses for what they are: larger than the producer's ``message.max.bytes``.

librdkafka's ``produce`` raises MSG_SIZE_TOO_LARGE for such a record. Producing it again cannot help, yet it was
retried ``max_retries`` times as if the broker were away: an output then failed for good and stopped the app
instead of dead-lettering its input, and a dead letter too large for the DLQ was produced again three times.
(A record above the topic's ``max.message.bytes`` but not the client's is refused by the broker with its whole
batch, good records too, so that one is still retried: see volley_kafka.producer.INVALID.)
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from typing import Any

import pytest

from volley import Engine
from volley.errors import ConfigurationError, DeliveryError

pytestmark = pytest.mark.kafka

JSON_DICT = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}
def app_config(kit: Any, source: str, sink: str, dlq: str, *, small: str) -> dict[str, Any]:
    producer = {"bootstrap.servers": kit.bootstrap}
    return {
        "input": {"value": source, "profile": "confluent", **JSON_DICT,
                  "config": {**producer, "group.id": kit.unique("g"), "volley.commit.interval.seconds": 0.1}},
        "out": {"value": sink, "profile": "confluent", **JSON_DICT,
                "config": {**producer, "message.max.bytes": 1000} if small == "out" else producer},
        "dlq": {"value": dlq, "profile": "confluent-dlq",
                "config": {**producer, "message.max.bytes": 1000} if small == "dlq" else producer},
    }


def padding_app(kit: Any, config: dict[str, Any], **settings: Any) -> Any:
    """An app writing each input's id, with ``size`` characters of padding, to "out"."""
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                    metrics_port=None, queue_config=config, **settings)

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [("out", {"id": message["id"], "padding": "x" * message["size"]})]

    return handler


async def test_an_output_too_large_for_its_topic_dead_letters_its_input_without_retries(
        kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    source, sink, dlq = kit.topic("big-out-in"), kit.topic("big-out-out"), kit.topic("big-out-dlq")
    kit.produce(source, [json.dumps({"id": 1, "size": 5000}).encode(), json.dumps({"id": 2, "size": 10}).encode()])
    handler = padding_app(kit, app_config(kit, source, sink, dlq, small="out"), max_retries=3,
                          retry_backoff_seconds=0.5)

    caplog.set_level(logging.WARNING)
    report = await asyncio.wait_for(handler.run_async(max_messages=2), 60)
    assert (report.acked, report.dead_lettered, report.retries) == (1, 1, 0), report
    letters = kit.read_topic(dlq)
    assert [json.loads(m.value())["id"] for m in letters] == [1]
    headers = dict(letters[0].headers())
    assert headers["volley-error-stage"] == b"output"
    assert b"Message size too large" in headers["volley-error-reason"]
    assert [json.loads(m.value())["id"] for m in kit.read_topic(sink)] == [2]
    assert not [r for r in caplog.records if "retrying" in r.getMessage()]


async def test_a_dead_letter_too_large_for_the_dlq_is_refused_once_and_its_input_kept(
        kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    source, sink, dlq = kit.topic("big-dl-in"), kit.topic("big-dl-out"), kit.topic("big-dl-dlq")
    group_config = app_config(kit, source, sink, dlq, small="dlq")
    group = group_config["input"]["config"]["group.id"]
    kit.produce(source, [json.dumps({"id": 1, "padding": "x" * 2000}).encode()])
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                    metrics_port=None, queue_config=group_config, max_retries=3, retry_backoff_seconds=0.5)

    @engine.stream_app
    def handler(message: dict[str, Any]) -> Any:
        raise ValueError("cannot handle it")

    caplog.set_level(logging.WARNING)
    with pytest.raises(DeliveryError, match=r"dead letter .* could not be written .*Message size too large"):
        await asyncio.wait_for(handler.run_async(max_messages=1), 60)
    assert kit.read_topic(dlq) == []
    assert not [r for r in caplog.records if "delivery to" in r.getMessage() and "retrying" in r.getMessage()]
    assert kit.committed(group, source) == {0: -1001}  # nothing committed: the input comes again


async def test_a_partition_produce_cannot_take_dead_letters_its_input_and_nothing_is_doubled(kit: Any) -> None:
    """A partition past 2**31 makes librdkafka's produce() raise OverflowError, which escaped the Kafka producer:
    every record of the call counted as failed, those it had accepted too, which were then produced again (a
    duplicate output), and the bad one was retried until the app stopped. It is an InvalidRecordError now."""
    source, sink, dlq = kit.topic("ovf-in"), kit.topic("ovf-out"), kit.topic("ovf-dlq")
    kit.produce(source, [json.dumps({"id": i}).encode() for i in range(2)])
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                    metrics_port=None, queue_config=app_config(kit, source, sink, dlq, small=""), max_retries=2,
                    retry_backoff_seconds=0.2)

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
        return [("out", message, {"partition": 2**31} if message["id"] == 1 else {})]

    report = await asyncio.wait_for(handler.run_async(max_messages=2), 60)
    assert (report.acked, report.dead_lettered, report.retries) == (1, 1, 0), report
    assert [json.loads(m.value())["id"] for m in kit.read_topic(sink)] == [0]
    letters = kit.read_topic(dlq)
    assert [json.loads(m.value())["id"] for m in letters] == [1]
    assert dict(letters[0].headers())["volley-error-stage"] == b"output"


def eos_engine(kit: Any, source: str, sink: str, dlq: str, group: str) -> Engine:
    """An exactly-once app: input (group ``group``) -> out, with a dead-letter queue."""
    producer = {"bootstrap.servers": kit.bootstrap}
    config = {
        "input": {"value": source, "profile": "confluent-eos", **JSON_DICT, "config": {**producer, "group.id": group}},
        "out": {"value": sink, "profile": "confluent", **JSON_DICT, "config": producer},
        "dlq": {"value": dlq, "profile": "confluent-dlq", "config": producer},
    }
    return Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                  metrics_port=None, queue_config=config, poll_interval_seconds=0.1)


async def test_exactly_once_an_output_refused_for_itself_aborts_once_then_its_input_is_dead_lettered(
        kit: Any) -> None:
    """In a transaction the input's other records may be sent already, so a record refused for itself aborts the
    transaction (nothing of it becomes visible) and the inputs come again. Before, the same input was handled and
    refused again after every abort, for ever: the partition made no progress and nothing reached the DLQ. Now
    the engine remembers it, and when it comes again it goes to the DLQ at stage output, unhandled."""
    source, sink, dlq = kit.topic("eos-big-in"), kit.topic("eos-big-out"), kit.topic("eos-big-dlq")
    group = kit.unique("g")
    kit.produce(source, [json.dumps({"id": i}).encode() for i in range(3)])
    engine = eos_engine(kit, source, sink, dlq, group)
    handled: list[int] = []

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        handled.append(message["id"])
        # 1.1 MB: above librdkafka's default message.max.bytes (1 MB), refused by produce() itself
        return [("out", {"id": message["id"], "pad": "x" * 1_100_000 if message["id"] == 1 else ""})]

    task = asyncio.ensure_future(handler.run_async())
    try:
        await kit.eventually(lambda: kit.committed(group, source) == {0: 3}, within=60, what="every input committed")
    finally:
        handler.stop()
        await asyncio.wait_for(task, 60)
    assert sorted(json.loads(m.value())["id"] for m in kit.read_topic(sink)) == [0, 2]
    letters = kit.read_topic(dlq)
    assert [json.loads(m.value())["id"] for m in letters] == [1]
    assert dict(letters[0].headers())["volley-error-stage"] == b"output"
    assert handled.count(1) == 1, handled  # the second time it came, it went to the DLQ without its handler


async def test_two_refused_inputs_first_refused_in_different_transactions_are_both_dead_lettered(kit: Any) -> None:
    """X (id 0) is refused in a transaction that Y (id 1) did not make it into; after the rewind both land in one
    transaction. When decode used up an input's mark, each aborted transaction consumed the mark of the input it
    dead-lettered, and the other one was handled and refused again: they alternated for ever (a review found it).
    A mark now lasts until the transaction holding its dead letter commits."""
    source, sink, dlq = kit.topic("eos2-in"), kit.topic("eos2-out"), kit.topic("eos2-dlq")
    group = kit.unique("g")
    kit.produce(source, [json.dumps({"id": 0}).encode()])
    engine = eos_engine(kit, source, sink, dlq, group)
    handled: list[int] = []

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        handled.append(message["id"])
        if message["id"] == 0 and handled.count(0) == 1:
            kit.produce(source, [json.dumps({"id": 1}).encode()])  # Y arrives while X's transaction is open
            time.sleep(0.5)  # X's transaction is due (interval 0.1 s) before Y joins it
        return [("out", {"id": message["id"], "pad": "x" * 1_100_000})]  # every one refused by produce()

    task = asyncio.ensure_future(handler.run_async())
    try:
        await kit.eventually(lambda: kit.committed(group, source) == {0: 2}, within=30, what="both committed")
    finally:
        handler.stop()
        await asyncio.wait_for(task, 60)
    assert sorted(json.loads(m.value())["id"] for m in kit.read_topic(dlq)) == [0, 1]
    assert kit.read_topic(sink) == []


async def test_exactly_once_without_a_dlq_an_output_refused_for_itself_stops_the_app_whatever_on_failure(
        kit: Any) -> None:
    """Without a DLQ the input can neither be dead-lettered nor committed with its outputs. Given back with
    on_failure="continue", its transaction committed the later inputs' outputs with offsets only up to it, and the
    rewind of the next abort produced those outputs again (read_committed saw [0, 2, 2, 3, 3]; a review found it).
    The app stops instead; nothing of the transaction becomes visible."""
    source, sink = kit.topic("eos-nodlq-in"), kit.topic("eos-nodlq-out")
    group = kit.unique("g")
    kit.produce(source, [json.dumps({"id": i}).encode() for i in range(4)])
    producer = {"bootstrap.servers": kit.bootstrap}
    config = {
        "input": {"value": source, "profile": "confluent-eos", **JSON_DICT, "config": {**producer, "group.id": group}},
        "out": {"value": sink, "profile": "confluent", **JSON_DICT, "config": producer},
    }
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], metrics_port=None,
                    queue_config=config, poll_interval_seconds=0.1, on_failure="continue")

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        return [("out", {"id": message["id"], "pad": "x" * 1_100_000 if message["id"] == 1 else ""})]

    with pytest.raises(DeliveryError, match=r"could not be delivered.*Message size too large"):
        await asyncio.wait_for(handler.run_async(), 60)
    seen = [json.loads(m.value())["id"] for m in kit.read_topic(sink)]
    assert 1 not in seen and len(seen) == len(set(seen)), seen


async def test_a_topic_that_refuses_the_producers_batches_fails_the_start_saying_what_to_set(kit: Any) -> None:
    """The topic's max.message.bytes (10,000) bounds a whole batch. With the producer's default message.max.bytes
    (1,000,000) a burst of small outputs went out in batches the broker refused whole: every output failed, was
    retried, and the app stopped with a DeliveryError. Now the start fails, naming the setting."""
    source, dlq = kit.topic("limit-in"), kit.topic("limit-dlq")
    sink = kit.topic("limit-out", config={"max.message.bytes": "10000"})
    kit.produce(source, [json.dumps({"id": i, "size": 500}).encode() for i in range(200)])
    handler = padding_app(kit, app_config(kit, source, sink, dlq, small=""), max_retries=1,
                          retry_backoff_seconds=0.05)

    expected = r"at most 10000 bytes.*Set \"message.max.bytes\": 9488 in the config of queue 'out'"
    with pytest.raises(ConfigurationError, match=expected):
        await asyncio.wait_for(handler.run_async(max_messages=200), 60)
    assert kit.read_topic(sink, timeout=2) == []


async def test_with_message_max_bytes_at_the_topics_limit_only_the_record_too_large_is_dead_lettered(
        kit: Any) -> None:
    """What the start-up error says to do: librdkafka then keeps batches within the topic's limit, and refuses
    a record above it on its own."""
    source, dlq = kit.topic("fit-in"), kit.topic("fit-dlq")
    sink = kit.topic("fit-out", config={"max.message.bytes": "10000"})
    sizes = [500] * 100 + [9_500] + [500] * 99  # 9,500: below the topic's limit, not with its batch's framing
    kit.produce(source, [json.dumps({"id": i, "size": size}).encode() for i, size in enumerate(sizes)])
    config = app_config(kit, source, sink, dlq, small="")
    config["out"]["config"]["message.max.bytes"] = 9488
    handler = padding_app(kit, config, max_retries=1, retry_backoff_seconds=0.05)

    report = await asyncio.wait_for(handler.run_async(max_messages=200), 60)
    assert (report.acked, report.dead_lettered, report.retries) == (199, 1, 0), report
    assert [json.loads(m.value())["id"] for m in kit.read_topic(dlq)] == [100]
    assert sorted(json.loads(m.value())["id"] for m in kit.read_topic(sink)) == [i for i in range(200) if i != 100]


async def test_a_compressed_producer_above_its_topics_limit_starts_with_a_warning(
        kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The broker checks a compressed batch compressed: a higher message.max.bytes may be meant (a review found a
    zstd producer sending 3 MB records of JSON to a 1 MB topic refused at start)."""
    source, dlq = kit.topic("zstd-in"), kit.topic("zstd-dlq")
    sink = kit.topic("zstd-out", config={"max.message.bytes": "10000"})
    kit.produce(source, [json.dumps({"id": 1, "size": 30_000}).encode()])
    config = app_config(kit, source, sink, dlq, small="")
    config["out"]["config"].update({"message.max.bytes": 100_000, "compression.type": "zstd"})
    handler = padding_app(kit, config)

    caplog.set_level(logging.WARNING)
    report = await asyncio.wait_for(handler.run_async(max_messages=1), 60)
    assert report.acked == 1, report
    assert any("accepts record batches of at most 10000 bytes" in r.getMessage() for r in caplog.records)
