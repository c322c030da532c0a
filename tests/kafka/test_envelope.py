"""KafkaEnvelope: key, headers and timestamp are read from the consumed record when asked (no broker needed)."""

from __future__ import annotations

import pytest
from confluent_kafka import TIMESTAMP_CREATE_TIME, TIMESTAMP_NOT_AVAILABLE, Message

from volley.message import Envelope, MessageContext
from volley_kafka.envelope import KafkaEnvelope


def _record(**fields: object) -> Message:
    values: dict[str, object] = {"topic": "orders", "partition": 2, "offset": 41, "key": b"k1", "value": b"{}",
                                 "timestamp": (TIMESTAMP_CREATE_TIME, 1_700_000_000_123),
                                 "headers": [("trace", b"t1"), ("tenant", b"a")]}
    values.update(fields)
    return Message(**values)


def test_a_kafka_envelope_answers_from_its_record() -> None:
    record = _record()
    env = KafkaEnvelope(b"{}", "orders", 2, 41, 3, record)
    assert isinstance(env, Envelope)
    assert (env.value, env.source, env.partition, env.position, env.attempt, env.pending) == (b"{}", "orders", 2, 41,
                                                                                               3, 0)
    assert env.handle is record
    assert env.key == b"k1"
    assert env.headers == {"trace": b"t1", "tenant": b"a"}
    assert env.timestamp == pytest.approx(1_700_000_000.123)
    assert env.describe() == "orders[2]@41"
    assert "key=b'k1'" in repr(env)
    context = MessageContext(env, "in", "app")
    assert context.key == b"k1"
    assert context.headers is not None and context.headers["trace"] == b"t1"


def test_what_the_record_lacks_is_none() -> None:
    env = KafkaEnvelope(b"", "orders", 0, 0, 1, _record(key=None, headers=None,
                                                        timestamp=(TIMESTAMP_NOT_AVAILABLE, 0)))
    assert env.key is None
    assert env.headers is None
    assert env.timestamp is None


def test_headers_are_a_copy_and_the_record_fields_are_read_only() -> None:
    env = KafkaEnvelope(b"", "orders", 0, 0, 1, _record())
    headers = env.headers
    assert headers is not None
    headers["trace"] = b"changed"
    assert env.headers == {"trace": b"t1", "tenant": b"a"}
    for name in ("key", "headers", "timestamp"):
        with pytest.raises(AttributeError, match=name):
            setattr(env, name, None)
