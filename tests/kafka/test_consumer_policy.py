"""The consumer's fetch and rebalance policy against a scripted stand-in for ``confluent_kafka.Consumer``.

Every ``poll``/``consume`` call of the adapter takes the next step of a script: the rebalance callbacks to
fire inside that call (as librdkafka fires them, on the polling thread, before it returns), then the records
it returns. Commits, pauses, resumes and seeks are recorded, and the fake keeps a partition's pause across
revoke and assign as librdkafka does. So each case below runs the same way every time, independent of a
broker's timing; test_adapter.py and test_races.py cover the real broker and the thread races.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import confluent_kafka
import pytest
from confluent_kafka import TopicPartition
from kafka_fakes import FakeConsumerBase, FakeMessage

from volley.message import Envelope
from volley.ports import PartitionId, QueueSpec
from volley_kafka import KafkaConnector, KafkaConsumer
from volley_kafka import consumer as consumer_module

Key = tuple[str, int]
P0: Key = ("in", 0)
P1: Key = ("in", 1)


@dataclass
class Step:
    """One poll/consume call: callbacks fired inside it, in order, then the records it returns."""

    events: list[tuple[str, list[Key]]] = field(default_factory=list)
    records: list[FakeMessage] = field(default_factory=list)
    errors: list[Any] = field(default_factory=list)  # passed to the error callback first, inside the call


class ScriptedConsumer(FakeConsumerBase):
    """Stands in for ``confluent_kafka.Consumer``; the test scripts what each poll/consume call does."""

    made: list[ScriptedConsumer] = []

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__(config)
        self.steps: deque[Step] = deque()
        self.calls = 0  # poll/consume calls made
        self.commit_error: tuple[str, confluent_kafka.KafkaError] | None = None  # ("raise" | "report", error)
        ScriptedConsumer.made.append(self)

    # the test's side
    def script(self, *events: tuple[str, list[Key]], records: Sequence[FakeMessage] = (),
               errors: Sequence[Any] = ()) -> None:
        with self._cond:
            self.steps.append(Step(list(events), list(records), list(errors)))
            self._cond.notify_all()

    def commits_of(self, key: Key) -> list[int]:
        return [offset for k, offset, _ in self.commits if k == key]

    # the client's side
    def list_topics(self, topic: str | None = None, timeout: float = -1) -> Any:
        raise AssertionError("the tests run without the start-up check")

    def _step(self, timeout: float) -> Step | None:
        with self._cond:
            self.calls += 1
            if not self.steps and timeout > 0:
                self._cond.wait(timeout)  # as librdkafka blocks for up to the timeout when nothing is ready
            return self.steps.popleft() if self.steps else None

    def _run(self, step: Step | None, count: int) -> list[FakeMessage]:
        if step is None:
            return []
        for error in step.errors:
            self.config["error_cb"](error)  # librdkafka serves its error callback inside the call too
        for kind, keys in step.events:
            self.fire(kind, keys)
        assert len(step.records) <= count, "the script returns more records than asked for"
        return step.records

    def consume(self, num_messages: int = 1, timeout: float = -1) -> list[FakeMessage]:
        return list(self._run(self._step(timeout), num_messages))

    def poll(self, timeout: float = -1) -> FakeMessage | None:
        records = self._run(self._step(timeout), 1)
        return records[0] if records else None

    def commit(self, offsets: list[TopicPartition] | None = None, asynchronous: bool = True) -> Any:
        if self.commit_error is None:
            return super().commit(offsets, asynchronous)
        how, error = self.commit_error
        if how == "raise":
            raise confluent_kafka.KafkaException(error)
        if how == "partitions":  # no top-level error: each partition carries it (a TopicPartition's error)
            refused = [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=tp.offset, error=error)
                       for tp in offsets or ()]
            self.config["on_commit"](None, refused)
            return None
        self.config["on_commit"](error, list(offsets or ()))  # the commit callback, on the polling thread
        return None

    def committed(self, partitions: list[TopicPartition], timeout: float = -1) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]

    def get_watermark_offsets(self, partition: TopicPartition, timeout: float = -1,
                              cached: bool = False) -> tuple[int, int]:
        return 0, 0

    def position(self, partitions: list[TopicPartition]) -> list[TopicPartition]:
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in partitions]


def records(key: Key, *offsets: int) -> list[FakeMessage]:
    return [FakeMessage(*key, o) for o in offsets]


@pytest.fixture
def scripted(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    monkeypatch.setattr(confluent_kafka, "Consumer", ScriptedConsumer)
    ScriptedConsumer.made = []
    yield
    ScriptedConsumer.made = []


async def member(**extra: Any) -> tuple[KafkaConsumer, ScriptedConsumer]:
    config = {"bootstrap.servers": "fake:9092", "group.id": "g", "volley.commit.interval.seconds": 0.0,
              "volley.startup.timeout.seconds": 0, **extra}
    queue = QueueSpec(name="in", value="in", connector="confluent", config=config, app_name="policy-test",
                      role="input")
    consumer = KafkaConnector().create_consumer(queue)
    await consumer.start()
    fakes = [c for c in ScriptedConsumer.made if c.callbacks]
    assert len(fakes) == 1, "one group member subscribed"
    return consumer, fakes[0]


async def fetch(consumer: KafkaConsumer) -> list[Envelope]:
    """One consume() of the adapter: exactly one scripted step (no waiting)."""
    return list(await consumer.consume(100, 0))


def positions(envelopes: Sequence[Envelope]) -> list[tuple[Key, int]]:
    return [((str(e.source), int(e.partition or 0)), int(e.position)) for e in envelopes]


async def test_records_fetched_before_a_revoke_inside_the_same_call_are_dropped(scripted: None) -> None:
    """librdkafka returns what it had collected before a rebalance callback ran inside the call: those records
    belong to a partition no longer ours. The revoke's own commit covers what the engine finished."""
    consumer, fake = await member()
    try:
        fake.script(("assign", [P0, P1]), records=records(P0, 0, 1) + records(P1, 0))
        first = await fetch(consumer)
        assert positions(first) == [(P0, 0), (P0, 1), (P1, 0)], "records of a partition assigned in the same call"
        finished: list[Sequence[PartitionId]] = []

        async def drain(partitions: Sequence[PartitionId]) -> None:
            finished.append(list(partitions))
            await consumer.ack([e for e in first if e.partition == 0])

        consumer.set_revoke_handler(drain)
        fake.script(("revoke", [P0]), records=records(P0, 2, 3) + records(P1, 1))
        second = await fetch(consumer)
        assert finished == [[P0]], "the engine's revoke handler ran inside the call"
        assert positions(second) == [(P1, 1)], "nothing of the revoked partition is handed out"
        assert (P0, 2, False) in fake.commits, "the revoke committed what the engine finished, synchronously"
    finally:
        await consumer.close()


async def test_stale_records_of_a_revoked_partition_from_a_later_call_never_reach_the_engine(scripted: None) -> None:
    """FakeMessages of a partition revoked in an earlier call (prefetched before the revoke) come back from a later
    poll: the engine must not get them, and nothing of that partition is tracked or committed afterwards."""
    consumer, fake = await member()
    try:
        fake.script(("assign", [P0, P1]), records=records(P0, 0) + records(P1, 0))
        first = await fetch(consumer)
        fake.script(("revoke", [P0]))
        assert await fetch(consumer) == []
        fake.script(records=records(P0, 1, 2) + records(P1, 1))  # a later call: P0's are stale
        later = await fetch(consumer)
        assert positions(later) == [(P1, 1)]
        fake.script(records=records(P0, 3))  # a whole call of nothing but stale records
        assert await fetch(consumer) == []
        before = len(fake.commits)
        await consumer.ack(first + later)
        assert await fetch(consumer) == []
        assert [c for c in fake.commits[before:] if c[0] == P0] == [], "no commit of the revoked partition"
        assert fake.commits_of(P1)[-1] == 2
        assert consumer.lag().keys() <= {P1}
    finally:
        await consumer.close()
    assert fake.commits_of(P0) == [], "nor at close"


async def test_a_rebalance_inside_the_waiting_poll_is_handled_before_its_record(scripted: None) -> None:
    """No record ready: the fetch waits in poll(), and the assignment arrives inside that poll together with
    the first record; the rest of the batch follows from consume()."""
    consumer, fake = await member()
    try:
        fake.script()  # the first consume(): nothing ready
        fake.script(("assign", [P0]), records=records(P0, 5))  # the waiting poll
        fake.script(records=records(P0, 6, 7))  # what followed it
        got = list(await consumer.consume(10, 5.0))
        assert positions(got) == [(P0, 5), (P0, 6), (P0, 7)]
        await consumer.ack(got)
        assert await fetch(consumer) == []
        assert fake.commits_of(P0) == [8]
    finally:
        await consumer.close()


@pytest.mark.parametrize("resumed", ["while revoked", "while assigned again", "never"])
async def test_the_pause_after_revoke_and_reassign_is_the_engines(scripted: None, resumed: str,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """The engine pauses (a full buffer), the partition is revoked and assigned back. librdkafka keeps the
    pause across both; after every call librdkafka's pause state must be what the engine wants."""
    monkeypatch.setattr(consumer_module, "HARD_PAUSE_AFTER", 0.0)
    consumer, fake = await member()
    engine_paused = False

    async def call() -> list[Envelope]:
        got = await fetch(consumer)
        want = set(fake.assigned) if engine_paused else set()
        assert fake.paused & fake.assigned == want, f"librdkafka paused {fake.paused}, the engine wants {want}"
        return got

    try:
        fake.script(("assign", [P0]), records=records(P0, 0, 1))
        first = await call()
        consumer.pause()
        engine_paused = True
        fake.script()
        await call()
        assert P0 in fake.paused

        async def drain(partitions: Sequence[PartitionId]) -> None:
            nonlocal engine_paused
            await consumer.ack(first)
            if resumed == "while revoked":
                consumer.resume()
                engine_paused = False

        consumer.set_revoke_handler(drain)
        fake.script(("revoke", [P0]))
        await call()
        fake.script(("assign", [P0]))
        await call()
        if resumed == "while assigned again":
            consumer.resume()
            engine_paused = False
        fake.script(records=records(P0, 2) if not engine_paused else [])
        again = await call()
        if resumed == "never":
            assert P0 in fake.paused, "still paused in librdkafka, as the engine wants"
        else:
            assert P0 not in fake.paused
            assert positions(again) == [(P0, 2)]
    finally:
        await consumer.close()


async def test_a_partition_assigned_while_a_nack_delay_runs_elsewhere_flows(scripted: None) -> None:
    """A delay pauses only its own partition: a partition assigned meanwhile is resumed, the delayed one not."""
    consumer, fake = await member()
    try:
        fake.script(("assign", [P0]), records=records(P0, 0))
        first = await fetch(consumer)
        await consumer.nack(first, 3600.0)
        fake.script()
        await fetch(consumer)
        assert P0 in fake.paused
        assert fake.seeks == [(P0, 0)]
        fake.script(("assign", [P1]))
        await fetch(consumer)
        assert P0 in fake.paused and P1 not in fake.paused
    finally:
        await consumer.close()


async def test_no_commit_of_a_lost_partition_even_for_work_finished_while_losing_it(scripted: None) -> None:
    """Lost (session timeout, fenced): the partition already belongs to someone else, so what the engine
    finishes while it is being let go, and any late ack, must not be committed."""
    consumer, fake = await member()
    try:
        fake.script(("assign", [P0, P1]), records=records(P0, 0, 1) + records(P1, 0))
        first = await fetch(consumer)

        async def drain(partitions: Sequence[PartitionId]) -> None:
            await consumer.ack([e for e in first if e.partition == 0 and e.position == 0])

        consumer.set_revoke_handler(drain)
        fake.script(("lost", [P0]))
        assert await fetch(consumer) == []
        await consumer.ack(first)  # late: P0's second record, and P1's
        fake.script()
        assert await fetch(consumer) == []
        assert fake.commits_of(P1) == [1]
    finally:
        await consumer.close()
    assert fake.commits_of(P0) == [], "a lost partition is never committed, not even at close"


async def test_a_commit_queued_before_a_revoke_goes_out_before_the_revokes_own(scripted: None) -> None:
    """Commits queued by acks go out in order, and the revoke's synchronous commit is the last of the
    partition: nothing of it is sent after the partition was given up."""
    consumer, fake = await member()
    try:
        fake.script(("assign", [P0]), records=records(P0, 0, 1, 2))
        first = await fetch(consumer)
        await consumer.ack(first[:1])  # queued; the next fetch sends it

        async def drain(partitions: Sequence[PartitionId]) -> None:
            await consumer.ack(first[1:2])  # queued while the revoke waits
            await consumer.nack(first[2:], 0.0)  # a seek queued for a partition about to go

        consumer.set_revoke_handler(drain)
        fake.script(("revoke", [P0]))
        await fetch(consumer)
        given_up = len(fake.commits)
        assert fake.commits[-1] == (P0, 2, False), "the revoke's final commit is the last one"
        assert fake.commits_of(P0) == sorted(fake.commits_of(P0)), "never backwards"
        await consumer.ack(first[2:])  # the engine acks late
        fake.script()
        await fetch(consumer)
        assert fake.commits[given_up:] == []
        assert fake.seeks == [], "no seek carried out for a partition given up"
    finally:
        await consumer.close()
    assert fake.commits[given_up:] == [], "nor at close"


async def test_a_partition_revoked_and_assigned_back_in_one_call_starts_clean(scripted: None) -> None:
    """Incremental rebalance: revoked and assigned back inside the same call. Nothing of the old assignment
    (finished offsets, attempts, a seek queued by a nack in the revoke's drain) carries over: the records
    read again are new deliveries, from the offset the revoke committed."""
    consumer, fake = await member()
    try:
        fake.script(("assign", [P0]), records=records(P0, 0, 1, 2))
        first = await fetch(consumer)

        async def drain(partitions: Sequence[PartitionId]) -> None:
            await consumer.ack(first[:1])
            await consumer.nack(first[2:], 0.0)  # offset 1 is still running and is abandoned

        consumer.set_revoke_handler(drain)
        fake.script(("revoke", [P0]), ("assign", [P0]))
        assert await fetch(consumer) == []
        assert fake.commits[-1] == (P0, 1, False)
        assert fake.seeks == [], "the nack's seek belonged to the old assignment"
        fake.script(records=records(P0, 1, 2))
        again = await fetch(consumer)
        assert positions(again) == [(P0, 1), (P0, 2)]
        assert [e.attempt for e in again] == [1, 1], "first deliveries of this assignment"
    finally:
        await consumer.close()


# ================================================================== fatal errors (static member fenced)

FENCED = ("Fatal error: Broker: Static consumer fenced by other consumer with same group.instance.id: "
          "OffsetCommit failed: Broker: Static consumer fenced by other consumer with same group.instance.id")


def fatal_error() -> confluent_kafka.KafkaError:
    """A consumer's fatal error as confluent-kafka hands it over (error callback, a record's ``error()``, a failed
    commit): the code ``_FATAL`` with ``fatal()`` false, the underlying error only in its text."""
    error = confluent_kafka.KafkaError(confluent_kafka.KafkaError._FATAL, FENCED)
    assert not error.fatal(), "confluent-kafka's consumer errors never say fatal() (checked against librdkafka 2.16)"
    return error


class ErrorRecord(FakeMessage):
    """What ``consume`` returns for an error: a message whose ``error()`` is set."""

    __slots__ = ("_error",)

    def __init__(self, error: confluent_kafka.KafkaError) -> None:
        super().__init__("in", -1, -1001)
        self._error = error

    def error(self) -> Any:  # type: ignore[override]  # the real Message returns the error here
        return self._error


@pytest.mark.parametrize("arrives", ["record", "error-callback", "commit-raises", "commit-callback"])
async def test_a_fatal_consumer_error_ends_consuming_with_a_clear_error(scripted: None, arrives: str) -> None:
    """librdkafka's consumer dies for good on a fatal error (a static member fenced: FENCED_INSTANCE_ID). It
    must end the run, through ``consume``, whichever way the error arrives: a worker that stays alive and
    consumes nothing looks healthy and does nothing (the bug: ``KafkaError.fatal()`` is false on all of these)."""
    from volley.errors import ConsumerFailedError

    consumer, fake = await member(**{"group.instance.id": "worker-0"})
    try:
        fake.script(("assign", [P0]), records=records(P0, 0, 1))
        await consumer.ack(await fetch(consumer))  # a commit is queued: the next fetch sends it
        if arrives == "record":
            fake.script(records=[ErrorRecord(fatal_error())])
        elif arrives == "error-callback":
            fake.script(errors=[fatal_error()])
        else:
            fake.commit_error = ("raise" if arrives == "commit-raises" else "report", fatal_error())
            fake.script()
        assert await fetch(consumer) == []
        fake.script()
        with pytest.raises(ConsumerFailedError) as failed:
            await fetch(consumer)
        message = str(failed.value)
        assert "Static consumer fenced" in message, message
        assert "restart the process" in message and "group.instance.id" in message, message
        with pytest.raises(ConsumerFailedError):
            await fetch(consumer)  # and every call after it
    finally:
        await consumer.close()
    assert fake.closed


async def test_an_engine_whose_kafka_consumer_fails_for_good_stops_and_raises(scripted: None) -> None:
    """End to end through the engine's port: what was consumed before the fatal error is handled, then the run
    ends by raising ConsumerFailedError (``volley run`` exits 1) instead of running on with a dead consumer."""
    from volley import ConsumerFailedError, Engine, MemoryBroker

    broker = MemoryBroker()
    app = Engine(
        app_name="fatal-test", input_queue="in", output_queues=["out"],
        queue_config={
            "in": {"value": "in", "profile": "confluent", "serializer": "none", "model_handler": "none", "config": {
                "bootstrap.servers": "fake:9092", "group.id": "g", "volley.startup.timeout.seconds": 0}},
            "out": {"value": "out", "profile": "memory", "serializer": "none", "model_handler": "none",
                    "config": {"broker": broker}},
        },
        metrics_port=None, poll_interval_seconds=0.05,
    )

    @app.stream_app
    def handler(message: Any) -> list[tuple[str, Any]]:
        return [("out", message)]

    run = asyncio.ensure_future(handler.run_async())
    fake = await wait_for_member()
    fake.script(("assign", [P0]), records=records(P0, 0))  # one record a call: the engine may ask for one
    fake.script(records=records(P0, 1))
    fake.script(records=records(P0, 2))
    fake.script(records=[ErrorRecord(fatal_error())])
    with pytest.raises(ConsumerFailedError, match="Static consumer fenced"):
        await asyncio.wait_for(run, 30)  # before the fix: still running, consuming nothing
    assert broker.depth("out") == 3, "what came before the fatal error was handled"
    assert fake.closed


async def wait_for_member(within: float = 10.0) -> ScriptedConsumer:
    deadline = asyncio.get_running_loop().time() + within
    while True:
        subscribed = [c for c in ScriptedConsumer.made if c.callbacks]
        if subscribed:
            return subscribed[0]
        assert asyncio.get_running_loop().time() < deadline, "the engine never subscribed"
        await asyncio.sleep(0.01)  # polling for the engine's start-up, with a deadline


@pytest.mark.parametrize("how", ["report", "partitions"])
@pytest.mark.parametrize(("code", "rebalance"), [(confluent_kafka.KafkaError.UNKNOWN_MEMBER_ID, True),
                                                 (confluent_kafka.KafkaError.ILLEGAL_GENERATION, True),
                                                 (confluent_kafka.KafkaError.REQUEST_TIMED_OUT, False)])
async def test_a_commit_refused_for_a_rebalance_says_what_becomes_of_it(scripted: None, code: int, rebalance: bool,
                                                                        how: str,
                                                                        caplog: pytest.LogCaptureFixture) -> None:
    """A commit the group refuses because this member was removed from it, or its generation is over, is not
    "retried with the next one" for partitions the rebalance takes away: their new owner reads them again from
    the last committed offset. The warning says so; other failures are retried as it said before. The same when
    librdkafka reports the refusal on each partition only, with no error for the whole commit ("partitions"):
    the warning said "partition errors" and "retried with the next one" whatever the partitions' error was."""
    consumer, fake = await member()
    try:
        fake.script(("assign", [P0]), records=records(P0, 0, 1))
        await consumer.ack(await fetch(consumer))  # a commit is queued: the next fetch sends it
        fake.commit_error = (how, confluent_kafka.KafkaError(code))
        fake.script()
        with caplog.at_level("WARNING", logger="volley_kafka"):
            assert await fetch(consumer) == []
            deadline = asyncio.get_running_loop().time() + 10
            while not any("commit failed" in r.getMessage() for r in caplog.records):
                assert asyncio.get_running_loop().time() < deadline, "no warning about the failed commit"
                await asyncio.sleep(0.01)
        warning = next(r.getMessage() for r in caplog.records if "commit failed" in r.getMessage())
        assert confluent_kafka.KafkaError(code).str() in warning, warning
        if rebalance:
            assert "retried with the next one" not in warning, warning
            assert "rebalance" in warning and "read again" in warning and "still owns" in warning, warning
        else:
            assert "retried with the next one" in warning, warning
    finally:
        fake.commit_error = None
        await consumer.close()
