"""Serializer x model handler benchmark: Volley's adapters against calling the libraries directly.

For each pair, one message round trip (bytes -> model -> bytes) is timed three ways:

- ``adapter_ns``: through the functions the engine calls per message, resolved exactly as the engine
  resolves a queue (``deserialize``, the handler's bound ``validate``, the output queue's ``encode``,
  which includes the output type check);
- ``direct_ns``: the libraries' public API as a user would write it, producing the same bytes
  (``Model.model_validate(orjson.loads(raw))``, ``orjson.dumps(m.model_dump(mode="json"))``, ...);
- ``floor_ns``: the same low-level library calls the adapters make (the model's pydantic-core validator and
  serializer), with no wrapper at all: what the adapters could cost at best.

``bound_adapter_ns`` is the adapter path with the output side through the handlers' ``bind_deconstruct``
fast path (one call for type check and dump), for when the engine adopts it.

``overhead`` is adapter / direct - 1 (target <= 0.10 for every pair; negative means faster than the
direct call), ``wrapper_overhead`` is adapter / floor - 1 (the price of error handling and type checks).
Each figure is the minimum over several repeats of a batch of distinct ~200-byte messages, with the three
variants interleaved so that machine noise hits them alike. Prints ``name: value`` lines.
"""

from __future__ import annotations

import gc
import json
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import msgpack
import orjson
from _orders import load_model

from volley.plugins import get_registry
from volley.queues import ResolvedQueue, resolve_queue

MESSAGES = 1000
REPEATS = 25


Order = load_model().Order


def make_orders(n: int) -> list[Order]:
    start = datetime(2026, 11, 28, 8, 0, tzinfo=UTC)
    return [
        Order(order_id=100_000 + i, customer=f"customer-{i % 997:04d}", amount=(i % 10_000) / 7, currency="EUR",
              created_at=start + timedelta(seconds=i), tags=["web", "eu", f"t{i % 13}"],
              note="deliver to the back door, please" if i % 3 else None)
        for i in range(n)
    ]


def resolve(serializer: str, handler: str, model: Any, role: str) -> ResolvedQueue:
    settings = {"value": "q", "connector": "memory", "serializer": serializer, "model_handler": handler,
                "data_model": model}
    return resolve_queue(get_registry(), "q", settings, "bench", role)


Codec = tuple[Callable[[bytes], Any], Callable[[Any], bytes]]


def library_codecs() -> dict[str, Codec]:
    encoder = json.JSONEncoder(separators=(",", ":"), ensure_ascii=False)  # core's json output, built once
    packer = msgpack.Packer()
    return {
        "json": (json.loads, lambda data: encoder.encode(data).encode()),
        "orjson": (orjson.loads, orjson.dumps),
        "msgpack": (msgpack.unpackb, packer.pack),
    }


def direct_round_trip(serializer: str, handler: str) -> Callable[[Any], bytes]:
    """The libraries' public API, as one would write it without Volley."""
    if handler == "pydantic-parser":
        validate_json = Order.model_validate_json
        return lambda raw: validate_json(raw).model_dump_json().encode()
    loads, dumps = library_codecs()[serializer]
    if handler == "none":
        return lambda raw: dumps(loads(raw))
    validate = Order.model_validate
    return lambda raw: dumps(validate(loads(raw)).model_dump(mode="json"))


def floor_round_trip(serializer: str, handler: str) -> Callable[[Any], bytes]:
    """The very calls the adapters make, unwrapped."""
    validator, dumper = Order.__pydantic_validator__, Order.__pydantic_serializer__
    if handler == "pydantic-parser":
        validate_json, to_json = validator.validate_json, dumper.to_json
        return lambda raw: to_json(validate_json(raw))  # type: ignore[no-any-return]
    loads, dumps = library_codecs()[serializer]
    if handler == "none":
        return lambda raw: dumps(loads(raw))
    validate_python, to_python = validator.validate_python, dumper.to_python
    return lambda raw: dumps(to_python(validate_python(loads(raw)), mode="json"))


def adapter_round_trip(serializer: str, handler: str) -> Callable[[Any], bytes]:
    model = None if handler == "none" else Order
    source, target = resolve(serializer, handler, model, "input"), resolve(serializer, handler, model, "output")
    deserialize, validate, encode = source.fast_deserialize, source.validate, target.encode
    return lambda raw: encode(validate(deserialize(raw)))


def bound_round_trip(serializer: str, handler: str) -> Callable[[Any], bytes]:
    """As ``adapter_round_trip``, with the output side through the handler's ``bind_deconstruct`` fast path
    (type check and dump in one call), which the engine does not use yet."""
    source, target = resolve(serializer, handler, Order, "input"), resolve(serializer, handler, Order, "output")
    deserialize, validate = source.fast_deserialize, source.validate
    serialize, dump = target.serializer.serialize, target.model_handler.bind_deconstruct(Order, "q")
    return lambda raw: serialize(dump(validate(deserialize(raw))))


def timed(round_trip: Callable[[Any], bytes], payloads: list[bytes]) -> float:
    """Nanoseconds per message for one pass over the batch."""
    started = time.perf_counter_ns()
    for raw in payloads:
        round_trip(raw)
    return (time.perf_counter_ns() - started) / len(payloads)


PAIRS = [
    ("orjson", "pydantic"),
    ("msgpack", "pydantic"),
    ("json", "pydantic"),
    ("none", "pydantic-parser"),
    ("orjson", "pydantic-list"),
    ("msgpack", "pydantic-list"),
    ("json", "pydantic-list"),
    ("orjson", "none"),
    ("msgpack", "none"),
    ("json", "none"),
]


def payloads_for(serializer: str, orders: list[Order]) -> list[bytes]:
    if serializer == "none":
        return [o.model_dump_json().encode() for o in orders]
    return [library_codecs()[serializer][1](o.model_dump(mode="json")) for o in orders]


def same_message(serializer: str, handler: str, written: bytes, expected: bytes) -> bool:
    """The same bytes; or, for msgpack with a Pydantic model, the same model read back: Volley's msgpack writes a
    model in Python mode (bytes stay bytes, datetimes as msgpack-friendly strings), the direct code in JSON mode,
    so the bytes may differ while the message is the same."""
    if written == expected:
        return True
    if serializer != "msgpack" or handler == "none":
        return False
    def model(data: bytes) -> Any:
        read = msgpack.unpackb(data)
        return [Order.model_validate(o) for o in read] if isinstance(read, list) else Order.model_validate(read)

    return bool(model(written) == model(expected))


def bench_pair(serializer: str, handler: str, orders: list[Order]) -> dict[str, float]:
    payloads = payloads_for(serializer, orders)
    variants = {
        "adapter": adapter_round_trip(serializer, handler),
        "direct": direct_round_trip(serializer, handler),
        "floor": floor_round_trip(serializer, handler),
    }
    if handler != "none":
        variants["bound"] = bound_round_trip(serializer, handler)
    expected = variants["direct"](payloads[0])
    for name, round_trip in variants.items():  # all three do the same work and write the same message
        assert same_message(serializer, handler, round_trip(payloads[0]), expected), (serializer, handler, name)
    best = dict.fromkeys(variants, float("inf"))
    for _ in range(REPEATS):
        for name, round_trip in variants.items():
            best[name] = min(best[name], timed(round_trip, payloads))
    return best


def main() -> None:
    orders = make_orders(MESSAGES)
    size = sum(len(p) for p in payloads_for("orjson", orders)) / len(orders)
    print(f"serializers.messages: {MESSAGES}")
    print(f"serializers.json_message_bytes: {size:.0f}")
    worst = float("-inf")
    gc_was_enabled = gc.isenabled()
    gc.collect()
    gc.disable()
    try:
        for serializer, handler in PAIRS:
            best = bench_pair(serializer, handler, orders)
            overhead = best["adapter"] / best["direct"] - 1
            worst = max(worst, overhead)
            prefix = f"serializers.{serializer}.{handler}"
            print(f"{prefix}.adapter_ns: {best['adapter']:.0f}")
            print(f"{prefix}.direct_ns: {best['direct']:.0f}")
            print(f"{prefix}.floor_ns: {best['floor']:.0f}")
            if "bound" in best:
                print(f"{prefix}.bound_adapter_ns: {best['bound']:.0f}")
            print(f"{prefix}.overhead: {overhead:.3f}")
            print(f"{prefix}.wrapper_overhead: {best['adapter'] / best['floor'] - 1:.3f}")
    finally:
        if gc_was_enabled:
            gc.enable()
    print(f"serializers.max_overhead: {worst:.3f}")
    print(f"serializers.target_met: {int(worst <= 0.10)}")


if __name__ == "__main__":
    main()
