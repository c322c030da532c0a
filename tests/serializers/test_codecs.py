"""Every serializer and serializer + model handler pair: round trips, bad input, fuzzing, output types.

The pairs are resolved exactly as the engine resolves a queue (``volley.queues.resolve_queue``),
so the functions under test are the ones the engine calls per message: ``deserialize``, the
handler's bound ``validate`` and the queue's ``encode``.
"""

from __future__ import annotations

import enum
import json
from datetime import UTC, date, datetime, timedelta, timezone
from decimal import Decimal
from typing import Any
from uuid import UUID

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from pydantic import BaseModel, ValidationError

from volley.errors import DataValidationError, SerializationError
from volley.plugins import get_registry
from volley.queues import ResolvedQueue, resolve_queue
from volley_serializers.models import GenericMessage

# ------------------------------------------------------------------ data models


class Color(enum.Enum):
    RED = "red"
    GREEN = "green"


class Level(enum.IntEnum):
    LOW = 1
    HIGH = 2


class Address(BaseModel):
    street: str
    postcode: str | None = None


class Order(BaseModel):
    """A model with every kind of field the round trip must preserve."""

    order_id: UUID
    created_at: datetime
    ship_on: date
    amount: Decimal
    color: Color
    level: Level
    quantity: int
    weight: float | None = None
    address: Address
    history: list[Address] = []
    flags: dict[str, bool] = {}
    note: str | None = None


SERIALIZERS = ("json", "orjson", "msgpack")
PAIRS = [(s, h) for s in SERIALIZERS for h in ("pydantic", "pydantic-list")] + [("none", "pydantic-parser")]
PAIR_IDS = [f"{s}+{h}" for s, h in PAIRS]
ALL_PAIRS = [*PAIRS, *((s, "none") for s in SERIALIZERS)]
ALL_PAIR_IDS = [f"{s}+{h}" for s, h in ALL_PAIRS]


def resolve(serializer: str, handler: str, model: Any, role: str = "input") -> ResolvedQueue:
    settings = {"value": "q", "connector": "memory", "serializer": serializer, "model_handler": handler,
                "data_model": model}
    return resolve_queue(get_registry(), "q", settings, "test", role)


def same(a: Any, b: Any) -> bool:
    """Equal, and of the same types all the way down (1 is not 1.0 is not True)."""
    if type(a) is not type(b):
        return False
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(same(a[k], b[k]) for k in a)
    if isinstance(a, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return bool(a == b)


# ------------------------------------------------------------------ strategies

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=25,
)
msgpack_values = st.recursive(
    json_scalars | st.binary(),
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(), inner, max_size=5),
    max_leaves=25,
)
offsets = st.integers(min_value=-(23 * 60 + 59), max_value=23 * 60 + 59).map(
    lambda minutes: timezone(timedelta(minutes=minutes))
)
addresses = st.builds(Address, street=st.text(max_size=20), postcode=st.none() | st.text(max_size=8))
orders = st.builds(
    Order,
    order_id=st.uuids(),
    created_at=st.datetimes(timezones=st.none() | offsets),
    ship_on=st.dates(),
    amount=st.decimals(min_value=-(10**12), max_value=10**12, places=4),
    color=st.sampled_from(Color),
    level=st.sampled_from(Level),
    quantity=st.integers(min_value=-(2**63), max_value=2**63 - 1),
    weight=st.none() | st.floats(allow_nan=False, allow_infinity=False),
    address=addresses,
    history=st.lists(addresses, max_size=3),
    flags=st.dictionaries(st.text(max_size=5), st.booleans(), max_size=3),
    note=st.none() | st.text(),
)

EXAMPLE = Order(order_id=UUID(int=7), created_at=datetime(2026, 11, 28, 8, 0, 0, 123456, tzinfo=UTC),
                ship_on=date(2026, 12, 1), amount=Decimal("12.3400"), color=Color.GREEN, level=Level.HIGH,
                quantity=3, weight=0.5, address=Address(street="Main St 1"), note=None)


# ------------------------------------------------------------------ round trips


@pytest.mark.parametrize("name", SERIALIZERS)
@given(value=json_values)
@settings(max_examples=150, deadline=None)
def test_every_serializer_round_trips_json_values(name: str, value: Any) -> None:
    queue = resolve(name, "none", None)
    assert same(queue.deserialize(queue.encode(value)), value)


@given(value=msgpack_values)
@settings(max_examples=150, deadline=None)
def test_msgpack_round_trips_bytes_too(value: Any) -> None:
    queue = resolve("msgpack", "none", None)
    assert same(queue.deserialize(queue.encode(value)), value)


@pytest.mark.parametrize(("serializer", "handler"), PAIRS, ids=PAIR_IDS)
@given(order=orders)
@example(order=EXAMPLE)
@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_models_round_trip_through_every_pair(serializer: str, handler: str, order: Order) -> None:
    queue = resolve(serializer, handler, Order)
    encoded = queue.encode(order)
    back = queue.validate(queue.deserialize(encoded))
    assert type(back) is Order
    assert back == order
    if queue.fused_decode is not None:  # orjson: Pydantic reads the bytes itself, to the same model
        if b"NaN" in encoded or b"Infinity" in encoded:  # left to the two steps (orjson refuses those literals)
            with pytest.raises(ValueError, match="NaN or Infinity"):
                queue.fused_decode(encoded)
        else:
            fused = queue.fused_decode(encoded)
            assert type(fused) is Order and fused == order


@pytest.mark.parametrize(("serializer", "handler"), PAIRS, ids=PAIR_IDS)
@given(order=orders)
@settings(max_examples=30, deadline=None)
def test_models_round_trip_through_the_handlers_own_methods(serializer: str, handler: str, order: Order) -> None:
    """construct / deconstruct (the protocol) agree with the engine's bound fast paths.

    With msgpack the engine hands the serializer the model itself (Python mode: bytes stay bytes), while
    ``deconstruct`` keeps returning JSON-mode data: the bytes may differ, the model read back may not.
    """
    queue = resolve(serializer, handler, Order)
    h = queue.model_handler
    wire = queue.serializer.serialize(h.deconstruct(order))
    if serializer != "msgpack":
        assert wire == queue.encode(order)
    assert h.construct(queue.serializer.deserialize(wire), Order) == order
    assert h.construct(queue.serializer.deserialize(queue.encode(order)), Order) == order


@given(fields=st.dictionaries(st.text(), json_values, max_size=6))
@settings(max_examples=100, deadline=None)
def test_generic_message_keeps_any_json_object(fields: dict[str, Any]) -> None:
    for serializer, handler in PAIRS:
        queue = resolve(serializer, handler, GenericMessage)
        message = queue.validate(queue.deserialize(queue.encode(GenericMessage.model_validate(fields))))
        assert same(message.model_dump(), fields), (serializer, handler)


@given(order=orders)
@settings(max_examples=50, deadline=None)
def test_json_paths_write_interchangeable_bytes(order: Order) -> None:
    """What pydantic-parser writes, orjson + pydantic reads, and the other way round: one wire format."""
    parser = resolve("none", "pydantic-parser", Order)
    via_orjson = resolve("orjson", "pydantic", Order)
    via_json = resolve("json", "pydantic", Order)
    assert via_orjson.validate(via_orjson.deserialize(parser.encode(order))) == order
    assert parser.validate(parser.deserialize(via_orjson.encode(order))) == order
    assert parser.validate(parser.deserialize(via_json.encode(order))) == order


def test_pydantic_list_handles_whole_batches() -> None:
    queue = resolve("orjson", "pydantic-list", Order)
    handler = queue.model_handler
    second = EXAMPLE.model_copy(update={"quantity": 4})
    data = queue.serializer.deserialize(queue.serializer.serialize(handler.deconstruct([EXAMPLE, second])))
    assert isinstance(data, list) and len(data) == 2
    assert handler.construct(data, Order) == [EXAMPLE, second]
    assert queue.validate(data[1]) == second  # the engine's path: one record at a time
    assert queue.deserialize(queue.encode([EXAMPLE, second])) == data


# ------------------------------------------------------------------ bad input

TRUNCATED = {"json": b'{"a": [1, 2', "orjson": b'{"a": [1, 2', "msgpack": b"\x82\xa1a\x01", "none": b'{"a": [1, 2'}
BAD_INPUTS: list[tuple[str, bytes]] = [
    ("empty", b""),
    ("utf16", json.dumps({"order_id": 1}).encode("utf-16")),
    ("latin1 in a string", b'{"street": "Stra\xdfe"}'),
    ("huge integer", b"1" * 5000),
    ("huge float", b'{"amount": 1e999}'),
    ("deeply nested arrays", b"[" * 100_000 + b"]" * 100_000),
    ("deeply nested objects", b'{"a":' * 50_000 + b"1" + b"}" * 50_000),
    ("msgpack nested", b"\x91" * 100_000 + b"\xc0"),
    ("msgpack claims 4G items", b"\xdd\xff\xff\xff\xff"),
    ("NUL bytes", b"\x00" * 64),
]
# core's stdlib json reads UTF-16 with a BOM and 1e999 (as inf); without a data model nothing rejects them.
STDLIB_JSON_ACCEPTS = {("json", "none", "utf16"), ("json", "none", "huge float")}


@pytest.mark.parametrize(("serializer", "handler"), ALL_PAIRS, ids=ALL_PAIR_IDS)
@pytest.mark.parametrize(("label", "payload"), BAD_INPUTS, ids=[b[0] for b in BAD_INPUTS])
def test_bad_input_raises_a_documented_error(serializer: str, handler: str, label: str, payload: bytes) -> None:
    queue = resolve(serializer, handler, Order if handler != "none" else None)
    if (serializer, handler, label) in STDLIB_JSON_ACCEPTS:
        assert queue.validate(queue.deserialize(payload)) is not None  # valid to the standard library: no model
        return
    with pytest.raises((SerializationError, DataValidationError)) as caught:
        queue.validate(queue.deserialize(payload))
    error = caught.value
    assert error.reason and "\n" not in error.reason
    assert len(error.reason) <= 600
    if isinstance(error, SerializationError):
        assert error.payload == payload


@pytest.mark.parametrize("serializer", [*SERIALIZERS, "none"])
def test_truncated_payload_is_a_serialization_error(serializer: str) -> None:
    queue = resolve(serializer, "pydantic-parser" if serializer == "none" else "pydantic", Order)
    with pytest.raises(SerializationError) as caught:
        queue.validate(queue.deserialize(TRUNCATED[serializer]))
    assert caught.value.payload == TRUNCATED[serializer]


@pytest.mark.parametrize(("serializer", "handler"), PAIRS, ids=PAIR_IDS)
def test_valid_data_of_the_wrong_shape_is_a_validation_error(serializer: str, handler: str) -> None:
    writer = resolve(serializer if serializer != "none" else "orjson", "none", None)
    queue = resolve(serializer, handler, Order)
    for wrong in ([1, 2, 3], "text", 42, {"order_id": "not a uuid"}, {**EXAMPLE.model_dump(mode="json"),
                                                                     "quantity": "many"}):
        payload = writer.encode(wrong)
        with pytest.raises(DataValidationError) as caught:
            queue.validate(queue.deserialize(payload))
        reason = caught.value.reason
        assert "Order" in reason and "\n" not in reason
    with pytest.raises(DataValidationError, match=r"quantity: Input should be a valid integer"):
        queue.validate(queue.deserialize(writer.encode({**EXAMPLE.model_dump(mode="json"), "quantity": "x"})))


def test_orjson_rejects_numbers_it_cannot_hold() -> None:
    queue = resolve("orjson", "pydantic", Order)
    with pytest.raises(SerializationError, match="infinity"):
        queue.deserialize(b'{"quantity": 1e400}')
    with pytest.raises(SerializationError, match="64-bit"):
        queue.serializer.serialize({"quantity": 2**64})
    big = resolve("msgpack", "none", None)
    with pytest.raises(SerializationError, match="out of range"):
        big.encode({"quantity": -(2**63) - 1})


def test_parser_without_bytes_says_how_to_configure_it() -> None:
    queue = resolve("orjson", "pydantic-parser", Order)  # a serializer in front of the parser: a mistake
    with pytest.raises(DataValidationError, match="serializer 'none'"):
        queue.validate(queue.deserialize(queue.serializer.serialize({"quantity": 1})))


# ------------------------------------------------------------------ fuzzing: nothing but the two documented errors


def _valid_payloads() -> dict[str, bytes]:
    data = EXAMPLE.model_dump(mode="json")
    return {s: resolve(s, "none", None).encode(data) for s in SERIALIZERS} | {
        "none": resolve("none", "pydantic-parser", Order).encode(EXAMPLE)}


VALID = _valid_payloads()


@st.composite
def fuzzed(draw: st.DrawFn, serializer: str) -> bytes:
    """Random bytes, or a valid payload truncated, with bytes flipped, or spliced with random bytes."""
    choice = draw(st.integers(0, 3))
    if choice == 0:
        return draw(st.binary(max_size=300))
    base = bytearray(VALID[serializer])
    if choice == 1:
        return bytes(base[: draw(st.integers(0, len(base)))])
    if choice == 2:
        for _ in range(draw(st.integers(1, 8))):
            base[draw(st.integers(0, len(base) - 1))] = draw(st.integers(0, 255))
        return bytes(base)
    at = draw(st.integers(0, len(base)))
    return bytes(base[:at]) + draw(st.binary(max_size=40)) + bytes(base[at:])


@pytest.mark.parametrize(("serializer", "handler"), ALL_PAIRS, ids=ALL_PAIR_IDS)
@pytest.mark.parametrize("model", [Order, GenericMessage], ids=["Order", "GenericMessage"])
@given(data=st.data())
@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
def test_fuzz_only_documented_errors_escape(serializer: str, handler: str, model: type[BaseModel],
                                           data: st.DataObject) -> None:
    payload = data.draw(fuzzed(serializer))
    queue = resolve(serializer, handler, model if handler != "none" else None)
    try:
        message = queue.validate(queue.deserialize(payload))
    except (SerializationError, DataValidationError) as exc:
        reason = exc.reason
    else:
        if queue.fused_decode is not None:  # where both read it, Pydantic's own reading agrees with the two steps
            try:
                fused = queue.fused_decode(payload)
            except ValueError:
                pass
            else:
                assert fused == message
        # What got in must get out again, or fail as a SerializationError (msgpack extension types, say).
        assert handler == "none" or isinstance(message, model)
        try:
            queue.encode(message)
        except SerializationError as exc:
            reason = exc.reason
        else:
            reason = "ok"
    assert reason and "\n" not in reason


# ------------------------------------------------------------------ output validation


@pytest.mark.parametrize(("serializer", "handler"), PAIRS, ids=PAIR_IDS)
def test_output_of_the_wrong_type_is_a_clear_type_error(serializer: str, handler: str) -> None:
    queue = resolve(serializer, handler, Order, role="output")
    for wrong in (EXAMPLE.model_dump(), Address(street="x"), GenericMessage(**EXAMPLE.model_dump())):
        with pytest.raises(TypeError, match=rf"Order.*{type(wrong).__qualname__}|{type(wrong).__qualname__}.*Order"):
            queue.encode(wrong)
    assert queue.encode(EXAMPLE)


def test_handlers_check_output_and_bind_deconstruct_name_both_types() -> None:
    for handler in ("pydantic", "pydantic-parser", "pydantic-list"):
        h = resolve("orjson", handler, Order).model_handler
        h.check_output(EXAMPLE, Order)
        with pytest.raises(TypeError, match=r"data model is Order, but the handler produced dict"):
            h.check_output({"quantity": 1}, Order)
        with pytest.raises(TypeError, match=r"data model is Order, but the handler produced Address"):
            h.bind_deconstruct(Order)(Address(street="x"))
        with pytest.raises(TypeError, match=r"queue 'out''s data model is Order, but the handler produced dict"):
            h.bind_deconstruct(Order, queue="out")({"quantity": 1})
        assert h.bind_deconstruct(Order, queue="out") is h.bind_deconstruct(Order, queue="out")
    lists = resolve("orjson", "pydantic-list", Order).model_handler
    lists.check_output([EXAMPLE, EXAMPLE], Order)
    with pytest.raises(TypeError, match="produced Address"):
        lists.check_output([EXAMPLE, Address(street="x")], Order)


def test_a_subclass_of_the_model_is_accepted_and_dumped_whole() -> None:
    class Special(Order):
        priority: bool = True

    queue = resolve("orjson", "pydantic", Order, role="output")
    special = Special(**dict(EXAMPLE))
    assert json.loads(queue.encode(special))["priority"] is True
    assert json.loads(resolve("none", "pydantic-parser", Order).encode(special))["priority"] is True


@pytest.mark.parametrize("serializer", SERIALIZERS)
def test_unencodable_values_are_serialization_errors(serializer: str) -> None:
    queue = resolve(serializer, "none", None, role="output")
    with pytest.raises(SerializationError) as caught:
        queue.encode({"x": object()})
    assert caught.value.reason and "\n" not in caught.value.reason


# ------------------------------------------------------------------ the engine's fast paths


FUSED = "PydanticModelHandler.bind_fast_encode"  # bind_fused_encode hands JSON mode to it: its encode


@pytest.mark.parametrize("handler", ["pydantic", "pydantic-list"])
def test_the_fused_orjson_encoder_writes_what_the_checked_one_writes(handler: str) -> None:
    queue = resolve("orjson", handler, Order, role="output")
    assert FUSED in queue.encode.__qualname__, "orjson + pydantic should get the fused encoder"
    checked = queue.serializer.serialize(queue.model_handler.bind_deconstruct(Order, "q")(EXAMPLE))
    assert queue.encode(EXAMPLE) == checked
    # no unchecked serializer: no fusion, the plain chain
    assert FUSED not in resolve("json", handler, Order, role="output").encode.__qualname__


def test_the_fused_encoder_explains_failures_through_the_checked_path() -> None:
    class Opaque:
        pass

    class Holder(BaseModel, arbitrary_types_allowed=True):
        thing: Opaque

    queue = resolve("orjson", "pydantic", Holder, role="output")
    assert FUSED in queue.encode.__qualname__
    with pytest.raises(SerializationError) as caught:
        queue.encode(Holder(thing=Opaque()))
    assert "Holder" in caught.value.reason and "\n" not in caught.value.reason
    with pytest.raises(TypeError, match=r"Holder.*Address|Address.*Holder"):
        queue.encode(Address(street="x"))


@pytest.mark.parametrize(("serializer", "handler"), PAIRS, ids=PAIR_IDS)
def test_unchecked_validation_agrees_with_the_checked_one(serializer: str, handler: str) -> None:
    queue = resolve(serializer, handler, Order)
    assert queue.fast_validate is not queue.validate, "the Pydantic handlers offer bind_unchecked"
    data = queue.deserialize(resolve(serializer, handler, Order, role="output").encode(EXAMPLE))
    assert queue.fast_validate(data) == queue.validate(data) == EXAMPLE
    bad = queue.deserialize(resolve(serializer, "none", None, role="output").encode({"quantity": "many"})) \
        if serializer != "none" else b'{"quantity": "many"}'
    with pytest.raises(ValidationError):  # Pydantic's own error: the engine then asks validate() for the reason
        queue.fast_validate(bad)
    with pytest.raises((DataValidationError, SerializationError)):
        queue.validate(bad)
