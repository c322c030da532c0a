"""The serializer on its own, and through an Engine, as a queue configuration names
it."""

from __future__ import annotations

import gzip

import pytest
from volley_jsongz import GzipJsonSerializer

from volley import Engine, SerializationError
from volley.plugins import get_registry
from volley.testing import harness


def test_round_trip() -> None:
    serializer = GzipJsonSerializer()
    message = {
        "order_id": 7,
        "lines": [{"sku": "A-1", "qty": 2}] * 100,
        "note": "ünïcode",
    }
    payload = serializer.serialize(message)
    assert payload[:2] == b"\x1f\x8b"  # a gzip member
    assert serializer.deserialize(payload) == message


@pytest.mark.parametrize(
    "payload",
    [b"plain text", gzip.compress(b"{not json"), gzip.compress(b"[1, 2]")[:-4]],
)
def test_bad_input_is_a_serialization_error(payload: bytes) -> None:
    with pytest.raises(SerializationError):
        GzipJsonSerializer().deserialize(payload)


def test_zip_bomb_is_refused() -> None:
    bomb = gzip.compress(b"[" + b"0," * 1_000_000 + b"0]")
    with pytest.raises(SerializationError, match="more than"):
        GzipJsonSerializer(max_size=1024).deserialize(bomb)


def test_registered_through_the_entry_point() -> None:
    assert ("serializer", "json-gzip") in get_registry()


def test_an_engine_uses_it_by_name() -> None:
    app = Engine(
        app_name="compressor",
        input_queue="in",
        output_queues=["out"],
        dead_letter_queue="dlq",
        queue_config={
            "in": {"value": "in", "profile": "memory"},
            "out": {"value": "out", "profile": "memory", "serializer": "json-gzip"},
            "dlq": {"value": "dlq", "profile": "memory-dlq"},
        },
        metrics_port=None,
    )

    @app.stream_app
    def compress(message: dict) -> list[tuple[str, dict]]:
        return [("out", message)]

    h = harness(compress)
    h.send({"order_id": 1})
    result = h.run()
    assert result.outputs("out") == [{"order_id": 1}]
    assert gzip.decompress(result.raw("out")[0].value) == b'{"order_id":1}'
