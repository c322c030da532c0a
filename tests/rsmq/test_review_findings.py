"""volley-rsmq defects found by a review (session 31): each test failed on the code before its fix."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from collections import Counter
from typing import Any

import pytest
import redis

from volley import Engine
from volley.message import OutgoingMessage
from volley.ports import QueueSpec
from volley_rsmq import RsmqClient, RsmqConnector, parse_settings

pytestmark = pytest.mark.redis


def seed(config: dict[str, Any], qname: str, count: int) -> list[bytes]:
    client = RsmqClient(parse_settings(config, qname, "output"))
    bodies = [json.dumps({"id": i}).encode() for i in range(count)]
    try:
        client.send(qname, [(None, body) for body in bodies])
    finally:
        client.close()
    return bodies


def raw_queue(config: dict[str, Any], value: str, **extra: Any) -> dict[str, Any]:
    return {"value": value, "connector": "rsmq", "serializer": "none", "model_handler": "none",
            "config": {**config, **extra}}


# ---------------------------------------------------------------------- 1. prefetch outlives vt


def test_without_heartbeat_a_fast_handler_never_sees_a_message_twice(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    """heartbeat: false, vt 1 s, a handler that takes 10 ms per message: far below vt. The docs promise
    duplicates only when vt expires *while the message is being processed*; here none is processed for
    more than 10 ms, yet the engine prefetches up to max_buffered (2000) messages, hides all of them for vt,
    and the tail of that buffer expires before the handler begins it: it is received again and handled twice.
    """
    source = qname + "-in"
    bodies = seed(rsmq_config, source, 300)  # 300 x 10 ms = 3 s of work, 3 vt
    app = Engine(app_name="review-prefetch", input_queue="in", output_queues=[],
                 queue_config={"in": raw_queue(rsmq_config, source, vt=1, heartbeat=False)},
                 metrics_port=None, poll_interval_seconds=0.05)
    seen: Counter[bytes] = Counter()

    @app.stream_app
    def handler(message: bytes) -> bool:
        seen[message] += 1
        time.sleep(0.01)  # the handler's own work, well under vt
        return True

    report = handler.run_until_drained(timeout=60, drain_idle_seconds=0.5)
    assert set(seen) == set(bodies)
    twice = sorted(m for m, n in seen.items() if n > 1)
    assert not twice, (f"{len(twice)} of {len(bodies)} messages were handled more than once although each "
                       f"took 10 ms with vt=1 s (consumed {report.consumed})")


def test_without_heartbeat_a_handler_that_never_fails_sends_nothing_to_the_dlq(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    """The same prefetch, worse: a buffered message keeps expiring and being received again while it waits,
    its receive count climbs past max_deliveries, and deliveries of a message the handler never failed on
    (and already handled) are dead-lettered with volley-error-stage: redelivery."""
    source, dlq = qname + "-in", qname + "-dlq"
    seed(rsmq_config, source, 200)  # 200 x 10 ms = 2 s = 10 vt
    app = Engine(app_name="review-prefetch-dlq", input_queue="in", output_queues=[], dead_letter_queue="dlq",
                 queue_config={"in": raw_queue(rsmq_config, source, vt=0.2, heartbeat=False),
                               "dlq": {"value": dlq, "profile": "rsmq-dlq", "config": rsmq_config}},
                 metrics_port=None, poll_interval_seconds=0.05, max_deliveries=3)

    @app.stream_app
    def handler(message: bytes) -> bool:
        time.sleep(0.01)  # the handler's own work, well under vt
        return True

    report = handler.run_until_drained(timeout=60, drain_idle_seconds=0.5)
    assert report.dead_lettered == 0 and raw_redis.zcard(f"rsmq:{dlq}") == 0, (
        f"{report.dead_lettered} deliveries dead-lettered although the handler never failed")


# ---------------------------------------------------------------------- 2. close is not bounded when Redis hangs


async def test_close_returns_within_close_timeout_when_redis_stops_answering(
    private_redis: Any, qname: str
) -> None:
    """A Redis that accepts connections but never answers (frozen, a blocking script, a half-open network):
    the docs bound closing by close_timeout_seconds ("waits up to close_timeout_seconds"); the engine's
    shutdown_timeout_seconds is meant to hold. Here close_timeout_seconds is 1 s."""
    import os
    import signal

    config = {"host": "127.0.0.1", "port": private_redis.port, "vt": 30, "close_timeout_seconds": 1,
              "delivery_timeout_seconds": 1, "retry_backoff_seconds": 0.02}
    connector = RsmqConnector()
    consumer = connector.create_consumer(QueueSpec("in", qname, "rsmq", config))
    producer = connector.create_producer(QueueSpec("out", qname, "rsmq", config))
    await consumer.start()
    await producer.start()
    seed(config, qname, 1)
    got: list[Any] = []
    deadline = time.monotonic() + 10
    while not got:
        assert time.monotonic() < deadline
        got = list(await consumer.consume(1, 0.2))
    assert consumer.held_count() == 1
    assert private_redis.process is not None
    os.kill(private_redis.process.pid, signal.SIGSTOP)
    try:
        producer.produce([OutgoingMessage(qname, b"never confirmed")], lambda ok, failed: None)

        async def timed(close: Any) -> float:
            started = time.monotonic()
            await close()
            return time.monotonic() - started

        consumer_took, producer_took = await asyncio.gather(timed(consumer.close), timed(producer.close))
    finally:
        os.kill(private_redis.process.pid, signal.SIGCONT)
    assert consumer_took < 6 and producer_took < 6, (
        f"close took {consumer_took:.1f} s (consumer) and {producer_took:.1f} s (producer) with "
        "close_timeout_seconds=1")


# ---------------------------------------------------------------------- 3. receive retries do not back off


async def test_receives_during_a_redis_outage_back_off_up_to_one_second(private_redis: Any, qname: str) -> None:
    """connectors/rsmq.md: retry_backoff_seconds is the "first pause after a Redis error, doubled up to 1 s".
    During an outage the consumer's receives should thin out to about one a second, not hammer a recovering
    server (each receive is two connection attempts: redis-py retries once)."""
    config = {"host": "127.0.0.1", "port": private_redis.port, "retry_backoff_seconds": 0.05}
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", config))
    await consumer.start()
    client = consumer._client
    assert client is not None
    attempts = 0
    real_receive = client.receive

    def counting_receive(*args: Any, **kwargs: Any) -> Any:
        nonlocal attempts
        attempts += 1
        return real_receive(*args, **kwargs)

    client.receive = counting_receive  # type: ignore[method-assign]
    private_redis.stop()
    try:
        # What the engine's fetch loop does: consume again as soon as a consume returns nothing.
        window_ends = time.monotonic() + 3.0
        while time.monotonic() < window_ends:
            assert await consumer.consume(10, max(0.0, window_ends - time.monotonic())) == []
    finally:
        private_redis.start()
        await consumer.close()
    # 0.05 + 0.1 + 0.2 + 0.4 + 0.8 + 1.0 ... : about 6 attempts in 3 s; allow twice that.
    assert attempts <= 12, f"{attempts} receive attempts in 3 s of outage (about {attempts / 3:.0f}/s)"


# ---------------------------------------------------------------------- 4. queue attributes silently replaced


@pytest.mark.parametrize(("key", "value", "field"), [("maxsize", 100, b"maxsize"), ("vt", 20_000_000, b"vt")])
async def test_a_consumer_creates_its_queue_with_the_configured_attributes_or_refuses_the_config(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis, key: str, value: int, field: bytes
) -> None:
    """connectors/rsmq.md: queues are created "with the configured vt, delay and maxsize"; "a value of the wrong
    type is a ConfigurationError when the Engine is built". PyRSMQ's createQueue (used by the consumer's start)
    silently replaces values outside its ranges (maxsize 1024..65565 or -1, vt/delay 0..9999999) by its
    defaults, while the producer's SEND script stores them as given: the queue's attributes depend on who
    created it, and nobody is told."""
    from volley.errors import ConfigurationError

    spec = QueueSpec("in", qname, "rsmq", {**rsmq_config, key: value})
    connector = RsmqConnector()
    try:
        connector.check(spec)
    except ConfigurationError:
        return  # refused up front: fine
    consumer = connector.create_consumer(spec)
    await consumer.start()
    try:
        stored = raw_redis.hget(f"rsmq:{qname}:Q", field)
    finally:
        await consumer.close()
    assert stored == str(value).encode(), f"config {key}={value} accepted, but the queue was created with {stored!r}"


# ---------------------------------------------------------------------- 5. a receive finishing during close


async def test_messages_of_a_receive_that_finishes_during_close_are_released_not_hidden_for_vt(
    rsmq_config: dict[str, Any], qname: str
) -> None:
    """The engine cancels its poll at shutdown ("safe: what it would have returned was never acknowledged"),
    but the receive goes on in the consumer's thread. close() releases what is held *before* waiting for that
    thread, so a receive that completes meanwhile (Redis slow to answer) hides its messages for the whole vt
    (an hour, with a vt chosen for slow handlers), instead of being "visible again at once"."""
    config = {**rsmq_config, "vt": 60}
    connector = RsmqConnector()
    consumer = connector.create_consumer(QueueSpec("in", qname, "rsmq", config))
    await consumer.start()
    seed(config, qname, 3)
    client = consumer._client
    assert client is not None
    entered, gate = threading.Event(), threading.Event()
    real_receive = client.receive

    def slow_receive(*args: Any, **kwargs: Any) -> Any:
        entered.set()
        gate.wait(10)  # Redis slow to answer; the script has not run yet
        return real_receive(*args, **kwargs)

    client.receive = slow_receive  # type: ignore[method-assign]
    poll = asyncio.create_task(consumer.consume(10, 5.0))
    assert await asyncio.to_thread(entered.wait, 5)
    poll.cancel()  # the engine's shutdown step 1
    closing = asyncio.create_task(consumer.close())
    deadline = time.monotonic() + 5
    while not consumer._closed:  # close() has begun (the reviewed code has released what it held by now)
        assert time.monotonic() < deadline
        await asyncio.sleep(0.01)
    gate.set()
    await closing

    other = connector.create_consumer(QueueSpec("in", qname, "rsmq", config))
    await other.start()
    try:
        got: list[Any] = []
        deadline = time.monotonic() + 3
        while len(got) < 3 and time.monotonic() < deadline:
            got.extend(await other.consume(10, 0.2))
    finally:
        await other.close()
    assert len(got) == 3, f"{3 - len(got)} of 3 messages stay hidden for vt=60 s after the consumer closed"


# ---------------------------------------------------------------- found by a bug hunt, session 38


async def test_a_handler_error_text_that_is_not_utf8_does_not_stop_settling(
        rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis) -> None:
    """The give-back reason is the handler's error text; one holding a lone surrogate (bytes decoded with
    surrogateescape) made redis-py raise UnicodeEncodeError, which killed the settler thread: no delete, give-back
    or heartbeat any more (the worker stalled once its pending deletes filled up)."""
    client = RsmqClient(parse_settings(rsmq_config, qname, "output"))
    client.send(qname, [(None, b"a"), (None, b"b")])
    client.close()
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", {**rsmq_config, "vt": 30},
                                                         role="input"))
    await consumer.start()
    try:
        batch = await consumer.consume(10, 1.0)
        assert len(batch) == 2
        await consumer.nack_with_reason([batch[0]], 0, "ValueError: cannot parse " +
                                        b"\xff".decode("utf-8", "surrogateescape"))
        await consumer.ack([batch[1]])
        deadline = time.monotonic() + 10
        while raw_redis.zcard(f"rsmq:{qname}") != 1:  # the acked one deleted
            assert time.monotonic() < deadline and consumer._settler.is_alive(), "the settler stopped settling"
            await asyncio.sleep(0.02)
        again = await consumer.consume(10, 2.0)  # the one given back is visible at once, its reason kept
        assert [e.value for e in again] == [b"a"]
        assert again[0].headers is not None and b"cannot parse \\udcff" in again[0].headers["volley-last-error"]
    finally:
        await consumer.close()


async def test_a_header_name_that_is_not_utf8_does_not_stop_the_sender(rsmq_config: dict[str, Any],
                                                                       qname: str) -> None:
    """headers: envelope. A header name with a lone surrogate raised UnicodeEncodeError in the sender thread, which
    died: that record and every later one were never reported, and flush and close timed out. The envelope now
    writes such a name escaped (and a record it could not write would fail alone, as InvalidRecordError)."""
    producer = RsmqConnector().create_producer(QueueSpec("out", qname, "rsmq", {**rsmq_config, "headers": "envelope"},
                                                         role="output"))
    await producer.start()
    reports: list[tuple[Any, Any]] = []
    try:
        producer.produce([OutgoingMessage(qname, b"v", None, {"n\udcff": b"x"})],
                         lambda ok, bad: reports.append((ok, bad)))
        producer.produce([OutgoingMessage(qname, b"fine")], lambda ok, bad: reports.append((ok, bad)))
        await producer.flush(10)
        assert [exc for _, bad in reports for _, exc in bad] == []
        assert sorted(m.value for ok, _ in reports for m in ok) == [b"fine", b"v"]
    finally:
        await producer.close()


def test_an_output_over_maxsize_sends_its_input_to_the_dlq_at_stage_output(rsmq_config: dict[str, Any], qname: str,
                                                                          raw_redis: redis.Redis) -> None:
    """A record over the queue's maxsize was refused with a plain DeliveryError: produced again, then its input
    given back and handled again and again (or the app stopped), instead of dead-lettered at stage output as a
    record refused for itself (InvalidRecordError) is on the other brokers."""
    source, out, dlq = qname + "-in", qname + "-out", qname + "-dlq"
    client = RsmqClient(parse_settings(rsmq_config, source, "output"))
    client.send(source, [(None, b"one")])
    client.close()
    app = Engine(app_name="oversize", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                 queue_config={"in": raw_queue(rsmq_config, source), "out": raw_queue(rsmq_config, out, maxsize=1024),
                               "dlq": {"value": dlq, "profile": "rsmq-dlq", "config": rsmq_config}},
                 metrics_port=None, poll_interval_seconds=0.05, max_retries=1, retry_backoff_seconds=0.01,
                 redelivery_delay_seconds=0.05, max_deliveries=4, on_failure="continue")
    calls: list[bytes] = []

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        calls.append(message)
        return [("out", b"x" * 2000)]

    handler.run_until_drained(timeout=60, drain_idle_seconds=0.5)
    letters = [json.loads(raw_redis.hget(f"rsmq:{dlq}:Q", m)) for m in raw_redis.zrange(f"rsmq:{dlq}", 0, -1)]
    assert len(calls) == 1
    assert [letter.get("headers", {}).get("volley-error-stage") for letter in letters] == ["output"]


async def test_a_body_nested_too_deep_for_the_envelope_reader_does_not_lose_its_batch(
        rsmq_config: dict[str, Any], qname: str) -> None:
    """headers: envelope. A body that starts like an envelope and is nested deeper than json can read raised
    RecursionError out of consume after the receive had hidden the whole batch: every message of it stayed hidden
    for vt, held by nobody, its receive count raised, again every vt."""
    client = RsmqClient(parse_settings(rsmq_config, qname, "output"))
    poison = b'{"volley-envelope":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    client.send(qname, [(None, b"good-1"), (None, poison), (None, b"good-2")])
    client.close()
    consumer = RsmqConnector().create_consumer(
        QueueSpec("in", qname, "rsmq", {**rsmq_config, "headers": "envelope", "vt": 30}, role="input"))
    await consumer.start()
    try:
        batch = await consumer.consume(10, 1.0)
        assert sorted(e.value[:10] for e in batch) == [b"good-1", b"good-2", b'{"volley-e']  # the poison as it is
    finally:
        await consumer.close()
