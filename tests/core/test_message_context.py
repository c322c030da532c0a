"""What a handler sees of its message: ``msg_ctx`` cannot change what the broker holds."""

from __future__ import annotations

import pytest

from volley import MemoryBroker, MessageContext


def test_headers_are_read_only_and_a_redelivery_shows_them_as_sent() -> None:
    broker = MemoryBroker()
    broker.publish("q", b"x", headers={"trace-id": b"1"})
    [envelope] = broker.take("q", 1, owner=1)
    context = MessageContext(envelope, "q", "app")
    with pytest.raises(TypeError):
        context.headers["trace-id"] = b"changed"  # type: ignore[index]
    with pytest.raises(AttributeError):
        context.headers.pop("trace-id")  # type: ignore[attr-defined]
    copy = dict(context.headers)
    copy["more"] = b"y"
    broker.nack("q", [envelope.position], owner=1)
    [again] = broker.take("q", 1, owner=2)
    assert again.attempt == 2
    assert MessageContext(again, "q", "app").headers == {"trace-id": b"1"}
    assert broker.produced_records("q")[0].headers == {"trace-id": b"1"}


def test_a_message_without_headers_has_an_empty_read_only_mapping() -> None:
    broker = MemoryBroker()
    broker.publish("q", b"x")
    [envelope] = broker.take("q", 1)
    headers = MessageContext(envelope, "q", "app").headers
    assert headers == {}
    with pytest.raises(TypeError):
        headers["x"] = b"y"  # type: ignore[index]
