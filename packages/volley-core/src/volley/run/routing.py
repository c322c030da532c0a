"""Interpreting and routing: a handler's return value to an ack, a give-back, or encoded records bound to the
producer of each record's queue.

All or nothing: a bad second output never sends the first. Every malformed return (a wrong type, an unknown
queue alias or option, an option of the wrong kind, a value the serializer refuses) is a failure at stage
``output``, which goes to the dead-letter queue like any other bad message.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from types import GeneratorType
from typing import Any

from volley.message import Headers, OutgoingMessage, to_bytes
from volley.queues import ResolvedQueue
from volley.run.tokens import Outcome, Token

OUTPUT_KWARGS = frozenset({"key", "headers", "partition", "delay"})


class Router:
    """Built once per run: queue alias -> (queue, producer slot), and the same pre-bound for one-output returns."""

    def __init__(self, routes: Mapping[str, tuple[ResolvedQueue, int]]) -> None:
        self.routes = dict(routes)
        self._single: dict[str, tuple[Callable[[Any], bytes], str, int]] = {
            name: (queue.encode, queue.value, slot) for name, (queue, slot) in self.routes.items()
        }

    def bind(self) -> Callable[[Token, Any, Outcome], None]:
        """``interpret``, with the one-output case pre-bound as closure locals (the per-message path)."""
        single = self._single.get
        general = self.route_general
        new = object.__new__

        def interpret(token: Token, result: Any, out: Outcome) -> None:
            """A handler's return value into ``out``: True or None acks, False gives back, a list of outputs is
            encoded into ``out.outs`` (setting ``token.pending``), anything else is a failure at ``output``."""
            if type(result) is list:
                if len(result) == 1:
                    # The common case, one (queue, message) output, without the general path's checks.
                    item, = result
                    if type(item) is tuple and len(item) == 2:
                        name, payload = item
                        try:
                            bound = single(name)
                        except Exception:  # a name that cannot be looked up (unhashable, or its hash raises): the
                            bound = None  # general path makes it a failure at output
                        if bound is not None:
                            encode, topic, slot = bound
                            try:
                                value = encode(payload)
                            except Exception as exc:
                                out.failures.append((token, "output", exc))
                                return
                            token.pending = 1
                            # OutgoingMessage(topic, value, token=token), set in place: a class call costs an
                            # __init__ frame per output, about 2 % of a Kafka message's instructions
                            # (test_outputs checks that both build the same record).
                            message = new(OutgoingMessage)
                            message.topic = topic
                            message.value = value
                            message.key = message.headers = message.partition = message.delay = None
                            message.token = token
                            out.outs[slot].append(message)
                            return
            elif result is True or result is None:
                out.acks.append(token)
                return
            elif result is False:
                out.nacks.append(token)
                return
            general(token, result, out)

        return interpret

    def route_general(self, token: Token, result: Any, out: Outcome) -> None:
        """Any return value: every output checked, all or nothing."""
        if isinstance(result, GeneratorType):  # py-volley iterated whatever it was given
            try:
                result = list(result)
            except Exception as exc:
                out.failures.append((token, "output", exc))
                return
        elif not isinstance(result, (list, tuple)):
            out.failures.append((token, "output", TypeError(
                f"handler returned {type(result).__qualname__}; it must return True, False, or a list of "
                "(queue_name, message) / (queue_name, message, kwargs) tuples")))
            return
        staged: list[tuple[int, OutgoingMessage]] = []
        for item in result:
            try:
                staged.append(self._record(token, item))
            except Exception as exc:
                out.failures.append((token, "output", exc))
                return
        if not staged:
            out.acks.append(token)
            return
        token.pending = len(staged)
        outs = out.outs
        for slot, message in staged:
            outs[slot].append(message)

    def _record(self, token: Token, item: Any) -> tuple[int, OutgoingMessage]:
        if type(item) is list:  # ["out", message]: py-volley unpacked it like a tuple
            item = tuple(item)
        if not isinstance(item, tuple) or len(item) not in (2, 3):
            raise TypeError(f"each output must be a (queue_name, message) or (queue_name, message, kwargs) tuple, "
                            f"got {item!r:.200}")
        name = item[0]
        target = self.routes.get(name)
        if target is None:
            raise TypeError(f"output queue {name!r} is not one of this app's output_queues {list(self.routes)}; "
                            "add it to Engine(output_queues=[...])")
        queue, slot = target
        value = queue.encode(item[1])
        if len(item) == 2 or not item[2]:
            return slot, OutgoingMessage(queue.value, value, None, None, None, None, token)
        options = item[2]
        if not isinstance(options, Mapping):
            raise TypeError(f"the options of an output to {name!r} must be a dict, got {type(options).__qualname__}")
        unknown = set(options) - OUTPUT_KWARGS
        if unknown:
            raise TypeError(f"unknown output option(s) {sorted(unknown)} for queue {name!r}; "
                            f"allowed: {sorted(OUTPUT_KWARGS)}")
        return slot, OutgoingMessage(queue.value, value, _key(options.get("key"), name),
                                     _headers(options.get("headers"), name), _partition(options.get("partition"), name),
                                     _delay(options.get("delay"), name), token)


def _key(key: Any, queue: str) -> bytes | None:
    """Anything else than bytes is sent as its str() (py-volley did the same)."""
    return to_bytes(key)


def _headers(headers: Any, queue: str) -> Headers | None:
    if headers is None:
        return None
    if isinstance(headers, (list, tuple)):  # confluent-kafka's form: (name, value) pairs
        headers = _header_pairs(headers, queue)
    elif not isinstance(headers, Mapping):
        raise TypeError(f"the headers of an output to {queue!r} must be a dict or a list of (name, value) pairs, "
                        f"got {type(headers).__qualname__}")
    result: Headers = {}
    for name, value in headers.items():
        if not isinstance(value, (bytes, str)):
            raise TypeError(f"header {name!r} of an output to {queue!r} must be str or bytes, "
                            f"got {type(value).__qualname__}")
        result[str(name)] = to_bytes(value) or b""
    return result


def _header_pairs(pairs: list[Any] | tuple[Any, ...], queue: str) -> dict[Any, Any]:
    """A list of (name, value) pairs as a mapping. A name given twice is refused rather than one value lost:
    Volley's headers are a mapping (one value per name) on every connector."""
    mapping: dict[Any, Any] = {}
    for pair in pairs:
        if not isinstance(pair, (tuple, list)) or len(pair) != 2:
            raise TypeError(f"each header of an output to {queue!r} given as a list must be a (name, value) pair, "
                            f"got {pair!r:.100}")
        name, value = pair
        if name in mapping:
            raise TypeError(f"header {name!r} of an output to {queue!r} is given twice; a header has one value")
        mapping[name] = value
    return mapping


def _partition(partition: Any, queue: str) -> int | None:
    if partition is None:
        return None
    if not isinstance(partition, int) or isinstance(partition, bool) or partition < 0:
        raise ValueError(f"the partition of an output to {queue!r} must be an int >= 0, got {partition!r:.50}")
    return partition


def _delay(delay: Any, queue: str) -> float | None:
    if delay is None:
        return None
    if not isinstance(delay, (int, float)) or isinstance(delay, bool) or not math.isfinite(delay) or delay < 0:
        raise ValueError(f"the delay of an output to {queue!r} must be a number of seconds >= 0, got {delay!r:.50}")
    return float(delay)
