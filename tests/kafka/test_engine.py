"""The engine on a real broker, Kafka to Kafka: outputs, commits with two outputs, the DLQ, batches."""

from __future__ import annotations

import asyncio
import dataclasses
import itertools
import json
import os
import random
import threading
from collections import Counter
from collections.abc import Sequence
from typing import Any

import pytest

from volley import Engine
from volley.errors import DeliveryError
from volley.message import OutgoingMessage
from volley.ports import DeliveryCallback, DeliveryFailure, QueueSpec
from volley_kafka import KafkaConnector

pytestmark = pytest.mark.kafka

JSON_DICT = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}
"""Core's codecs, so that these tests exercise the connector and the engine, not the serializers."""


@dataclasses.dataclass
class Order:
    id: int
    amount: float


def queues(kit: Any, group: str, inputs: str, outputs: dict[str, str], dlq: str | None = None,
           codec: dict[str, Any] | None = None, input_config: dict[str, Any] | None = None,
           **input_extra: Any) -> dict[str, Any]:
    codec = JSON_DICT if codec is None else codec
    config: dict[str, Any] = {
        "input": {"value": inputs, "profile": "confluent", **codec, **input_extra,
                  "config": {"bootstrap.servers": kit.bootstrap, "group.id": group,
                             "volley.commit.interval.seconds": 0.1, **(input_config or {})}},
    }
    for name, topic in outputs.items():
        config[name] = {"value": topic, "profile": "confluent", **codec,
                        "config": {"bootstrap.servers": kit.bootstrap}}
    if dlq is not None:
        config["dlq"] = {"value": dlq, "profile": "confluent-dlq", "config": {"bootstrap.servers": kit.bootstrap}}
    return config


async def run(app: Any, max_messages: int, timeout: float = 60.0) -> Any:
    return await asyncio.wait_for(app.run_async(max_messages=max_messages), timeout)


async def test_kafka_to_kafka_with_keys_and_headers(kit: Any) -> None:
    source = kit.topic("e2e-in", partitions=3)
    sink = kit.topic("e2e-out", partitions=3)
    group = kit.unique("g")
    count = 600
    kit.produce(source, [json.dumps({"n": i}).encode() for i in range(count)],
                keys=[f"k{i % 7}".encode() for i in range(count)])
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"],
                    queue_config=queues(kit, group, source, {"out": sink}), metrics_port=None,
                    poll_interval_seconds=0.2)

    @engine.stream_app
    def handler(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, Any, dict[str, Any]]]:
        raw = msg_ctx.raw  # py-volley handed over the confluent Message
        assert raw.offset() == msg_ctx.position
        return [("out", {"n": message["n"], "double": 2 * message["n"]},
                 {"key": msg_ctx.key, "headers": {"source-offset": str(msg_ctx.position)}})]

    report = await run(handler, count)
    assert report.acked == count and report.failed == 0
    stored = kit.read_topic(sink)
    assert sorted(json.loads(m.value())["n"] for m in stored) == list(range(count)), "every output exactly once"
    for message in stored:
        n = json.loads(message.value())["n"]
        assert message.key() == f"k{n % 7}".encode(), "the key came from the handler's kwargs"
        assert dict(message.headers())["source-offset"].isdigit()
    ends = kit.end_offsets(source, 3)
    assert kit.committed(group, source, 3) == ends, "everything handled is committed"
    per_key = [json.loads(m.value())["n"] for m in stored if m.key() == b"k3"]
    assert per_key == sorted(per_key), "one key keeps its order end to end"


class HoldingProducer:
    """A real Kafka producer whose delivery reports for chosen records are held back until released.

    Stands for an output that is slow to confirm: the records really go to Kafka, only the
    confirmation waits, exactly like a slow broker acknowledgment.
    """

    hold: set[bytes] = set()
    release = threading.Event()

    def __init__(self, spec: QueueSpec) -> None:
        self._inner = KafkaConnector().create_producer(spec)
        self._held: list[tuple[DeliveryCallback, OutgoingMessage]] = []
        self._lock = threading.Lock()
        self._watcher: threading.Thread | None = None

    async def start(self) -> None:
        await self._inner.start()

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        def filtered(delivered: Sequence[OutgoingMessage], failed: Sequence[DeliveryFailure]) -> None:
            now = [m for m in delivered if json.loads(m.value)["n"] not in self.hold]
            later = [m for m in delivered if json.loads(m.value)["n"] in self.hold]
            with self._lock:
                if later and not self.release.is_set():
                    self._held.extend((on_delivery, m) for m in later)
                    later = []
            on_delivery(now + later, failed)

        self._inner.produce(messages, filtered)
        if self._watcher is None:
            self._watcher = threading.Thread(target=self._release_when_told, daemon=True)
            self._watcher.start()

    def _release_when_told(self) -> None:
        self.release.wait(120)
        with self._lock:
            held, self._held = self._held, []
        for callback, message in held:
            callback([message], [])

    async def flush(self, timeout: float) -> None:
        await self._inner.flush(timeout)

    async def close(self) -> None:
        self.release.set()
        await self._inner.close()


async def test_an_input_is_committed_only_when_both_outputs_are_confirmed(kit: Any) -> None:
    """Message 3's second output is slow: nothing at or after offset 3 is committed until it confirms, although
    every later message finished long before."""
    source = kit.topic("two-in")
    out_a = kit.topic("two-a")
    out_b = kit.topic("two-b")
    group = kit.unique("g")
    count = 40
    kit.produce(source, [json.dumps({"n": i}).encode() for i in range(count)])
    HoldingProducer.hold = {3}
    HoldingProducer.release = threading.Event()
    config = queues(kit, group, source, {"a": out_a, "b": out_b})
    config["b"]["producer"] = HoldingProducer
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["a", "b"], queue_config=config,
                    metrics_port=None, poll_interval_seconds=0.2)

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("a", message), ("b", message)]

    task = asyncio.ensure_future(run(handler, count))
    try:
        await kit.eventually(lambda: len(kit.read_topic(out_b, isolation="read_uncommitted")) == count,
                             what="every output stored")
        await kit.eventually(lambda: kit.committed(group, source)[0] == 3, what="commit up to the held message")
        await asyncio.sleep(0.5)  # several commit intervals: the commit must stay where it is
        assert kit.committed(group, source)[0] == 3, "a later message finishing first moved the commit past 3"
        assert not task.done()
        HoldingProducer.release.set()
        report = await task
    finally:
        HoldingProducer.release.set()
        if not task.done():
            task.cancel()
    assert report.acked == count
    assert kit.committed(group, source)[0] == count


async def test_a_failing_output_stops_the_worker_without_committing_past_it(kit: Any) -> None:
    """Message 5's second output is too large for its topic (the broker refuses it, with its batch): it fails for
    real after retries; the worker stops and the commit stays below message 5, so a restart handles it again.
    (Above the producer's own message.max.bytes it would be refused on its own: tests/kafka/test_refused_records.)"""
    source = kit.topic("fail-in")
    out_a = kit.topic("fail-a")
    out_b = kit.topic("fail-b", config={"max.message.bytes": "10000"})
    group = kit.unique("g")
    count = 20
    kit.produce(source, [json.dumps({"n": i}).encode() for i in range(count)])
    config = queues(kit, group, source, {"a": out_a, "b": out_b})
    # The start-up check would refuse b's producer (message.max.bytes above the topic's limit): the limit lowered
    # after the start, as far as the worker knows.
    config["b"]["config"]["volley.startup.timeout.seconds"] = 0
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["a", "b"], queue_config=config,
                    metrics_port=None, poll_interval_seconds=0.2, max_retries=1, retry_backoff_seconds=0.05)

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, Any]]:
        big = {"n": message["n"], "pad": "x" * 20_000} if message["n"] == 5 else message
        return [("a", message), ("b", big)]

    with pytest.raises(DeliveryError, match="could not be delivered"):
        await run(handler, count)
    committed = kit.committed(group, source)[0]
    # -1001: nothing committed (the records batched with the big one were refused with it, and retried)
    assert committed <= 5, f"the commit moved past the failed input (committed {committed})"
    stored_a = {json.loads(m.value())["n"] for m in kit.read_topic(out_a)}
    assert 5 in stored_a, "the first output of the failed input was delivered: it will be produced again"


async def test_bad_input_goes_to_the_dlq_and_the_worker_keeps_going(kit: Any) -> None:
    source = kit.topic("bad-in", partitions=2)
    sink = kit.topic("bad-out", partitions=2)
    dlq = kit.topic("bad-dlq")
    group = kit.unique("g")
    rng = random.Random(7)
    values: list[bytes] = []
    expected_bad: list[bytes] = []
    for i in range(300):
        kind = rng.random()
        if kind < 0.1:
            value = os.urandom(rng.randint(1, 40)) + b"\xff"  # never valid UTF-8 JSON
            expected_bad.append(value)
        elif kind < 0.2:
            value = json.dumps(rng.choice([[1, 2], {"id": i}, {"nope": True}, "text", 42])).encode()
            expected_bad.append(value)
        else:
            value = json.dumps({"id": i, "amount": i / 2}).encode()
        values.append(value)
    kit.produce(source, values, keys=[f"key-{i}".encode() for i in range(300)],
                headers={"origin": b"test"})
    codec = {"serializer": "json", "model_handler": "dataclass", "data_model": Order}
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                    queue_config=queues(kit, group, source, {"out": sink}, dlq=dlq, codec=codec),
                    metrics_port=None, poll_interval_seconds=0.2)

    @engine.stream_app
    def handler(order: Order) -> list[tuple[str, Order]]:
        return [("out", order)]

    report = await run(handler, len(values))
    assert report.dead_lettered == len(expected_bad)
    dead = kit.read_topic(dlq)
    assert Counter(m.value() for m in dead) == Counter(expected_bad), "bad inputs land in the DLQ raw, all of them"
    for message in dead:
        headers = dict(message.headers())
        assert headers["origin"] == b"test", "original headers kept"
        assert message.key().startswith(b"key-"), "original key kept"
        assert headers["volley-error-stage"] in (b"deserialize", b"validate")
        assert headers["volley-source-queue"] == source.encode()
        assert int(headers["volley-source-position"]) >= 0
    good = {json.loads(m.value())["id"] for m in kit.read_topic(sink)}
    assert len(good) == len(values) - len(expected_bad), "the worker kept going past every bad input"
    assert kit.committed(group, source, 2) == kit.end_offsets(source, 2)


async def test_a_batch_handler_sends_one_bad_record_to_the_dlq_alone(kit: Any) -> None:
    source = kit.topic("batch-in")
    sink = kit.topic("batch-out")
    dlq = kit.topic("batch-dlq")
    group = kit.unique("g")
    values = [json.dumps({"n": i}).encode() for i in range(50)]
    values[17] = b"{not json"
    kit.produce(source, values)
    batches: list[int] = []
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], dead_letter_queue="dlq",
                    queue_config=queues(kit, group, source, {"out": sink}, dlq=dlq, batch_size=10),
                    metrics_port=None, poll_interval_seconds=0.2)

    @engine.stream_app
    def handler(messages: list[dict[str, Any]]) -> list[tuple[str, Any]]:
        batches.append(len(messages))
        return [("out", {"sum": sum(m["n"] for m in messages), "size": len(messages)})]

    report = await run(handler, len(values))
    assert report.dead_lettered == 1
    assert [m.value() for m in kit.read_topic(dlq)] == [b"{not json"]
    assert sum(batches) == 49, "every other record reached the handler, in lists"
    assert max(batches) <= 10
    total = sum(json.loads(m.value())["sum"] for m in kit.read_topic(sink))
    assert total == sum(range(50)) - 17
    assert kit.committed(group, source)[0] == 50


class ReadinessRecorder:
    """An observer that notes each on_ready, with the consumer's assignment at that moment."""

    def __init__(self) -> None:
        self.calls: list[tuple[bool, frozenset[Any]]] = []
        self.assignment: Any = frozenset

    def on_ready(self, app_name: str, ready: bool) -> None:
        self.calls.append((ready, self.assignment()))


async def test_ready_only_once_the_group_assigned_partitions(kit: Any, group_protocol: str) -> None:
    source = kit.topic("ready-in", partitions=2)
    sink = kit.topic("ready-out")
    kit.produce(source, [json.dumps({"n": i}).encode() for i in range(20)])
    recorder = ReadinessRecorder()
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"],
                    queue_config=queues(kit, kit.unique("g"), source, {"out": sink},
                                        input_config={"group.protocol": group_protocol}),
                    metrics_port=None, poll_interval_seconds=0.2, observers=[recorder])

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("out", message)]

    def assignment() -> frozenset[Any]:
        pipeline = handler._run
        return frozenset(pipeline.consumer._fetcher.assigned) if pipeline is not None else frozenset()

    recorder.assignment = assignment
    report = await run(handler, 20)
    assert report.acked == 20
    assert recorder.calls[0] == (True, frozenset({(source, 0), (source, 1)})), (
        f"the first readiness report must come with the assignment, not on subscribe: {recorder.calls}")
    assert recorder.calls[-1][0] is False, "not ready once shutdown begins"


def test_run_until_drained_ends_on_a_topic_written_in_transactions(kit: Any) -> None:
    """A transaction's commit marker takes an offset no consumer ever receives: read to the end must allow for it."""
    from confluent_kafka import Producer

    source = kit.topic("txn-in")
    sink = kit.topic("txn-out")
    producer = Producer({"bootstrap.servers": kit.bootstrap, "transactional.id": kit.unique("txn")})
    producer.init_transactions(30)
    producer.begin_transaction()
    for i in range(10):
        producer.produce(source, json.dumps({"n": i}).encode())
    producer.commit_transaction(30)
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"],
                    queue_config=queues(kit, kit.unique("g"), source, {"out": sink}), metrics_port=None,
                    poll_interval_seconds=0.2)

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("out", message)]

    report = handler.run_until_drained(timeout=60, drain_idle_seconds=0.2)
    assert report.acked == 10


def _wait_for(check: Any, within: float, what: str) -> None:
    """On a handler thread: poll a condition until it holds, or fail after ``within`` seconds."""
    import time

    deadline = time.monotonic() + within
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not reached within {within} s")
        threading.Event().wait(0.01)


async def test_a_worker_paused_at_a_full_buffer_consumes_again_after_a_rebalance(kit: Any, group_protocol: str) -> None:
    """The worker's buffer is full (a slow message), so its partitions are paused in librdkafka; a second member
    joins and leaves. librdkafka keeps the pause across revoke and assign: the worker must still finish."""
    from confluent_kafka import Consumer

    source = kit.topic("paused-rebalance-in", partitions=2)
    sink = kit.topic("paused-rebalance-out", partitions=2)
    group = kit.unique("g")
    count = 60
    kit.produce(source, [json.dumps({"n": i}).encode() for i in range(count)])
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"],
                    queue_config=queues(kit, group, source, {"out": sink},
                                        input_config={"volley.revoke.timeout.seconds": 20,
                                                      "group.protocol": group_protocol}),
                    metrics_port=None, poll_interval_seconds=0.1, max_in_flight=1, max_buffered=2,
                    consume_batch_size=2)
    handled: set[int] = set()
    lock = threading.Lock()
    slow_started = threading.Event()
    second_may_join = threading.Event()
    second_left = threading.Event()

    def consumer() -> Any:
        pipeline = handler._run
        return None if pipeline is None else pipeline.consumer

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, Any]]:
        with lock:
            slow = not slow_started.is_set()
            slow_started.set()
        if slow:
            # Slow: the buffer stays full long enough for a pause in librdkafka, and until the group rebalances.
            _wait_for(lambda: consumer()._hard_paused, 20, "the hard pause")
            second_may_join.set()
            _wait_for(lambda: consumer()._rebalancing, 30, "the rebalance")
        with lock:
            handled.add(message["n"])
            if len(handled) == count:
                handler.stop()
        return [("out", message)]

    def second_member() -> None:
        if not second_may_join.wait(30):
            return
        member = Consumer({"bootstrap.servers": kit.bootstrap, "group.id": group, "enable.auto.commit": False,
                           "auto.offset.reset": "earliest", "group.protocol": group_protocol})
        assigned = threading.Event()
        member.subscribe([source], on_assign=lambda _c, parts: assigned.set() if parts else None)
        try:
            for _ in range(600):  # up to a minute
                member.poll(0.1)  # takes records it never commits: the worker reads them again after it leaves
                if assigned.is_set():
                    break
        finally:
            member.close()  # leaves the group: a second rebalance gives everything back to the worker
            second_left.set()

    joiner = threading.Thread(target=second_member, daemon=True)
    joiner.start()
    try:
        await asyncio.wait_for(handler.run_async(), 90)
    finally:
        handler.stop()
        joiner.join(30)
    assert second_left.is_set(), "the second member joined and left"
    assert handled == set(range(count)), f"{count - len(handled)} message(s) never handled: the worker stalled"
    # An empty partition has nothing to commit: under the consumer protocol the worker may stop before the group
    # hands it back (a heartbeat later), so "no commit" (-1001) is as good as 0 there.
    ends, committed = kit.end_offsets(source, 2), kit.committed(group, source, 2)
    assert all(committed[p] == end or (end == 0 and committed[p] < 0) for p, end in ends.items()), (committed, ends)


async def test_a_backlog_is_consumed_without_waiting_out_librdkafkas_fetch_backoff(kit: Any) -> None:
    """librdkafka postpones a partition's next fetch by fetch.queue.backoff.ms (1,000 ms by default) once its
    prefetch queue is past queued.min.messages; a worker that emptied the queue sooner then waited out the rest of
    the second with nothing to do. The bench lost a third of its throughput to it (one ~0.6 s stall per 200,000
    messages); here fetches and the queue are kept small so that every refill meets the backoff."""
    source = kit.topic("backoff-in")
    sink = kit.topic("backoff-out")
    count = 4_000  # of about 1 KB: 4 MB, fetched a producer batch (up to 1 MB) at a time
    kit.produce(source, [json.dumps({"n": i, "pad": "x" * 1_000}).encode() for i in range(count)])
    engine = Engine(app_name=kit.unique("app"), input_queue="input", output_queues=["out"], metrics_port=None,
                    queue_config=queues(kit, kit.unique("g"), source, {"out": sink},
                                        input_config={"queued.min.messages": 100,
                                                      "max.partition.fetch.bytes": 20_000}))
    calls: list[float] = []
    clock = asyncio.get_running_loop().time

    @engine.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, Any]]:
        calls.append(clock())
        return [("out", message)]

    report = await run(handler, count)
    assert report.acked == count
    longest = max(later - earlier for earlier, later in itertools.pairwise(calls))
    assert longest < 0.5, f"the handler waited {longest:.2f} s for input in the middle of a backlog"
