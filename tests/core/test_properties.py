"""Property-based tests of the engine over random handler behaviour and random delivery latencies.

For any mix of outputs to several queues, raising, returning False, async
delays and slow broker confirmations:
- no input is acknowledged before every one of its outputs is confirmed,
- inputs of one key reach the handler in order (first attempts),
- the DLQ receives exactly the inputs whose handling failed for good,
- every input ends acknowledged, dead-lettered or given back (reported).
"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from volley import Engine, MemoryBroker
from volley.memory import MemoryConnector, MemoryConsumer, MemoryProducer
from volley.message import Envelope, OutgoingMessage
from volley.ports import DeliveryCallback, QueueSpec


@dataclass
class Job:
    id: int
    key: str
    action: str  # "ok", "fanout", "raise", "false", "flaky"
    delay_ms: int


class Ledger:
    """Records confirmations and acks as the broker sees them, to check the ordering of the two."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.confirmed: dict[int, int] = {}  # input id -> outputs confirmed
        self.expected: dict[int, int] = {}
        self.violations: list[str] = []
        self.acked: list[int] = []


class SlowProducer(MemoryProducer):
    """Confirms deliveries after random delays, from a timer thread, as a real broker would."""

    def __init__(self, broker: MemoryBroker, ledger: Ledger, rng: random.Random) -> None:
        super().__init__(broker)
        self.ledger = ledger
        self.rng = rng
        self.timers: list[threading.Timer] = []

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        for message in messages:
            delay = self.rng.choice([0.0, 0.0, 0.001, 0.005])

            def confirm(m: OutgoingMessage = message) -> None:
                def record(delivered: Sequence[OutgoingMessage], failed: Sequence[Any]) -> None:
                    input_id = _input_id(m)
                    if input_id is not None and m.topic != "dlq":
                        with self.ledger.lock:
                            self.ledger.confirmed[input_id] = self.ledger.confirmed.get(input_id, 0) + 1
                    on_delivery(delivered, failed)

                MemoryProducer.produce(self, [m], record)

            timer = threading.Timer(delay, confirm)
            timer.daemon = True
            self.timers.append(timer)
            timer.start()

    async def flush(self, timeout: float) -> None:
        for timer in self.timers:
            await asyncio.to_thread(timer.join, timeout)


def _input_id(message: OutgoingMessage) -> int | None:
    token = message.token
    if isinstance(token, Envelope):
        import json

        try:
            return int(json.loads(token.value)["id"])
        except (ValueError, KeyError, TypeError):
            return None
    return None


class CheckingConsumer(MemoryConsumer):
    def __init__(self, broker: MemoryBroker, queue: str, ledger: Ledger) -> None:
        super().__init__(broker, queue)
        self.ledger = ledger

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        import json

        with self.ledger.lock:
            for env in envelopes:
                job_id = int(json.loads(env.value)["id"])
                self.ledger.acked.append(job_id)
                expected = self.ledger.expected.get(job_id, 0)
                if self.ledger.confirmed.get(job_id, 0) < expected:
                    self.ledger.violations.append(f"job {job_id} acked before its {expected} outputs confirmed")
        await super().ack(envelopes)


class CheckingConnector(MemoryConnector):
    def __init__(self, broker: MemoryBroker, ledger: Ledger, rng: random.Random) -> None:
        self.broker, self.ledger, self.rng = broker, ledger, rng
        self.producer = SlowProducer(broker, ledger, rng)

    def create_consumer(self, queue: QueueSpec) -> MemoryConsumer:
        return CheckingConsumer(self.broker, queue.value, self.ledger)

    def create_producer(self, queue: QueueSpec) -> MemoryProducer:
        return self.producer


jobs_strategy = st.lists(
    st.builds(Job, id=st.just(0), key=st.sampled_from(["a", "b", "c", "d"]),
              action=st.sampled_from(["ok", "ok", "fanout", "raise", "false", "flaky"]),
              delay_ms=st.sampled_from([0, 0, 1, 3])),
    min_size=1, max_size=40,
)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(jobs=jobs_strategy, use_async=st.booleans(), seed=st.integers(0, 2**16))
def test_engine_invariants_under_random_behaviour(jobs: list[Job], use_async: bool, seed: int) -> None:
    for index, job in enumerate(jobs):
        job.id = index
    rng = random.Random(seed)
    broker = MemoryBroker(partitions=2)
    ledger = Ledger()
    connector = CheckingConnector(broker, ledger, rng)
    queues: dict[str, Any] = {
        name: {"value": name, "connector": None, "consumer": connector, "producer": connector,
               "serializer": "json", "model_handler": "dataclass", "data_model": model}
        for name, model in (("in", Job), ("out", dict), ("audit", dict))
    }
    queues["dlq"] = {"value": "dlq", "consumer": connector, "producer": connector}
    queues["in"]["ordering"] = "key"
    engine = Engine(app_name="prop", input_queue="in", output_queues=["out", "audit"], dead_letter_queue="dlq",
                    queue_config=queues, metrics_port=None, poll_interval_seconds=0.01, max_retries=1,
                    retry_backoff_seconds=0.0, max_deliveries=2, redelivery_delay_seconds=0.0,
                    consume_batch_size=rng.choice([1, 3, 50]), max_in_flight=rng.choice([1, 4, 16]))
    first_seen: dict[str, list[int]] = {}
    flaky_calls: dict[int, int] = {}
    for job in jobs:
        ledger.expected[job.id] = {"ok": 1, "fanout": 2}.get(job.action, 0) if job.action != "flaky" else 1
        broker.publish("in", engine.input.encode(job), key=job.key.encode())

    def behave(job: Job) -> Any:
        if flaky_calls.get(job.id) is None:
            first_seen.setdefault(job.key, []).append(job.id)
        flaky_calls[job.id] = flaky_calls.get(job.id, 0) + 1
        if job.action == "raise":
            raise RuntimeError(f"job {job.id}")
        if job.action == "flaky" and flaky_calls[job.id] == 1:
            raise RuntimeError("first try fails")
        if job.action == "false":
            return False
        outputs: list[tuple[str, dict[str, int]]] = [("out", {"id": job.id})]
        if job.action == "fanout":
            outputs.append(("audit", {"id": job.id}))
        return outputs

    if use_async:
        @engine.stream_app
        async def handler(job: Job) -> Any:
            await asyncio.sleep(job.delay_ms / 1000)
            return behave(job)
    else:
        @engine.stream_app
        def handler(job: Job) -> Any:
            return behave(job)

    report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.1)

    assert ledger.violations == []
    failing = {j.id for j in jobs if j.action in ("raise", "false")}
    succeeding = {j.id for j in jobs} - failing
    import json

    dead_ids = sorted(json.loads(v)["id"] for v in broker.produced("dlq"))
    assert dead_ids == sorted(failing)  # "false" exhausts max_deliveries, "raise" exhausts retries
    assert sorted(set(ledger.acked)) == sorted(j.id for j in jobs)  # everything ends acked (DLQ'd ones too)
    assert sorted(json.loads(v)["id"] for v in broker.produced("out")) == sorted(succeeding)
    assert report.consumed == report.settled
    for key, ids in first_seen.items():
        assert ids == sorted(ids), f"key {key} out of order: {ids}"
