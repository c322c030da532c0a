"""orjson + Pydantic read and write JSON bytes in one call (``bind_fused_decode``, JSON-mode ``to_json``).

The two-step path (orjson to plain data, then Pydantic's Python-mode validation) refused an integer beyond 64
bits on both sides: read, orjson makes it a float that no ``int`` field accepts (the input was dead-lettered);
written, orjson refuses it (the output failed). The fused path reads the bytes with Pydantic's own parser in JSON
mode and writes them with Pydantic's JSON encoder (the same bytes orjson writes, wherever orjson can); anything
the fused decode refuses still goes through the two steps, which say what is wrong.
"""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any
from uuid import UUID

import orjson
import pytest
from pydantic import BaseModel, ConfigDict, Field, field_validator

from volley import Engine, MemoryBroker
from volley.plugins import get_registry
from volley.queues import ResolvedQueue, resolve_queue
from volley_serializers import OrjsonSerializer, PydanticModelHandler

BIG = 2**70 + 1


class Ledger(BaseModel):
    account: int
    note: str = ""


class Blob(BaseModel):
    model_config = ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    name: str
    raw: bytes


class Checked(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def positive(cls, value: int) -> int:
        if value <= 0:
            raise ValueError("must be positive")
        return value


def resolve(model: Any, *, handler: Any = "pydantic", serializer: Any = "orjson", role: str = "input") -> ResolvedQueue:
    settings = {"value": "q", "connector": "memory", "serializer": serializer, "model_handler": handler,
                "data_model": model}
    return resolve_queue(get_registry(), "q", settings, "t", role)


def run_one(model: type[BaseModel], payload: bytes, output: Any = None) -> tuple[list[Any], list[bytes], MemoryBroker]:
    broker = MemoryBroker()
    profile = {"profile": "memory-orjson-pydantic", "config": {"broker": broker}}
    engine = Engine(app_name="t", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                    queue_config={"in": {"value": "in", "data_model": model, **profile},
                                  "out": {"value": "out", "data_model": model, **profile},
                                  "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}}},
                    metrics_port=None, poll_interval_seconds=0.02)
    seen: list[Any] = []
    broker.publish("in", payload)

    @engine.stream_app
    def handle(message: Any) -> list[tuple[str, Any]]:
        seen.append(message)
        return [("out", message if output is None else output)]

    handle.run_until_drained(timeout=20)
    return seen, broker.produced("out"), broker


def test_an_integer_beyond_64_bits_reaches_the_handler_exactly() -> None:
    seen, written, _ = run_one(Ledger, orjson.dumps({"account": 1}).replace(b"1", str(BIG).encode()))
    assert [m.account for m in seen] == [BIG]  # dead-lettered before: "exceeded maximum size"
    assert orjson.loads(written[0].replace(str(BIG).encode(), b"0")) == {"account": 0, "note": ""}
    assert str(BIG).encode() in written[0]


def test_an_integer_beyond_64_bits_is_written_not_refused() -> None:
    _, written, broker = run_one(Ledger, b'{"account": 1}', output=Ledger(account=BIG))
    assert broker.produced("dlq") == []  # "Integer exceeds 64-bit range" before
    assert written == [b'{"account":' + str(BIG).encode() + b',"note":""}']


def test_base64_bytes_come_back_as_they_were_written() -> None:
    blob = Blob(name="b", raw=b"\x00\xff binary")
    payload = resolve(Blob, role="output").encode(blob)
    assert orjson.loads(payload)["raw"] == "AP8gYmluYXJ5"
    seen, written, _ = run_one(Blob, payload)
    assert seen == [blob]
    assert written == [payload]


def test_orjson_declares_json_and_the_pydantic_handler_fuses_with_it() -> None:
    from volley.ports import DeclaresWireFormat, FusedDecodeBinder

    assert isinstance(OrjsonSerializer(), DeclaresWireFormat) and OrjsonSerializer().wire_format == "json"
    assert isinstance(PydanticModelHandler(), FusedDecodeBinder)
    queue = resolve(Ledger)
    assert queue.fused_decode is not None
    assert queue.fused_decode(b'{"account": 3}') == Ledger(account=3)
    assert resolve(Ledger, serializer="json").fused_decode is None  # no declaration: the two steps
    assert resolve(Ledger, serializer="msgpack").fused_decode is None
    assert resolve(None).fused_decode is None


def test_a_model_with_validators_of_its_own_is_not_fused() -> None:
    """A refused input is read again by the two steps, to say why: validators would run twice."""
    assert resolve(Checked).fused_decode is None


class OwnUnchecked(PydanticModelHandler):
    """A subclass that validates its own way: fusing would skip it."""

    def bind_unchecked(self, schema: Any) -> Any:
        return self.bind(schema)


def test_a_subclass_with_its_own_validation_is_not_fused() -> None:
    assert resolve(Ledger, handler=OwnUnchecked()).fused_decode is None


def test_what_the_fused_decode_refuses_is_explained_by_the_two_steps() -> None:
    for payload, stage, reason in [(b'{"account": "x"}', b"validate", b"account: Input should be a valid integer"),
                                   (b'{"account": ', b"deserialize", b"JSONDecodeError: unexpected end of data")]:
        _, _, broker = run_one(Ledger, payload)
        [letter] = [env.headers or {} for env in broker.produced_records("dlq")]
        assert letter["volley-error-stage"] == stage and reason in letter["volley-error-reason"]


@pytest.mark.parametrize("text", [b'{"account": 7}', b'{"account": 7.0}', b'{"account": "7"}',
                                  b'{"account": 7, "account": 8}', b' {"account": 7} '])
def test_the_fused_decode_agrees_with_the_two_steps(text: bytes) -> None:
    queue = resolve(Ledger)
    assert queue.fused_decode is not None
    assert queue.fused_decode(text) == queue.validate(queue.deserialize(text))


# ------------------------------------------------------------------ where the fused path must step aside (review)


class SortedKeys(OrjsonSerializer):
    """A subclass that writes other bytes (the class's own comment told it to change both encode functions)."""

    def __init__(self) -> None:
        super().__init__()
        self.serialize = self.unchecked_serialize = lambda message: orjson.dumps(message,
                                                                                option=orjson.OPT_SORT_KEYS)


class Pair(BaseModel):
    z: int
    a: int


def test_a_subclass_of_orjson_keeps_its_own_bytes() -> None:
    """A subclass inherited wire_format = "json": Pydantic wrote the bytes instead, and {"a":2,"z":1} came out as
    {"z":1,"a":2}. A subclass declares JSON itself, or is not fused."""
    queue = resolve(Pair, serializer=SortedKeys(), role="output")
    assert queue.encode(Pair(z=1, a=2)) == b'{"a":2,"z":1}'
    assert resolve(Pair, serializer=SortedKeys()).fused_decode is None


class Ref(BaseModel):
    ref: UUID | str
    body: bytes | str
    at: datetime | str


def test_a_model_with_a_union_reads_what_the_two_steps_read() -> None:
    """In JSON mode a smart union takes a string for a UUID, bytes or a datetime as readily as for a str: the
    handler got UUID / bytes / datetime where it had always got str."""
    text = b'{"ref": "12345678-1234-5678-1234-567812345678", "body": "hello", "at": "2026-12-07T10:00:00Z"}'
    seen, _, _ = run_one(Ref, text)
    assert [(type(m.ref), type(m.body), type(m.at)) for m in seen] == [(str, str, str)]
    assert resolve(Ref).fused_decode is None

    class Optional(BaseModel):  # nullable is no union: fused
        ref: str | None = None

    assert resolve(Optional).fused_decode is not None


class Reading(BaseModel):
    value: float


@pytest.mark.parametrize("text", [b'{"value": NaN}', b'{"value": -Infinity}', b'{"value": Infinity}'])
def test_nan_and_infinity_are_still_refused_as_orjson_refuses_them(text: bytes) -> None:
    """Pydantic's parser reads them; the output then said null, which the next hop's same model refused. They go
    to the dead-letter queue at the first hop, as before."""
    seen, _, broker = run_one(Reading, text)
    assert seen == []
    [letter] = [env.headers or {} for env in broker.produced_records("dlq")]
    assert letter["volley-error-stage"] == b"deserialize"
    assert run_one(Reading, b'{"value": 1.5, "note": "NaN Infinity"}')[0] == [Reading(value=1.5)]


class Constants(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="constants")
    value: float


def test_a_model_writing_nan_as_a_constant_still_gets_json() -> None:
    """to_json honours ser_json_inf_nan="constants" and wrote NaN, which is not JSON; orjson wrote null."""
    assert resolve(Constants, role="output").encode(Constants(value=float("nan"))) == b'{"value":null}'


# ------------------------------------------------------------------ second review


class Strings(BaseModel):
    model_config = ConfigDict(ser_json_inf_nan="strings")
    value: float


class Holder(BaseModel):
    inner: Strings


def test_nan_dumped_as_a_string_is_still_written_as_orjson_wrote_it() -> None:
    """to_json wrote "Infinity" where the JSON-mode dump and orjson wrote null (a nested model's config too)."""
    assert resolve(Strings, role="output").encode(Strings(value=float("inf"))) == b'{"value":null}'
    assert resolve(Holder, role="output").encode(Holder(inner=Strings(value=float("nan")))) == (
        b'{"inner":{"value":null}}')


class Keyed(BaseModel):
    counts: dict[int | str, int]


def test_dict_keys_that_become_one_string_are_written_once() -> None:
    assert resolve(Keyed, role="output").encode(Keyed(counts={1: 5, "1": 7})) == b'{"counts":{"1":7}}'


class Money(BaseModel):
    amount: Decimal


class Coerced(BaseModel):
    code: str = Field(coerce_numbers_to_str=True)


def next_number() -> int:
    return 1


class Numbered(BaseModel):
    n: int = Field(default_factory=next_number)
    tags: list[str] = Field(default_factory=list)


def test_models_json_mode_reads_otherwise_keep_the_two_steps() -> None:
    """Decimal('10.0') came out as Decimal('10'), '1.0' as '1'; an own default factory ran a third time."""
    seen, written, _ = run_one(Money, b'{"amount": 10.0}')
    assert [str(m.amount) for m in seen] == ["10.0"] and written == [b'{"amount":"10.0"}']
    assert [m.code for m in run_one(Coerced, b'{"code": 1.0}')[0]] == ["1.0"]
    assert resolve(Money).fused_decode is None and resolve(Coerced).fused_decode is None
    assert resolve(Numbered).fused_decode is None
    assert resolve(Pair).fused_decode is not None  # builtin factories and plain fields are fused


def test_a_model_that_cannot_keep_nan_is_read_without_the_check() -> None:
    fused = resolve(Pair).fused_decode
    assert fused is not None and not hasattr(fused, "__code__")  # Pydantic's own function, no wrapper
    assert resolve(Reading).fused_decode is not resolve(Pair).fused_decode
