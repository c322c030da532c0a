"""The parts of a run, built once from the engine: a producer per output slot, each output queue's slot, and
the tracing bound to the run's queues."""

from __future__ import annotations

from typing import Any

from volley.ports import Producer
from volley.queues import ResolvedQueue
from volley.run.report import RunReport
from volley.run.tracing import Tracing


def output_slots(engine: Any) -> tuple[list[Producer], dict[str, tuple[ResolvedQueue, int]],
                                        tuple[ResolvedQueue, int] | None]:
    """One producer per distinct producer object (queues of one connector may share one), and each output
    queue's (queue, producer slot)."""
    producers: list[Producer] = []
    routes: dict[str, tuple[ResolvedQueue, int]] = {}
    names = list(engine.output_queues)
    if engine.dead_letter_queue is not None:
        names.append(engine.dead_letter_queue)
    slots: dict[int, int] = {}
    for name in names:
        queue = engine.queues[name]
        producer = queue.make_producer()
        slot = slots.get(id(producer))
        if slot is None:
            slot = slots[id(producer)] = len(producers)
            producers.append(producer)
        routes[name] = (queue, slot)
    dlq = routes[engine.dead_letter_queue] if engine.dead_letter_queue is not None else None
    return producers, routes, dlq


def slot_topics(routes: dict[str, tuple[ResolvedQueue, int]], slots: int) -> list[str | None]:
    """Per producer slot, the one topic its records go to, or None when queues of several topics share it (the
    produced metric then counts each batch per topic)."""
    topics: list[set[str]] = [set() for _ in range(slots)]
    for queue, slot in routes.values():
        topics[slot].add(queue.value)
    return [next(iter(names)) if len(names) == 1 else None for names in topics]


def run_tracing(engine: Any, dlq: tuple[ResolvedQueue, int] | None, report: RunReport) -> Tracing | None:
    """The run's tracing, bound to its queues, when the Engine names a tracer (``Engine(tracing=...)``)."""
    if engine.tracer is None:
        return None
    outputs = [engine.queues[name].spec for name in engine.output_queues]
    if dlq is not None:
        outputs.append(dlq[0].spec)
    return Tracing(engine.tracer.bind(engine.input.spec, outputs), engine.app_name, report)
