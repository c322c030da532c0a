"""A message that fails validation is validated once: its validators run once, and the error is theirs.

The engine's hot loop validated with Pydantic's unchecked validator and, when that raised, validated the
same data again through the checked one to word the error: a model's own validators (side effects, cost,
answers that change between calls) ran twice.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any

import orjson
import pytest
from pydantic import AfterValidator, BaseModel, field_validator, model_validator

from volley import Engine, MemoryBroker
from volley_serializers.pydantic_handlers import PydanticModelHandler, PydanticParserModelHandler

CALLS: list[Any] = []


@pytest.fixture(autouse=True)
def calls() -> Iterator[list[Any]]:
    CALLS.clear()
    yield CALLS
    CALLS.clear()


class Order(BaseModel):
    n: int

    @field_validator("n")
    @classmethod
    def positive(cls, value: int) -> int:
        CALLS.append(value)
        if value < 0:
            raise ValueError(f"n must not be negative (call {len(CALLS)})")
        return value


class Checked(BaseModel):
    n: int

    @model_validator(mode="after")
    def small(self) -> Checked:
        CALLS.append(self.n)
        if self.n > 100:
            raise ValueError(f"n too large (call {len(CALLS)})")
        return self


def _even(value: int) -> int:
    CALLS.append(value)
    if value % 2:
        raise ValueError(f"n must be even (call {len(CALLS)})")
    return value


class Inner(BaseModel):
    n: Annotated[int, AfterValidator(_even)]


class Outer(BaseModel):
    inner: Inner


class Flaky(BaseModel):
    """Refuses the first message it sees, accepts it when asked again."""

    n: int

    @field_validator("n")
    @classmethod
    def first_call_fails(cls, value: int) -> int:
        CALLS.append(value)
        if len(CALLS) == 1:
            raise ValueError("refused on the first call")
        return value


PROFILES = ["memory-orjson-pydantic", "memory-msgpack-pydantic", "memory-json-pydantic", "memory-pydantic"]
CASES: list[tuple[Any, dict[str, Any], str]] = [
    (Order, {"n": -1}, "n must not be negative (call 1)"),
    (Checked, {"n": 101}, "n too large (call 1)"),
    (Outer, {"inner": {"n": 3}}, "n must be even (call 1)"),
]


def run(profile: str, model: Any, data: dict[str, Any], handler: str | None = None) -> tuple[int, list[str]]:
    broker = MemoryBroker()
    queue: dict[str, Any] = {"value": "in", "profile": profile, "data_model": model, "config": {"broker": broker}}
    if handler is not None:
        queue["model_handler"] = handler
    config = {"in": queue, "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}}}
    engine = Engine(app_name="t", input_queue="in", dead_letter_queue="dlq", queue_config=config,
                    metrics_port=None, poll_interval_seconds=0.02)
    # memory-pydantic has no serializer: its handler parses the JSON bytes itself.
    serialize = orjson.dumps if profile == "memory-pydantic" else engine.input.serializer.serialize
    broker.publish("in", serialize(data))
    handled: list[Any] = []

    @engine.stream_app
    def handle(message: Any) -> None:
        handled.append(message)

    report = handle.run_until_drained(timeout=20)
    reasons = [(env.headers or {}).get("volley-error-reason", b"").decode() for env in broker.produced_records("dlq")]
    assert report.dead_lettered == len(reasons)
    return len(handled), reasons


@pytest.mark.parametrize("profile", PROFILES)
@pytest.mark.parametrize(("model", "data", "reason"), CASES, ids=["field", "model", "nested-annotated"])
def test_a_failing_validator_runs_once_and_its_error_is_the_reason(
    profile: str, model: Any, data: dict[str, Any], reason: str
) -> None:
    handled, reasons = run(profile, model, data)
    assert handled == 0
    assert len(CALLS) == 1, f"the validator ran {len(CALLS)} times"
    assert len(reasons) == 1 and reason in reasons[0], reasons


def test_the_batch_handler_validates_once_too() -> None:
    handled, reasons = run("memory-orjson-pydantic", Order, {"n": -1}, handler="pydantic-list")
    assert (handled, len(CALLS)) == (0, 1)
    assert "call 1" in reasons[0]


@pytest.mark.parametrize("profile", PROFILES)
def test_a_message_refused_once_is_not_let_through_by_a_second_try(profile: str) -> None:
    """Validated again, a validator that answers differently the second time let the message through."""
    handled, reasons = run(profile, Flaky, {"n": 1})
    assert (handled, len(CALLS)) == (0, 1)
    assert "refused on the first call" in reasons[0]


@dataclass
class Pure:
    n: int


@pytest.mark.parametrize("handler", [PydanticModelHandler(), PydanticParserModelHandler()])
@pytest.mark.parametrize("schema", [Order, Checked, Outer, list[Order]])
def test_a_schema_with_validators_is_validated_through_the_checked_function(handler: Any, schema: Any) -> None:
    assert handler.bind_unchecked(schema) is handler.bind(schema)  # the engine then validates only once


@pytest.mark.parametrize("handler", [PydanticModelHandler(), PydanticParserModelHandler()])
@pytest.mark.parametrize("schema", [Pure, list[int], dict[str, float]])
def test_a_schema_without_code_of_its_own_keeps_the_unchecked_fast_path(handler: Any, schema: Any) -> None:
    assert handler.bind_unchecked(schema) is not handler.bind(schema)
