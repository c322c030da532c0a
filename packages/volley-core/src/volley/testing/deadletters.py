"""A dead-letter scenario for proving ``volley dlq`` on a connector: an app whose input fails at three stages.

``scenario_app(queue_config)`` builds the app on queues ``orders`` (input, JSON ``Order`` records), ``shipped``
(output) and ``dead-letters``; ``seed()`` gives inputs that fail at ``deserialize`` (not JSON), ``validate`` (no
amount) and ``handler`` (a negative amount, until ``Fix.fixed`` is set: the "bug fix" a replay follows). A
command-line replay in a subprocess names ``volley.testing.deadletters:app``, built from the JSON queue
configuration in ``$VOLLEY_DLQ_SCENARIO``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from volley.engine import Engine, StreamApp
from volley.message import Headers

INPUT, OUTPUT, DLQ = "orders", "shipped", "dead-letters"
SCENARIO_ENV = "VOLLEY_DLQ_SCENARIO"
STAGES = {"deserialize": 4, "validate": 3, "handler": 5}
"""How many inputs of ``seed()`` fail at each stage."""


@dataclass
class Order:
    order_id: int
    amount: int


class Fix:
    """Whether the handler's bug (refusing negative amounts) is fixed yet."""

    fixed = False


def scenario_app(queue_config: Mapping[str, Any], fix: type[Fix] | Fix = Fix, app_name: str = "dlq-scenario",
                 **engine: Any) -> StreamApp:
    settings: dict[str, Any] = {"metrics_port": None, "max_retries": 0, "retry_backoff_seconds": 0.0,
                                "poll_interval_seconds": 0.05, "on_failure": "continue", **engine}
    app = Engine(app_name=app_name, input_queue=INPUT, output_queues=[OUTPUT], dead_letter_queue=DLQ,
                 queue_config=queue_config, **settings)

    def handle(order: Order) -> list[tuple[str, Order]]:
        if order.amount < 0 and not fix.fixed:
            raise ValueError(f"negative amount {order.amount} for order {order.order_id}")
        return [(OUTPUT, order)]

    return app.stream_app(handle)


def seed() -> list[tuple[bytes, bytes, Headers]]:
    """(value, key, headers) of every input: ``STAGES`` of them fail, keys ``d0``, ``v0``, ``h0``, ... by stage."""
    deserialize = [(b"not json " + str(n).encode(), f"d{n}".encode(), {"trace-id": f"t-d{n}".encode()})
                   for n in range(STAGES["deserialize"])]
    validate = [(json.dumps({"order_id": 100 + n}).encode(), f"v{n}".encode(), {"trace-id": f"t-v{n}".encode()})
                for n in range(STAGES["validate"])]
    handler = [(json.dumps({"order_id": 200 + n, "amount": -1 - n}).encode(), f"h{n}".encode(),
                {"trace-id": f"t-h{n}".encode()}) for n in range(STAGES["handler"])]
    return deserialize + validate + handler


def __getattr__(name: str) -> Any:
    if name == "app":
        config = os.environ.get(SCENARIO_ENV)
        if not config:
            raise AttributeError(f"volley.testing.deadletters:app needs ${SCENARIO_ENV} (a JSON queue configuration)")
        return scenario_app(json.loads(config))
    raise AttributeError(name)
