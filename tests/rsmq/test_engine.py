"""The engine on RSMQ queues of a real redis-server: pass-through, dead letters, redelivery limit, delays."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest
import redis

from volley import Engine
from volley.errors import ConfigurationError

pytestmark = pytest.mark.redis


def raw_queue(config: dict[str, Any], value: str, **extra: Any) -> dict[str, Any]:
    """Bytes in, bytes out: no serializer, no model."""
    return {"value": value, "connector": "rsmq", "serializer": "none", "model_handler": "none",
            "config": {**config, **extra}}


def seed(raw_redis: redis.Redis, config: dict[str, Any], qname: str, bodies: list[bytes]) -> None:
    from rsmq import RedisSMQ

    queue = RedisSMQ(host=config["host"], port=config["port"], qname=qname, options={"decode_responses": False})
    queue.createQueue().exceptions(enabled=False).execute()
    pipe_ids = [queue.sendMessage(message=body).execute() for body in bodies]
    assert len(pipe_ids) == len(bodies)


def drain(raw_redis: redis.Redis, qname: str) -> list[bytes]:
    """Every message body stored in an RSMQ queue, in id (sending) order, without receiving them."""
    ids = sorted(m.decode() for m in raw_redis.zrange(f"rsmq:{qname}", 0, -1))
    return [raw_redis.hget(f"rsmq:{qname}:Q", i) or b"" for i in ids]


def engine(config: dict[str, Any], source: str, out: str, dlq: str, **kwargs: Any) -> Engine:
    queues = {
        "in": raw_queue(config, source, vt=30),
        "out": raw_queue(config, out),
        "dlq": {"value": dlq, "profile": "rsmq-dlq", "config": config},
    }
    return Engine(app_name="rsmq-e2e", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                  queue_config=queues, metrics_port=None, poll_interval_seconds=0.05,
                  retry_backoff_seconds=0.0, **kwargs)


def test_pass_through_moves_every_message_and_deletes_the_inputs(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    bodies = [json.dumps({"id": i}).encode() for i in range(2000)]
    seed(raw_redis, rsmq_config, qname + "-in", bodies)
    app = engine(rsmq_config, qname + "-in", qname + "-out", qname + "-dlq")

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        return [("out", message)]

    report = handler.run_until_drained(timeout=60, drain_idle_seconds=0.3)
    assert report.consumed == 2000
    assert report.acked == 2000
    assert sorted(drain(raw_redis, qname + "-out")) == sorted(bodies)
    assert raw_redis.zcard(f"rsmq:{qname}-in") == 0
    assert raw_redis.zcard(f"rsmq:{qname}-dlq") == 0


def test_handler_failures_go_to_the_dlq_raw_with_error_details(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    seed(raw_redis, rsmq_config, qname + "-in", [b"good", b"bad", b"\xff binary bad"])
    app = engine(rsmq_config, qname + "-in", qname + "-out", qname + "-dlq", max_retries=1)

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        if b"bad" in message:
            raise ValueError(f"cannot handle {message[:4]!r}")
        return [("out", message)]

    report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.3)
    assert report.dead_lettered == 2
    assert drain(raw_redis, qname + "-out") == [b"good"]
    letters = [json.loads(body) for body in drain(raw_redis, qname + "-dlq")]
    assert letters[0]["payload"] == "bad"
    assert letters[1]["payload_base64"] == "/yBiaW5hcnkgYmFk"  # b"\xff binary bad", not UTF-8
    for letter in letters:
        headers = letter["headers"]
        assert headers["volley-error-stage"] == "handler"
        assert headers["volley-error-type"] == "ValueError"
        assert "cannot handle" in headers["volley-error-reason"]
        assert headers["volley-source-queue"] == qname + "-in"
        assert headers["volley-attempts"] == "1"
    assert raw_redis.zcard(f"rsmq:{qname}-in") == 0


def test_a_message_delivered_too_often_goes_to_the_dlq_with_its_count_and_last_error(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    """A poison message that crashed earlier workers (so they never settled it) cannot cycle forever."""
    from rsmq import RedisSMQ

    seed(raw_redis, rsmq_config, qname + "-in", [b"poison"])
    queue = RedisSMQ(host=rsmq_config["host"], port=rsmq_config["port"], qname=qname + "-in")
    for _ in range(3):  # three deliveries that never finished
        assert queue.receiveMessage(vt=0).execute()["rc"] >= 1
    message_id = raw_redis.zrange(f"rsmq:{qname}-in", 0, 0)[0].decode()
    # What a consumer's nack_with_reason records for the next delivery:
    raw_redis.hset(f"rsmq:{qname}-in:volley:errors", message_id, "MemoryError: worker ran out of memory")
    app = engine(rsmq_config, qname + "-in", qname + "-out", qname + "-dlq", max_deliveries=3)
    called: list[bytes] = []

    @app.stream_app
    def handler(message: bytes) -> bool:
        called.append(message)
        return True

    report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.3)
    assert called == []
    assert report.dead_lettered == 1
    [letter] = [json.loads(body) for body in drain(raw_redis, qname + "-dlq")]
    assert letter["payload"] == "poison"
    assert letter["headers"]["volley-error-stage"] == "redelivery"
    assert letter["headers"]["volley-attempts"] == "4"
    assert letter["headers"]["volley-source-position"] == message_id
    assert letter["headers"]["volley-last-error"] == "MemoryError: worker ran out of memory"
    assert raw_redis.zcard(f"rsmq:{qname}-in") == 0
    assert raw_redis.hlen(f"rsmq:{qname}-in:volley:errors") == 0


def test_delay_from_the_handler_hides_the_output(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    seed(raw_redis, rsmq_config, qname + "-in", [b"later", b"now"])
    app = engine(rsmq_config, qname + "-in", qname + "-out", qname + "-dlq")

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes, dict[str, Any]]]:
        return [("out", message, {"delay": 60 if message == b"later" else 0})]

    handler.run_until_drained(timeout=30, drain_idle_seconds=0.3)
    scores = {raw_redis.hget(f"rsmq:{qname}-out:Q", m): s
              for m, s in raw_redis.zrange(f"rsmq:{qname}-out", 0, -1, withscores=True)}
    now_ms = time.time() * 1000
    assert scores[b"now"] <= now_ms
    assert now_ms + 50_000 < scores[b"later"] <= now_ms + 61_000


def test_bad_rsmq_settings_fail_when_the_engine_is_built(rsmq_config: dict[str, Any], qname: str) -> None:
    with pytest.raises(ConfigurationError, match="unknown config key"):
        engine({**rsmq_config, "visibilty": 3}, qname + "-in", qname + "-out", qname + "-dlq")


@pytest.mark.parametrize("profile", ["rsmq", "rsmq-pydantic", "rsmq-orjson-pydantic", "rsmq-msgpack-pydantic"])
def test_py_volley_profiles_round_trip_a_generic_message(
    profile: str, rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis
) -> None:
    import msgpack

    document = {"order": 7, "items": ["a", "b"]}
    encode = msgpack.packb if "msgpack" in profile else lambda d: json.dumps(d).encode()
    decode = msgpack.unpackb if "msgpack" in profile else json.loads
    seed(raw_redis, rsmq_config, qname + "-in", [encode(document)])
    queues = {
        "in": {"value": qname + "-in", "profile": profile, "config": rsmq_config},
        "out": {"value": qname + "-out", "profile": profile, "config": rsmq_config},
    }
    app = Engine(app_name="profiles", input_queue="in", output_queues=["out"], queue_config=queues,
                 metrics_port=None, poll_interval_seconds=0.05)
    received: list[Any] = []

    @app.stream_app
    def handler(message: Any) -> list[tuple[str, Any]]:
        received.append(message)
        return [("out", message)]

    report = handler.run_until_drained(timeout=30, drain_idle_seconds=0.3)
    assert report.acked == 1
    assert type(received[0]).__name__ == "GenericMessage"
    assert received[0].model_dump() == document
    [body] = drain(raw_redis, qname + "-out")
    assert decode(body) == document


def test_a_backlog_with_deletes_lagging_behind_gives_no_duplicates_and_a_bounded_delete_queue(
    rsmq_config: dict[str, Any], qname: str, raw_redis: redis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Issue 12, scaled down: 1M inputs with a 5 s vt gave 1,323,500 outputs, no crash, no log line.

    Deletes are made slower than receives (a loaded Redis); acked messages whose delete is still queued must
    stay hidden until it happens, and the queue of deletes must stay within max_pending_deletes.
    """
    from volley_rsmq.client import RsmqClient
    from volley_rsmq.consumer import RsmqConsumer
    from volley_rsmq.settings import parse_settings

    count, bound, source, out = 20_000, 3_000, qname + "-in", qname + "-out"
    client = RsmqClient(parse_settings(rsmq_config, source, "input"))
    for start in range(0, count, 1000):
        client.send(source, [(None, b"%d" % i) for i in range(start, start + 1000)])
    client.close()

    real_delete = RsmqClient.delete

    def slow_delete(self: RsmqClient, queue: str, ids: Any) -> None:
        if queue == source:
            time.sleep(0.25)  # injected latency (a Redis slow to delete), not a wait for anything
        real_delete(self, queue, ids)

    peaks: list[int] = []
    real_ack = RsmqConsumer.ack

    async def recording_ack(self: RsmqConsumer, envelopes: Any) -> None:
        await real_ack(self, envelopes)
        peaks.append(self.pending_deletes())

    monkeypatch.setattr(RsmqClient, "delete", slow_delete)
    monkeypatch.setattr(RsmqConsumer, "ack", recording_ack)
    queues = {
        "in": raw_queue(rsmq_config, source, vt=2, max_pending_deletes=bound),
        "out": raw_queue(rsmq_config, out),
    }
    app = Engine(app_name="rsmq-backlog", input_queue="in", output_queues=["out"], queue_config=queues,
                 metrics_port=None, poll_interval_seconds=0.05)
    handled = 0

    @app.stream_app
    def handler(message: bytes) -> list[tuple[str, bytes]]:
        nonlocal handled
        handled += 1
        return [("out", message)]

    report = handler.run_until_drained(timeout=120, drain_idle_seconds=0.5)
    outputs = drain(raw_redis, out)
    assert len(outputs) - len(set(outputs)) == 0, f"{len(outputs) - len(set(outputs))} duplicate outputs"
    assert sorted(outputs) == sorted(b"%d" % i for i in range(count))
    assert handled == count == report.consumed
    assert raw_redis.zcard(f"rsmq:{source}") == 0
    assert peaks and max(peaks) <= bound
