"""The RSMQ consumer and producer on a real redis-server, without the engine."""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis

from volley.message import Envelope, OutgoingMessage
from volley.ports import Consumer, DeliveryFailure, Producer, QueueSpec
from volley_rsmq import LAST_ERROR_HEADER, RsmqConnector, RsmqConsumer, RsmqProducer

pytestmark = pytest.mark.redis

Eventually = Callable[..., Awaitable[None]]


class Deliveries:
    """A delivery callback that records what was confirmed and what failed (called from the sender thread)."""

    def __init__(self) -> None:
        self.ok: list[OutgoingMessage] = []
        self.failed: list[DeliveryFailure] = []
        self._lock = threading.Lock()

    def __call__(self, ok: Any, failed: Any) -> None:
        with self._lock:
            self.ok.extend(ok)
            self.failed.extend(failed)


class Parts:
    """Builds started consumers and producers for a test and closes them afterwards."""

    def __init__(self, config: dict[str, Any]) -> None:
        self.config = config
        self.connector = RsmqConnector()
        self.started: list[Consumer | Producer] = []

    async def consumer(self, queue: str, role: str = "input", **config: Any) -> RsmqConsumer:
        consumer = self.connector.create_consumer(QueueSpec("in", queue, "rsmq", {**self.config, **config}, role=role))
        await consumer.start()
        self.started.append(consumer)
        return consumer

    async def producer(self, queue: str, role: str = "output", **config: Any) -> RsmqProducer:
        producer = self.connector.create_producer(QueueSpec("out", queue, "rsmq", {**self.config, **config}, role=role))
        await producer.start()
        self.started.append(producer)
        return producer

    async def send(self, producer: RsmqProducer, messages: list[OutgoingMessage]) -> Deliveries:
        deliveries = Deliveries()
        producer.produce(messages, deliveries)
        await producer.flush(10)
        return deliveries


@pytest.fixture
async def parts(rsmq_config: dict[str, Any]) -> AsyncIterator[Parts]:
    made = Parts(rsmq_config)
    yield made
    for part in reversed(made.started):
        await part.close()


async def consume_all(consumer: RsmqConsumer, count: int, within: float = 10.0) -> list[Envelope]:
    got: list[Envelope] = []
    deadline = time.monotonic() + within
    while len(got) < count and time.monotonic() < deadline:
        got.extend(await consumer.consume(count - len(got), 0.2))
    return got


def pyrsmq(redis_server: Any, qname: str) -> Any:
    from rsmq import RedisSMQ

    return RedisSMQ(host=redis_server.host, port=redis_server.port, qname=qname)


# ---------------------------------------------------------------------- round trips


async def test_produce_consume_ack_round_trip(parts: Parts, qname: str, raw_redis: redis.Redis) -> None:
    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname)
    sent = [OutgoingMessage(qname, f"m{i}".encode()) for i in range(1200)]
    deliveries = await parts.send(producer, sent)
    assert len(deliveries.ok) == 1200
    assert not deliveries.failed

    before = time.time()
    got = await consume_all(consumer, 1200)
    assert [e.value for e in got] == [m.value for m in sent]  # FIFO, even across send batches
    assert {e.attempt for e in got} == {1}
    assert all(e.source == qname and e.key is None and e.headers is None for e in got)
    assert all(e.timestamp is not None and before - 60 < e.timestamp <= time.time() + 1 for e in got)
    assert len({e.position for e in got}) == 1200

    await consumer.ack(got)
    await consumer.settled(10)
    # Acked messages are gone from both RSMQ keys, as after PyRSMQ's deleteMessage.
    assert raw_redis.zcard(f"rsmq:{qname}") == 0
    assert set(raw_redis.hkeys(f"rsmq:{qname}:Q")) == {
        b"vt", b"delay", b"maxsize", b"created", b"modified", b"totalsent", b"totalrecv"}
    assert await consumer.consume(10, 0.1) == []
    assert consumer.is_drained()


async def test_consume_waits_for_a_message_then_returns_it(parts: Parts, qname: str) -> None:
    consumer = await parts.consumer(qname)
    producer = await parts.producer(qname)
    started = time.monotonic()
    assert await consumer.consume(10, 0.2) == []
    assert time.monotonic() - started >= 0.19

    async def later() -> None:
        await asyncio.sleep(0.2)
        await parts.send(producer, [OutgoingMessage(qname, b"late")])

    task = asyncio.ensure_future(later())
    got = await consumer.consume(10, 5.0)
    await task
    assert [e.value for e in got] == [b"late"]


async def test_nack_redelivers_after_the_backoff_not_the_vt(parts: Parts, qname: str, eventually: Eventually) -> None:
    producer = await parts.producer(qname, vt=60)
    consumer = await parts.consumer(qname, vt=60)
    await parts.send(producer, [OutgoingMessage(qname, b"again")])
    [first] = await consume_all(consumer, 1)
    nacked_at = time.monotonic()
    await consumer.nack([first], 0.5)
    await consumer.settled(5)
    assert await consumer.consume(10, 0.1) == []  # hidden for the backoff

    got: list[Envelope] = []

    async def redelivered() -> bool:
        got.extend(await consumer.consume(10, 0.05))
        return bool(got)

    await eventually(redelivered, 10, "redelivery after nack")
    assert 0.45 <= time.monotonic() - nacked_at < 10  # far sooner than vt=60
    assert got[0].position == first.position
    assert got[0].attempt == 2


async def test_nack_with_reason_comes_back_as_last_error_header(
    parts: Parts, qname: str, raw_redis: redis.Redis
) -> None:
    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"poison")])
    [first] = await consume_all(consumer, 1)
    assert first.headers is None
    await consumer.nack_with_reason([first], 0.0, "ValueError: bad input")
    await consumer.settled(5)
    [second] = await consume_all(consumer, 1)
    assert second.attempt == 2
    assert second.headers == {LAST_ERROR_HEADER: b"ValueError: bad input"}
    await consumer.ack([second])
    await consumer.settled(5)
    assert raw_redis.hlen(f"rsmq:{qname}:volley:errors") == 0  # deleted with the message


async def test_per_message_delay_hides_the_message(parts: Parts, qname: str, eventually: Eventually) -> None:
    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname)
    sent_at = time.monotonic()
    await parts.send(producer, [OutgoingMessage(qname, b"later", delay=0.6), OutgoingMessage(qname, b"now")])
    first = await consume_all(consumer, 1)
    assert [e.value for e in first] == [b"now"]
    got: list[Envelope] = []

    async def arrived() -> bool:
        got.extend(await consumer.consume(10, 0.05))
        return bool(got)

    await eventually(arrived, 10, "delayed message")
    assert time.monotonic() - sent_at >= 0.55
    assert [e.value for e in got] == [b"later"]


async def test_queue_default_delay_applies_without_a_per_message_delay(parts: Parts, qname: str) -> None:
    producer = await parts.producer(qname, delay=30)
    consumer = await parts.consumer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"hidden"), OutgoingMessage(qname, b"now", delay=0)])
    got = await consume_all(consumer, 2, within=0.5)
    assert [e.value for e in got] == [b"now"]


# ---------------------------------------------------------------------- visibility timeout


async def test_heartbeat_extends_visibility_of_a_slow_message(parts: Parts, qname: str) -> None:
    slow = await parts.consumer(qname, vt=1)
    other = await parts.consumer(qname, vt=1)
    producer = await parts.producer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"slow")])
    [held] = await consume_all(slow, 1)
    # For 2.5 vt, another consumer never sees the message: the holder keeps extending it.
    deadline = time.monotonic() + 2.5
    while time.monotonic() < deadline:
        assert await other.consume(10, 0.1) == []
    assert slow.extended >= 2
    await slow.ack([held])
    await slow.settled(5)
    assert await other.consume(10, 1.2) == []  # deleted, not just hidden


async def test_without_heartbeat_an_expired_message_is_redelivered_and_logged(
    parts: Parts, qname: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="volley.rsmq")
    slow = await parts.consumer(qname, vt=1, heartbeat=False)
    other = await parts.consumer(qname, vt=1)
    producer = await parts.producer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"slow")])
    [held] = await consume_all(slow, 1)
    [again] = await consume_all(other, 1, within=5)
    assert again.position == held.position
    assert again.attempt == 2
    assert slow.extended == 0
    deadline = time.monotonic() + 5
    while "may be delivered again" not in caplog.text and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    assert "may be delivered again and processed twice" in caplog.text


async def test_extension_stops_after_max_extension_seconds(
    parts: Parts, qname: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="volley.rsmq")
    slow = await parts.consumer(qname, vt=1, max_extension_seconds=1.0)
    other = await parts.consumer(qname, vt=1)
    producer = await parts.producer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"stuck")])
    [held] = await consume_all(slow, 1)
    [again] = await consume_all(other, 1, within=6)
    assert again.position == held.position
    assert "no longer extended" in caplog.text


async def test_nack_of_a_message_received_again_elsewhere_does_not_touch_it(parts: Parts, qname: str) -> None:
    first = await parts.consumer(qname, vt=1, heartbeat=False)
    second = await parts.consumer(qname, vt=30)
    producer = await parts.producer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"m")])
    [old] = await consume_all(first, 1)
    [new] = await consume_all(second, 1, within=5)  # first's vt expired; second holds it for 30 s
    assert new.attempt == 2
    await first.nack([old], 0.0)  # stale: must not make the message visible under second's feet
    await first.settled(5)
    assert await first.consume(10, 0.3) == []


async def test_close_releases_held_messages_at_once(parts: Parts, qname: str, rsmq_config: dict[str, Any]) -> None:
    producer = await parts.producer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"a"), OutgoingMessage(qname, b"b")])
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", {**rsmq_config, "vt": 60}))
    await consumer.start()
    got = await consume_all(consumer, 2)
    await consumer.ack(got[:1])
    await consumer.close()
    other = await parts.consumer(qname)
    again = await consume_all(other, 1, within=2)
    assert [e.value for e in again] == [b"b"]
    assert again[0].attempt == 2


# ---------------------------------------------------------------------- interoperability with PyRSMQ


async def test_pyrsmq_producer_to_volley_consumer(parts: Parts, qname: str, redis_server: Any) -> None:
    queue = pyrsmq(redis_server, qname)
    queue.createQueue(vt=20).execute()
    ids = [queue.sendMessage(message=json.dumps({"n": i})).execute() for i in range(5)]
    queue.sendMessage(message="delayed", delay=30).execute()
    consumer = await parts.consumer(qname)
    got = await consume_all(consumer, 6, within=1)
    assert [e.position for e in got] == ids
    assert [json.loads(e.value) for e in got] == [{"n": i} for i in range(5)]
    await consumer.ack(got)
    await consumer.settled(5)
    attributes = queue.getQueueAttributes().execute()
    assert attributes["msgs"] == 1  # only the delayed one is left
    assert attributes["totalrecv"] == 5


async def test_volley_producer_to_pyrsmq_consumer(parts: Parts, qname: str, redis_server: Any) -> None:
    producer = await parts.producer(qname)
    await parts.send(producer, [OutgoingMessage(qname, f"v{i}".encode()) for i in range(3)])
    queue = pyrsmq(redis_server, qname)
    attributes = queue.getQueueAttributes().execute()
    assert attributes["msgs"] == 3
    assert attributes["totalsent"] == 3
    assert attributes["vt"] == 30  # PyRSMQ's default, created by the producer on first use
    received = []
    for _ in range(3):
        message = queue.receiveMessage().execute()
        received.append(message["message"])
        assert message["rc"] == 1
        assert queue.deleteMessage(id=message["id"]).execute() is True  # PyRSMQ's own consistency check
    assert received == ["v0", "v1", "v2"]
    assert queue.getQueueAttributes().execute()["msgs"] == 0


async def test_pyrsmq_changes_visibility_of_a_message_volley_holds(
    parts: Parts, qname: str, redis_server: Any
) -> None:
    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname, vt=60)
    await parts.send(producer, [OutgoingMessage(qname, b"x")])
    [held] = await consume_all(consumer, 1)
    queue = pyrsmq(redis_server, qname)
    assert queue.changeMessageVisibility(id=held.position, vt=0).execute() is True
    message = queue.receiveMessage().execute()
    assert message["id"] == held.position
    assert message["rc"] == 2


# ---------------------------------------------------------------------- headers and the dead-letter envelope


async def test_envelope_mode_round_trips_value_key_and_headers(
    parts: Parts, qname: str, raw_redis: redis.Redis
) -> None:
    producer = await parts.producer(qname, role="dlq")  # a DLQ wraps by default
    consumer = await parts.consumer(qname, headers="envelope")
    headers = {"volley-error-stage": b"handler", "volley-error-reason": "naïve".encode(), "bin": b"\xff\x00"}
    await parts.send(producer, [
        OutgoingMessage(qname, b'{"a": 1}', b"k", headers),
        OutgoingMessage(qname, b"\x80\x81 not utf-8"),
    ])
    got = await consume_all(consumer, 2)
    assert (got[0].value, got[0].key, got[0].headers) == (b'{"a": 1}', b"k", headers)
    assert (got[1].value, got[1].key, got[1].headers) == (b"\x80\x81 not utf-8", None, None)
    # What is stored is an inspectable JSON document.
    stored = json.loads(raw_redis.hget(f"rsmq:{qname}:Q", got[0].position) or b"")
    assert stored["payload"] == '{"a": 1}'
    assert stored["headers"]["volley-error-stage"] == "handler"
    assert stored["headers"]["volley-error-reason"] == "naïve"
    assert "bin" in stored["headers_base64"]


async def test_drop_mode_stores_the_payload_alone(parts: Parts, qname: str) -> None:
    producer = await parts.producer(qname)
    plain = await parts.consumer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"payload", b"key", {"h": b"v"})])
    [got] = await consume_all(plain, 1)
    assert (got.value, got.key, got.headers) == (b"payload", None, None)


async def test_maxsize_fails_oversized_records_only(parts: Parts, qname: str) -> None:
    producer = await parts.producer(qname, maxsize=1024)
    deliveries = await parts.send(producer, [OutgoingMessage(qname, b"x" * 2000), OutgoingMessage(qname, b"small")])
    assert [m.value for m in deliveries.ok] == [b"small"]
    [(message, error)] = deliveries.failed
    assert len(message.value) == 2000
    assert "maxsize" in str(error)


# ---------------------------------------------------------------------- Redis trouble


async def test_producer_retries_until_redis_is_back(private_redis: Any, qname: str) -> None:
    config = {"host": "127.0.0.1", "port": private_redis.port, "retry_backoff_seconds": 0.02}
    producer = RsmqConnector().create_producer(QueueSpec("out", qname, "rsmq", config))
    await producer.start()
    private_redis.stop()
    deliveries = Deliveries()
    producer.produce([OutgoingMessage(qname, b"survives")], deliveries)
    deadline = time.monotonic() + 5
    while producer.retries < 2:
        assert time.monotonic() < deadline, "the producer did not retry"
        await asyncio.sleep(0.02)
    assert not deliveries.ok
    private_redis.start()
    await producer.flush(10)
    assert [m.value for m in deliveries.ok] == [b"survives"]
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", config))
    await consumer.start()
    assert [e.value for e in await consume_all(consumer, 1)] == [b"survives"]
    await consumer.close()
    await producer.close()


async def test_producer_reports_failure_after_the_delivery_timeout(private_redis: Any, qname: str) -> None:
    config = {"host": "127.0.0.1", "port": private_redis.port, "delivery_timeout_seconds": 0.5,
              "retry_backoff_seconds": 0.02}
    producer = RsmqConnector().create_producer(QueueSpec("out", qname, "rsmq", config))
    await producer.start()
    private_redis.stop()
    deliveries = Deliveries()
    started = time.monotonic()
    producer.produce([OutgoingMessage(qname, b"lost")], deliveries)
    await producer.flush(10)
    assert 0.45 <= time.monotonic() - started < 5
    assert not deliveries.ok
    [(message, error)] = deliveries.failed
    assert message.value == b"lost"
    assert "unreachable" in str(error)
    await producer.close()


async def test_consumer_survives_a_redis_outage(private_redis: Any, qname: str) -> None:
    config = {"host": "127.0.0.1", "port": private_redis.port, "retry_backoff_seconds": 0.02}
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", config))
    producer = RsmqConnector().create_producer(QueueSpec("out", qname, "rsmq", config))
    await consumer.start()
    await producer.start()
    private_redis.stop()
    assert await consumer.consume(10, 0.2) == []  # no exception: the engine just sees an empty poll
    assert not consumer.is_drained()
    private_redis.start()  # appendonly, but the queue was empty: the consumer recreates it if needed
    deliveries = Deliveries()
    producer.produce([OutgoingMessage(qname, b"after")], deliveries)
    await producer.flush(10)
    got = await consume_all(consumer, 1)
    assert [e.value for e in got] == [b"after"]
    await consumer.ack(got)
    await consumer.settled(10)
    await consumer.close()
    await producer.close()


async def test_start_fails_with_a_configuration_error_when_redis_is_unreachable(qname: str) -> None:
    import socket

    from volley.errors import ConfigurationError

    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    consumer = RsmqConnector().create_consumer(
        QueueSpec("in", qname, "rsmq", {"host": "127.0.0.1", "port": port, "connect_timeout_seconds": 0.2}))
    with pytest.raises(ConfigurationError, match=f"cannot reach Redis at 127.0.0.1:{port}"):
        await consumer.start()
    await consumer.close()


async def test_instrumented_consumer_reports_queue_depth(parts: Parts, qname: str) -> None:
    class DepthObserver:
        def __init__(self) -> None:
            self.depths: list[tuple[str, str, int]] = []

        def on_depth(self, app_name: str, queue: str, depth: int) -> None:
            self.depths.append((app_name, queue, depth))

    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname)
    observer = DepthObserver()
    consumer.instrument(observer, "app")  # type: ignore[arg-type]  # only on_depth is called
    await parts.send(producer, [OutgoingMessage(qname, b"m")] * 10 + [OutgoingMessage(qname, b"later", delay=60)])
    got = await consumer.consume(3, 1.0)
    assert len(got) == 3
    assert observer.depths == [("app", qname, 7)]  # visible ones only, not the delayed one
    assert await consumer.depth() == 7


# ---------------------------------------------------------------------- issue 12: the consumer's own bugs


async def test_a_queue_created_with_vt_0_is_refused_clearly_unless_the_config_sets_vt(
    parts: Parts, qname: str, redis_server: Any, rsmq_config: dict[str, Any]
) -> None:
    """vt=0 is the queue's own setting here (PyRSMQ accepts it); it used to be read as "unset" and became 30 s."""
    from volley.errors import ConfigurationError

    assert pyrsmq(redis_server, qname).createQueue(vt=0).execute() is True
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", rsmq_config))
    with pytest.raises(ConfigurationError, match=rf"RSMQ queue {qname!r} was created with vt=0.*set 'vt'"):
        await consumer.start()
    await consumer.close()
    configured = await parts.consumer(qname, vt=2)  # the config's vt wins over the queue's
    producer = await parts.producer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"m")])
    [got] = await consume_all(configured, 1)
    assert 0 < raw_score_ms(redis_server, qname, got.position) - time.time() * 1000 <= 2100  # hidden for 2 s


def raw_score_ms(redis_server: Any, qname: str, message_id: str) -> float:
    client = redis.Redis(host=redis_server.host, port=redis_server.port)
    try:
        return float(client.zscore(f"rsmq:{qname}", message_id) or 0)
    finally:
        client.close()


async def test_a_message_received_again_while_held_is_not_handed_out_twice_and_its_nack_uses_the_new_delivery(
    parts: Parts, qname: str
) -> None:
    """Its vt passed while the engine still had it (in its buffer, or a handler slower than vt with heartbeat:
    false): the same consumer receives it again. Until session 31 that was handed out as a second delivery (the
    engine handled it twice, and its attempt count climbed towards max_deliveries while it waited); now the
    consumer keeps the one the engine has, under the new receive count, which the nack of the old envelope uses."""
    consumer = await parts.consumer(qname, vt=2, heartbeat=False)
    other = await parts.consumer(qname, vt=30)
    producer = await parts.producer(qname)
    await parts.send(producer, [OutgoingMessage(qname, b"m")])
    [old] = await consume_all(consumer, 1)
    deadline = time.monotonic() + 6
    while consumer.received_again == 0:  # old's vt expires: received again, not handed out
        assert time.monotonic() < deadline, "the message was not received again after its vt"
        assert await consumer.consume(10, 0.3) == []
    assert consumer.held_count() == 1
    assert await other.consume(10, 0.3) == []  # hidden again, under the newer delivery
    await consumer.nack([old], 0.0)  # the envelope the engine has releases the newer delivery
    await consumer.settled(5)
    [third] = await consume_all(other, 1, within=1)
    assert (third.position, third.attempt) == (old.position, 3)
    assert consumer.held_count() == 0


async def test_error_reasons_of_messages_deleted_by_another_client_do_not_pile_up(
    parts: Parts, qname: str, raw_redis: redis.Redis, redis_server: Any
) -> None:
    """PyRSMQ's deleteMessage does not know Volley's error hash; the next recorded reason sweeps what it left."""
    errors = f"rsmq:{qname}:volley:errors"
    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname, vt=30)
    await parts.send(producer, [OutgoingMessage(qname, f"s{i}".encode()) for i in range(20)]
                     + [OutgoingMessage(qname, b"live")])
    got = await consume_all(consumer, 21)
    stale, live = got[:20], got[20]
    await consumer.nack_with_reason(stale, 0.0, "ValueError: boom")
    await consumer.settled(5)
    assert raw_redis.hlen(errors) == 20
    queue = pyrsmq(redis_server, qname)
    for _ in range(20):  # another worker (py-volley, PyRSMQ) finishes them
        message = queue.receiveMessage().execute()
        assert queue.deleteMessage(id=message["id"]).execute() is True
    assert raw_redis.hlen(errors) == 20  # their reasons are left behind
    await consumer.nack_with_reason([live], 0.0, "ValueError: again")
    await consumer.settled(5)
    assert raw_redis.hgetall(errors) == {live.position.encode(): b"ValueError: again"}


def _refuse_writes(admin: redis.Redis, how: str) -> None:
    """Make a working server answer writes with an error reply, as after a failover (READONLY) or when full (OOM)."""
    import socket

    if how == "readonly":
        with socket.socket() as sock:  # a port nobody listens on: the "primary" is never reached
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        admin.execute_command("REPLICAOF", "127.0.0.1", str(port))
    else:
        admin.config_set("maxmemory-policy", "noeviction")
        admin.config_set("maxmemory", 1)


def _accept_writes(admin: redis.Redis, how: str) -> None:
    if how == "readonly":
        admin.execute_command("REPLICAOF", "NO", "ONE")
    else:
        admin.config_set("maxmemory", 0)


@pytest.mark.parametrize("how", ["readonly", "oom"])
async def test_deletes_and_give_backs_refused_for_a_while_are_retried_not_dropped(
    private_redis: Any, qname: str, how: str, caplog: pytest.LogCaptureFixture, eventually: Eventually
) -> None:
    caplog.set_level(logging.WARNING, logger="volley.rsmq")
    config = {"host": "127.0.0.1", "port": private_redis.port, "retry_backoff_seconds": 0.02, "vt": 60}
    consumer = RsmqConnector().create_consumer(QueueSpec("in", qname, "rsmq", config))
    producer = RsmqConnector().create_producer(QueueSpec("out", qname, "rsmq", config))
    admin = redis.Redis(host="127.0.0.1", port=private_redis.port)
    await consumer.start()
    await producer.start()
    try:
        deliveries = Deliveries()
        producer.produce([OutgoingMessage(qname, v) for v in (b"a", b"b", b"c")], deliveries)
        await producer.flush(10)
        got = await consume_all(consumer, 3)
        _refuse_writes(admin, how)
        await consumer.ack(got[:2])
        await consumer.nack_with_reason(got[2:], 0.0, "ValueError: c")

        async def retrying() -> bool:
            return "settling messages of RSMQ queue" in caplog.text and "will retry" in caplog.text

        await eventually(retrying, 5, "a settle retry")
        assert admin.zcard(f"rsmq:{qname}") == 3  # nothing done yet
        assert "failed for good" not in caplog.text
        assert not consumer.is_drained()
        _accept_writes(admin, how)
        await consumer.settled(10)
        assert [m.decode() for m in admin.zrange(f"rsmq:{qname}", 0, -1)] == [got[2].position]
        # A receive refused the same way is an empty poll retried later, not an exception into the engine.
        _refuse_writes(admin, how)
        assert await consumer.consume(10, 0.1) == []
        _accept_writes(admin, how)
        [again] = await consume_all(consumer, 1)
        assert (again.position, again.attempt) == (got[2].position, 2)
        assert again.headers == {LAST_ERROR_HEADER: b"ValueError: c"}
    finally:
        _accept_writes(admin, how)
        admin.close()
        await consumer.close()
        await producer.close()


@pytest.mark.parametrize("how", ["readonly", "oom"])
async def test_producer_retries_sends_refused_for_a_while(private_redis: Any, qname: str, how: str) -> None:
    config = {"host": "127.0.0.1", "port": private_redis.port, "retry_backoff_seconds": 0.02}
    producer = RsmqConnector().create_producer(QueueSpec("out", qname, "rsmq", config))
    admin = redis.Redis(host="127.0.0.1", port=private_redis.port)
    await producer.start()
    try:
        _refuse_writes(admin, how)
        deliveries = Deliveries()
        producer.produce([OutgoingMessage(qname, b"kept")], deliveries)
        deadline = time.monotonic() + 5
        while producer.retries < 2 and not deliveries.failed:
            assert time.monotonic() < deadline, "the producer did not retry"
            await asyncio.sleep(0.02)
        assert not deliveries.failed
        _accept_writes(admin, how)
        await producer.flush(10)
        assert [m.value for m in deliveries.ok] == [b"kept"]
        assert not deliveries.failed
    finally:
        _accept_writes(admin, how)
        admin.close()
        await producer.close()


async def test_ack_waits_for_room_when_the_delete_queue_is_at_its_bound(
    parts: Parts, qname: str, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Acks only queue deletes; with Redis slow to delete, ack() applies backpressure instead of queuing more."""
    from volley_rsmq.client import RsmqClient

    gate = threading.Event()
    real_delete = RsmqClient.delete

    def gated_delete(self: RsmqClient, queue: str, ids: Any) -> None:
        if queue == qname:
            assert gate.wait(10), "the test never opened the gate"
        real_delete(self, queue, ids)

    monkeypatch.setattr(RsmqClient, "delete", gated_delete)
    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname, vt=30, max_pending_deletes=10)
    await parts.send(producer, [OutgoingMessage(qname, f"m{i}".encode()) for i in range(15)])
    got = await consume_all(consumer, 15)
    await asyncio.wait_for(consumer.ack(got[:10]), 2)  # fits the bound
    assert consumer.pending_deletes() == 10
    late = asyncio.ensure_future(consumer.ack(got[10:]))
    done, _ = await asyncio.wait([late], timeout=0.3)
    assert not done, "ack() queued deletes beyond max_pending_deletes"
    assert consumer.pending_deletes() == 10
    # Receiving more would only make the backlog grow: consume() gives nothing while the delete queue is full.
    await parts.send(producer, [OutgoingMessage(qname, b"more")])
    assert await consumer.consume(10, 0.2) == []
    gate.set()
    await asyncio.wait_for(late, 5)
    await consumer.settled(5)
    assert consumer.pending_deletes() == 0
    assert raw_redis.zcard(f"rsmq:{qname}") == 1  # the 15 are deleted, "more" waits
    assert [e.value for e in await consume_all(consumer, 1)] == [b"more"]


async def test_an_acked_message_stays_hidden_until_its_delete_reaches_redis(
    parts: Parts, qname: str, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Deletes failing for longer than the vt: the acknowledged message must not be delivered again meanwhile."""
    from volley_rsmq.client import RsmqClient

    gate = threading.Event()
    real_delete = RsmqClient.delete

    def failing_delete(self: RsmqClient, queue: str, ids: Any) -> None:
        if queue == qname and not gate.is_set():
            raise redis.ConnectionError("injected: deletes do not get through")
        real_delete(self, queue, ids)

    monkeypatch.setattr(RsmqClient, "delete", failing_delete)
    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname, vt=1, heartbeat=False, retry_backoff_seconds=0.02)  # even without it
    other = await parts.consumer(qname, vt=1)
    await parts.send(producer, [OutgoingMessage(qname, b"done")])
    [got] = await consume_all(consumer, 1)
    await consumer.ack([got])
    deadline = time.monotonic() + 2.5  # 2.5 vt
    while time.monotonic() < deadline:
        assert await other.consume(10, 0.1) == [], "an acknowledged message was delivered again"
    assert consumer.extended >= 2
    assert consumer.pending_deletes() == 1
    gate.set()
    await consumer.settled(5)
    assert raw_redis.zcard(f"rsmq:{qname}") == 0


async def test_ack_queues_beyond_the_bound_after_close_timeout_when_deletes_never_get_through(
    parts: Parts, qname: str, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture
) -> None:
    """Backpressure must not hang the engine's ack path (or its shutdown) for as long as Redis refuses."""
    from volley_rsmq.client import RsmqClient

    caplog.set_level(logging.WARNING, logger="volley.rsmq")
    gate = threading.Event()
    real_delete = RsmqClient.delete

    def failing_delete(self: RsmqClient, queue: str, ids: Any) -> None:
        if queue == qname and not gate.is_set():
            raise redis.ConnectionError("injected: deletes do not get through")
        real_delete(self, queue, ids)

    monkeypatch.setattr(RsmqClient, "delete", failing_delete)
    producer = await parts.producer(qname)
    consumer = await parts.consumer(qname, vt=30, max_pending_deletes=4, close_timeout_seconds=0.5,
                                    retry_backoff_seconds=0.02)
    await parts.send(producer, [OutgoingMessage(qname, f"m{i}".encode()) for i in range(6)])
    got = await consume_all(consumer, 6)
    started = time.monotonic()
    await asyncio.wait_for(consumer.ack(got), 5)
    assert time.monotonic() - started >= 0.45
    assert consumer.pending_deletes() == 6
    assert consumer.over_bound == 2
    assert "queuing more deletes beyond max_pending_deletes (4)" in caplog.text
    gate.set()
    await consumer.settled(5)
    assert raw_redis.zcard(f"rsmq:{qname}") == 0
