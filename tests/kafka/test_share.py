"""Kafka share groups (``confluent-share``, KIP-932) through the engine, on the real broker.

Start-up refusals (ordering, exactly-once), the delivery limit, concurrency past a slow record, a record slower
than its lock not stalling every member, every member getting work on one partition, the poison record's way to
the DLQ, a lock that expires under a slow handler, and kill -9 of a worker mid-stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Producer

from services.processes import WorkerProcess, wait_for
from volley import Engine
from volley.errors import ConfigurationError
from volley.plugins import get_registry
from volley_kafka.share_admin import configure_share_group

pytestmark = pytest.mark.kafka

JSON_DICT = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}
WORKER = Path(__file__).with_name("kafka_worker.py")
SHARE_PROFILES = ("confluent-share", "confluent-share-orjson-pydantic", "confluent-share-pydantic",
                  "confluent-share-msgpack-pydantic", "confluent-share-batch-json", "confluent-share-dlq")


def share_group(kit: Any, **group_config: Any) -> str:
    """A fresh share group that starts at the beginning of its topics (the broker's default is 'latest')."""
    group = kit.unique("share")
    configure_share_group({"bootstrap.servers": kit.bootstrap}, group, auto_offset_reset="earliest",
                          **group_config)
    return group


def produce(kit: Any, topic: str, count: int) -> None:
    """``{"id": i}`` records in small record batches: a share fetch acquires whole batches, so a member would hold
    a large batch (here, thousands of records) past ``max.poll.records`` and past its lock."""
    producer = Producer({"bootstrap.servers": kit.bootstrap, "linger.ms": 5, "batch.num.messages": 20})
    for i in range(count):
        producer.produce(topic, json.dumps({"id": i}).encode())
        producer.poll(0)
    assert producer.flush(30) == 0


def queues(kit: Any, group: str, source: str, sink: str, dlq: str | None = None,
           **input_extra: Any) -> dict[str, Any]:
    config: dict[str, Any] = {
        "input": {"value": source, "profile": "confluent-share", **JSON_DICT, **input_extra,
                  "config": {"bootstrap.servers": kit.bootstrap, "group.id": group}},
        "out": {"value": sink, "profile": "confluent", **JSON_DICT, "config": {"bootstrap.servers": kit.bootstrap}},
    }
    if dlq is not None:
        config["dlq"] = {"value": dlq, "profile": "confluent-share-dlq",
                         "config": {"bootstrap.servers": kit.bootstrap}}
    return config


def offline_engine(**input_extra: Any) -> Engine:
    """An Engine whose input is a share queue; construction alone never talks to a broker."""
    config: dict[str, Any] = {"bootstrap.servers": "127.0.0.1:9", "group.id": "g", **input_extra.pop("config", {})}
    return Engine(app_name="share", input_queue="input", output_queues=[], metrics_port=None,
                  queue_config={"input": {"value": "t", "profile": "confluent-share", "config": config,
                                          **input_extra}})


# ----------------------------------------------------------------------------------------- start-up (no broker)


def test_profiles_and_connector_are_registered() -> None:
    registry = get_registry()
    for name in SHARE_PROFILES[:-1]:
        assert registry.get("profile", name)["connector"] == "confluent-share", name
    assert registry.get("profile", "confluent-share-dlq")["connector"] == "confluent"  # an ordinary topic
    assert registry.get("connector", "kafka-share") is registry.get("connector", "confluent-share")


@pytest.mark.parametrize("ordering", ["partition", "key"])
def test_ordering_on_a_share_queue_fails_at_startup(ordering: str) -> None:
    with pytest.raises(ConfigurationError, match=rf"ordering '{ordering}' cannot be honoured.*share group"):
        offline_engine(ordering=ordering)


def test_a_share_queue_is_unordered_by_default() -> None:
    assert offline_engine().input.ordering == "none"
    assert offline_engine(ordering="none").input.ordering == "none"


def test_exactly_once_on_a_share_queue_fails_at_startup() -> None:
    with pytest.raises(ConfigurationError, match=r"exactly-once is not offered on a share group.*confluent-eos"):
        offline_engine(config={"volley.exactly.once": True})


def test_implicit_acknowledgement_fails_at_startup() -> None:
    with pytest.raises(ConfigurationError, match=r"share\.acknowledgement\.mode must be 'explicit'"):
        offline_engine(config={"share.acknowledgement.mode": "implicit"})


def test_max_deliveries_stays_below_the_brokers_delivery_limit() -> None:
    """The broker archives a record after its delivery count limit (5 by default): the DLQ must come first, with a
    delivery to spare for a dead letter that fails."""
    assert offline_engine().max_deliveries == 3  # Engine's default 10, bounded by the default limit 5
    assert offline_engine(config={"volley.share.delivery.limit": 8}).max_deliveries == 6
    assert offline_engine(config={"volley.share.delivery.limit": 2}).max_deliveries == 1
    engine = Engine(app_name="share", input_queue="input", metrics_port=None, max_deliveries=2,
                    queue_config={"input": {"value": "t", "profile": "confluent-share",
                                            "config": {"bootstrap.servers": "127.0.0.1:9", "group.id": "g"}}})
    assert engine.max_deliveries == 2


# ----------------------------------------------------------------------------------------- on the broker


async def test_async_handlers_run_concurrently_past_a_slow_record(kit: Any) -> None:
    """One partition, one slow record: the others are handled (and acknowledged) while it runs, or before it.

    The group's lock (30 s) outlasts the slow record (at most 20 s): with the test broker's 5 s, a loaded machine
    let the slow record's lock expire, and each copy the broker handed out again held up one more member. What is
    counted is how many others were done when the slow record's call returned: on a loaded machine the members
    holding later records may finish them before the slow record's call even begins (CI once saw only 99 of them
    finish after it began), which stalls nothing either."""
    source, sink = kit.topic("share-async-in"), kit.topic("share-async-out")
    count = 300
    produce(kit, source, count)
    group = share_group(kit, record_lock_ms=30_000)
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], metrics_port=None,
                    queue_config=queues(kit, group, source, sink), max_in_flight=50,
                    poll_interval_seconds=0.2)
    done: list[int] = []  # the other records, as their calls finish
    done_when_slow_returned: list[int] = []
    running = 0
    most = 0

    @engine.stream_app
    async def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        try:
            if message["id"] == 0:
                deadline = time.monotonic() + 20
                while len(done) < count - 1 and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                done_when_slow_returned.append(len(done))
            else:
                await asyncio.sleep(0.01)
                done.append(message["id"])
            return [("out", message)]
        finally:
            running -= 1

    report = await asyncio.wait_for(handler.run_async(max_messages=count), 60)
    assert report.acked == count and report.failed == 0
    assert most > 10, f"at most {most} handler calls ran at once"
    assert done_when_slow_returned and done_when_slow_returned[0] >= count - 1 - 100, (
        f"only {done_when_slow_returned} other records were done when the slow one returned")
    ids = Counter(json.loads(m.value())["id"] for m in kit.read_topic(sink))
    assert set(ids) == set(range(count))


async def test_a_record_slower_than_its_lock_does_not_stall_every_member(kit: Any) -> None:
    """One record's handler runs far past the group's lock (1 s): the broker hands the record out again, to one
    member after another, and each copy's handler is as slow. A member gives up what it holds once its lock
    period passed (its records are the group's again) and polls on, so the other records are all handled while
    the slow copies still run. Before, every member ended up waiting for a copy and nothing was consumed."""
    source, sink = kit.topic("share-stall-in"), kit.topic("share-stall-out")
    count = 200
    produce(kit, source, count)
    group = share_group(kit, record_lock_ms=1000)
    config = queues(kit, group, source, sink)
    # Two members taking one record batch (20 records) per poll: the others take a few lock periods.
    config["input"]["config"].update({"volley.share.consumers": 2, "max.poll.records": 20})
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], metrics_port=None,
                    queue_config=config, max_in_flight=30, poll_interval_seconds=0.2)
    others: set[int] = set()
    slow_ends: list[str] = []

    @engine.stream_app
    async def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
        if message["id"] == 0:  # every copy is slow: until the others are done, or 8 s
            deadline = time.monotonic() + 8
            while len(others) < count - 1 and time.monotonic() < deadline:
                await asyncio.sleep(0.05)
            slow_ends.append("others done" if len(others) >= count - 1 else "deadline")
        else:
            await asyncio.sleep(0.2)
            others.add(message["id"])
        return [("out", message)]

    run = asyncio.ensure_future(handler.run_async())
    try:
        deadline = time.monotonic() + 30
        while not slow_ends and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        handler.stop()
        await asyncio.wait_for(run, 60)
    assert slow_ends, "the slow record's handler never ended"
    assert slow_ends[0] == "others done", (
        f"only {len(others)} of the {count - 1} other records were handled while the slow one ran (8 s)")
    ids = Counter(json.loads(m.value())["id"] for m in kit.read_topic(sink))
    assert set(ids) >= set(range(1, count))


async def test_every_member_gets_work_on_one_partition(kit: Any) -> None:
    """Two apps in one share group on a one-partition topic: both handle records (a consumer group could not)."""
    source, sink = kit.topic("share-members-in"), kit.topic("share-members-out")
    group = share_group(kit)
    count = 1000
    produce(kit, source, count)
    seen: Counter[str] = Counter()

    def app(name: str) -> Any:
        engine = Engine(app_name=name, input_queue="input", output_queues=["out"], metrics_port=None,
                        queue_config=queues(kit, group, source, sink), max_in_flight=5, poll_interval_seconds=0.2)

        @engine.stream_app
        async def handler(message: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
            seen[name] += 1
            await asyncio.sleep(0.02)
            return [("out", message)]

        return handler

    first, second = app("first"), app("second")
    runs = [asyncio.ensure_future(a.run_async()) for a in (first, second)]
    try:
        deadline = time.monotonic() + 60
        while sum(seen.values()) < count and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        first.stop()
        second.stop()
        reports = await asyncio.wait_for(asyncio.gather(*runs), 60)
    assert seen["first"] > 0 and seen["second"] > 0, f"handled per member: {dict(seen)}"
    assert sum(r.acked for r in reports) >= count
    ids = Counter(json.loads(m.value())["id"] for m in kit.read_topic(sink))
    assert set(ids) == set(range(count)), "nothing lost"


async def test_poison_record_goes_to_the_dlq_after_max_deliveries(kit: Any) -> None:
    """A record given back on every delivery (RELEASE) reaches the DLQ on delivery max_deliveries + 1, with the
    broker's delivery count in its headers, and is then accepted: a new member of the group gets nothing."""
    source, sink, dlq = kit.topic("share-poison-in"), kit.topic("share-poison-out"), kit.topic("share-poison-dlq")
    group = share_group(kit)
    produce(kit, source, 20)
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                    metrics_port=None, queue_config=queues(kit, group, source, sink, dlq), max_deliveries=3,
                    poll_interval_seconds=0.2)
    attempts: list[int] = []

    @engine.stream_app
    def handler(message: dict[str, Any], msg_ctx: Any) -> Any:
        if message["id"] == 7:
            attempts.append(msg_ctx.attempt)
            return False  # give it back
        return [("out", message)]

    report = await asyncio.wait_for(handler.run_async(max_messages=19 + 4), 60)
    assert attempts == [1, 2, 3], f"the poison record's handler calls saw delivery counts {attempts}"
    assert report.dead_lettered == 1 and report.nacked == 3 and report.acked == 19
    letters = kit.read_topic(dlq)
    assert len(letters) == 1
    headers = dict(letters[0].headers())
    assert json.loads(letters[0].value()) == {"id": 7}
    assert headers["volley-attempts"] == b"4" and headers["volley-error-stage"] == b"redelivery"
    # Accepted after its dead letter landed: nothing is left for the group.
    again = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], metrics_port=None,
                   queue_config=queues(kit, group, source, sink), poll_interval_seconds=0.2)
    extra: list[Any] = []

    @again.stream_app
    def check(message: dict[str, Any]) -> bool:
        extra.append(message)
        return True

    await asyncio.wait_for(check.run_async(stop_when_drained=True, drain_idle_seconds=2.0), 60)
    assert extra == [], f"records came back after they were settled: {extra}"


async def test_a_lock_that_expires_under_a_slow_handler(kit: Any, caplog: pytest.LogCaptureFixture) -> None:
    """The group's lock (1 s here) expires while a handler still runs (2.5 s): the broker hands the record out
    again (delivery 2, to a free member), the first copy's late ack is refused and reported as a possible
    duplicate. Nothing is lost; the record's output may come twice."""
    source, sink = kit.topic("share-lock-in"), kit.topic("share-lock-out")
    group = share_group(kit, record_lock_ms=1000)
    produce(kit, source, 10)
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], metrics_port=None,
                    queue_config=queues(kit, group, source, sink), max_in_flight=20, poll_interval_seconds=0.2)
    calls: list[tuple[int, int]] = []

    @engine.stream_app
    async def handler(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        calls.append((message["id"], msg_ctx.attempt))
        if message["id"] == 3 and msg_ctx.attempt == 1:
            await asyncio.sleep(2.5)
        return [("out", {**message, "attempt": msg_ctx.attempt})]

    caplog.set_level(logging.WARNING, logger="volley_kafka")
    run = asyncio.ensure_future(handler.run_async())
    try:
        deadline = time.monotonic() + 30
        while "possible duplicate" not in caplog.text and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
    finally:
        handler.stop()
        await asyncio.wait_for(run, 60)
    assert (3, 2) in calls, f"the record whose lock expired was not delivered again: {calls}"
    assert "possible duplicate" in caplog.text, caplog.text
    outputs = [json.loads(m.value()) for m in kit.read_topic(sink)]
    assert {o["id"] for o in outputs} == set(range(10))
    assert sorted(o["attempt"] for o in outputs if o["id"] == 3) == [1, 2], "both copies' outputs went out"


@pytest.mark.slow
def test_kill_9_three_times_loses_nothing(kit: Any, tmp_path: Path, worker_processes: list[WorkerProcess]) -> None:
    """Two workers share one partition; one is killed with -9 three times mid-stream and restarted. The records
    its members held come back once their locks expire (5 s on the test broker) and are handled by the others:
    no input is lost; duplicates (outputs of records whose ack had not reached the broker) are reported."""
    count = 4000
    source, sink = kit.topic("share-crash-in"), kit.topic("share-crash-out")
    produce(kit, source, count)
    # A record the victim holds at every kill is delivered once more each time (and maybe once more as its lock
    # runs out under load): the group's limit is raised so that it is not given up on meanwhile.
    group = share_group(kit, delivery_count_limit=10)

    def worker(name: str) -> WorkerProcess:
        process = WorkerProcess([sys.executable, str(WORKER), "--share", kit.bootstrap, source, sink, group, "0.005",
                                 "confluent-share", "10"],
                                tmp_path / f"{name}.log")
        worker_processes.append(process)
        process.start()
        return process

    def outputs() -> int:
        return sum(kit.end_offsets(sink).values())

    steady = worker("steady")
    victim = worker("victim")
    for kill in range(1, 4):
        wait_for(lambda k=kill: victim.log.read_text(errors="replace").count("handled its first message") >= k, 60,
                 f"the victim's first message (round {kill})", victim.ensure_alive)
        target = outputs() + count // 10
        wait_for(lambda t=target: outputs() >= t, 60, f"{target} outputs", steady.ensure_alive)
        victim.kill()
        victim.start()
    wait_for(lambda: len({json.loads(m.value())["id"] for m in kit.read_topic(sink)}) >= count, 90,
             "every input's output", steady.ensure_alive)
    assert steady.terminate() == 0, steady.tail()
    assert victim.terminate() == 0, victim.tail()
    copies = Counter(json.loads(m.value())["id"] for m in kit.read_topic(sink))
    duplicates = sum(n - 1 for n in copies.values())
    print(f"share crash test: {count} inputs, {sum(copies.values())} outputs, {duplicates} duplicates after 3 kills")
    assert set(copies) == set(range(count)), f"lost: {sorted(set(range(count)) - set(copies))[:10]}"


def test_consumer_group_fetch_settings_are_left_out_of_a_share_consumer() -> None:
    """librdkafka refuses fetch.queue.backoff.ms on a share consumer ("not applicable"), and py-volley users share
    one config dict between queues: it is dropped like queued.min.messages (a review found the consumer failing
    to start with it)."""
    from confluent_kafka import ShareConsumer

    from volley.ports import QueueSpec
    from volley_kafka.share_settings import share_settings

    config = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g", "fetch.queue.backoff.ms": 50,
              "queued.min.messages": 10}
    settings = share_settings(QueueSpec("in", "topic-a", "confluent-share", config))
    assert "fetch.queue.backoff.ms" not in settings.librdkafka
    assert "queued.min.messages" not in settings.librdkafka
    ShareConsumer(settings.librdkafka).close()  # librdkafka takes what is left
