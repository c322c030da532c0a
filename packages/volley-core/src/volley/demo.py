"""The two-node demo: node one publishes the maximum of a list, node two sends a longer list back until it is > 10.

It runs on the embedded in-memory broker with volley-core alone: stdlib JSON
and dataclass models, no servers, no third-party packages.
"""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from typing import Any

from volley.engine import Engine, StreamApp
from volley.memory import MemoryBroker
from volley.testing import run_until_idle

logger = logging.getLogger("volley.demo")

INPUT = "volley.demo.values"
MAXIMA = "volley.demo.maxima"


@dataclass
class ValuesMessage:
    my_values: list[float]


@dataclass
class MaxMessage:
    max_value: float


def build_apps(broker: MemoryBroker) -> tuple[StreamApp, StreamApp]:
    queues: dict[str, Any] = {
        "values": {"value": INPUT, "profile": "memory", "data_model": ValuesMessage, "config": {"broker": broker}},
        "maxima": {"value": MAXIMA, "profile": "memory", "data_model": MaxMessage, "config": {"broker": broker}},
        "dead-letters": {"value": "volley.demo.dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    node_one = Engine(app_name="node-one", input_queue="values", output_queues=["maxima"],
                      dead_letter_queue="dead-letters", queue_config=queues, metrics_port=None,
                      poll_interval_seconds=0.1)
    node_two = Engine(app_name="node-two", input_queue="maxima", output_queues=["values"],
                      dead_letter_queue="dead-letters", queue_config=queues, metrics_port=None,
                      poll_interval_seconds=0.1)

    @node_one.stream_app
    def find_max(message: ValuesMessage) -> list[tuple[str, MaxMessage]]:
        logger.info("Received %s", message)
        the_max = float(max(message.my_values))
        logger.info("the_max=%s", the_max)
        return [("maxima", MaxMessage(max_value=the_max))]

    @node_two.stream_app
    def check_max(message: MaxMessage) -> bool | list[tuple[str, ValuesMessage]]:
        value = message.max_value
        logger.info("The maximum: %s", value)
        if value > 10:
            logger.info("That's it, we are done!")
            return True
        return [("values", ValuesMessage(my_values=[value, value + 1, value + 2]))]

    return find_max, check_max


async def run_demo(seed: list[float] | None = None, timeout: float = 30.0) -> MemoryBroker:
    broker = MemoryBroker()
    node_one, node_two = build_apps(broker)
    broker.publish(INPUT, node_one.engine.input.encode(ValuesMessage(my_values=list(seed or [1, 2, 3]))))
    await run_until_idle(node_one, node_two, broker=broker, timeout=timeout)
    return broker


def expected_maxima(seed: list[float]) -> list[float]:
    """What the two nodes must publish for ``seed``: its maximum, then two more each round, until past 10."""
    maxima = [float(max(seed))]
    while maxima[-1] <= 10:
        maxima.append(maxima[-1] + 2)
    return maxima


def main(seed: list[float] | None = None) -> int:
    """Run the demo; exit status 0 only if the nodes published exactly the expected maxima and nothing was
    dead-lettered, so that a broken engine cannot pass for a working demo."""
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    seed = list(seed or [1, 2, 3])
    broker = asyncio.run(run_demo(seed))
    maxima = [float(json.loads(value)["max_value"]) for value in broker.produced(MAXIMA)]
    dead = broker.produced("volley.demo.dlq")
    logger.info("demo finished: %d maxima published, dead letters: %d", len(maxima), len(dead))
    if maxima != expected_maxima(seed) or dead:
        logger.error("the demo went wrong: maxima %s (expected %s), %d dead letter(s)", maxima,
                     expected_maxima(seed), len(dead))
        return 1
    return 0
