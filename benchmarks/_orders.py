"""What every benchmark processes: ``Order`` in, ``Enriched`` out, the handler, and the input payloads.

``work`` is the whole per-message work done the fastest way we know (Pydantic's own JSON parser and encoder, what
Volley's orjson + pydantic profiles do: no dict in between): the hand-written ceilings, the bare loops
and the peers' programs call it, so that every system does the same work at the same cost.

The model is kept as source text because py-volley and the peers run in venvs of their own: they import the very
same classes from a module written next to their programs (``write_model``). In this process, ``load_model``
makes that module from the same text. ``timestamps``: the Kafka benchmarks' ``sent_at`` fields, for the
end-to-end latency (the others leave them out, so that they dump no extra fields).
"""

from __future__ import annotations

import sys
import types
from pathlib import Path
from typing import Any

_MODEL = '''
from datetime import datetime

from pydantic import BaseModel


class Order(BaseModel):
    order_id: int
    customer: str
    amount: float
    currency: str
    created_at: datetime
    tags: list[str]
    note: str | None = None{order_timestamps}


class Enriched(BaseModel):
    order_id: int
    customer: str
    amount_cents: int
    currency: str
    created_at: datetime
    tags: list[str]
    priority: bool{enriched_timestamps}


def handle(order: Order) -> Enriched:
    return Enriched(order_id=order.order_id, customer=order.customer, amount_cents=round(order.amount * 100),
                    currency=order.currency, created_at=order.created_at, tags=order.tags,
                    priority=order.amount > 1000{handle_timestamps})


_validate_json = Order.__pydantic_validator__.validate_json
_to_json = Enriched.__pydantic_serializer__.to_json


def work(value: bytes) -> bytes:
    """The whole per-message work, as fast as Pydantic does it: JSON bytes validated into an Order in one call
    (JSON mode, no dict in between), the handler, the Enriched written as JSON bytes in one call."""
    return _to_json(handle(_validate_json(value)))
'''


def model_source(*, timestamps: bool = False) -> str:
    if not timestamps:
        return _MODEL.format(order_timestamps="", enriched_timestamps="", handle_timestamps="")
    return _MODEL.format(
        order_timestamps="\n    sent_at: float | None = None",
        enriched_timestamps="\n    sent_at: float | None = None\n    input_appended_at: float | None = None",
        handle_timestamps=", sent_at=order.sent_at",
    )


def write_model(directory: Path, module: str, *, timestamps: bool = False) -> None:
    """``module`` in ``directory``: put it on sys.path (and a peer's PYTHONPATH)."""
    (directory / f"{module}.py").write_text(model_source(timestamps=timestamps))


def load_model(module: str = "bench_orders", *, timestamps: bool = False) -> types.ModuleType:
    """The model as a module of this process (registered in sys.modules, as an imported one would be)."""
    loaded = types.ModuleType(module)
    sys.modules[module] = loaded
    exec(compile(model_source(timestamps=timestamps), f"<{module}>", "exec"), loaded.__dict__)
    return loaded


def payload(i: int, sent_at: float | None = None) -> bytes:
    """Input ``i``, as orjson writes it; ``sent_at`` (seconds since the epoch) for the latency benchmarks."""
    import orjson

    order: dict[str, Any] = {
        "order_id": i, "customer": f"customer-{i % 997:04d}", "amount": (i % 10_000) / 7, "currency": "EUR",
        "created_at": "2026-11-28T08:00:00+00:00", "tags": ["web", "eu", f"t{i % 13}"],
        "note": "deliver to the back door, please" if i % 3 else None,
    }
    if sent_at is not None:
        order["sent_at"] = sent_at
    return bytes(orjson.dumps(order))


def payloads(n: int) -> list[bytes]:
    return [payload(i) for i in range(n)]
