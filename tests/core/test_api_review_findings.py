"""Found by a review of the API as a py-volley user would use it; each test failed before its fix."""

from __future__ import annotations

import functools
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from volley import Engine, MemoryBroker, MessageContext
from volley.errors import ConfigurationError
from volley.testing import harness


@dataclass
class Item:
    n: int


def make_engine(**settings: Any) -> Engine:
    broker = MemoryBroker()
    queues: dict[str, Any] = {
        "in": {"value": "in", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
        "out": {"value": "out", "profile": "memory", "data_model": Item, "config": {"broker": broker}},
        "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    return Engine(app_name="t", input_queue="in", output_queues=["out"], dead_letter_queue="dlq",
                  queue_config=queues, metrics_port=None, poll_interval_seconds=0.02, retry_backoff_seconds=0.0,
                  **settings)


def test_a_second_parameter_with_a_default_is_not_given_the_context() -> None:
    """``def handler(message, limit=10)`` was called with the MessageContext as ``limit``."""
    engine = make_engine()
    seen: list[Any] = []

    @engine.stream_app
    def handler(item: Item, limit: int = 10) -> list[tuple[str, Item]]:
        seen.append(limit)
        return [("out", Item(item.n + limit))]

    h = harness(handler)
    h.send(Item(1))
    result = h.run()
    assert seen == [10]
    assert result.outputs("out") == [Item(11)] and result.dead_letters == []


@pytest.mark.parametrize("style", ["msg_ctx default", "no default", "keyword-only", "msg_ctx third"])
def test_the_context_still_reaches_the_handlers_that_ask_for_it(style: str) -> None:
    engine = make_engine()
    seen: list[Any] = []

    if style == "msg_ctx default":
        def handler(item: Item, msg_ctx: MessageContext | None = None) -> bool:
            seen.append(msg_ctx)
            return True
    elif style == "no default":
        def handler(item: Item, ctx: MessageContext) -> bool:  # type: ignore[misc]
            seen.append(ctx)
            return True
    elif style == "keyword-only":
        def handler(item: Item, *, msg_ctx: MessageContext) -> bool:  # type: ignore[misc]
            seen.append(msg_ctx)
            return True
    else:
        def handler(item: Item, limit: int = 10,  # type: ignore[misc]
                    msg_ctx: MessageContext | None = None) -> bool:
            seen.append(msg_ctx)
            assert limit == 10
            return True

    h = harness(engine.stream_app(handler))
    h.send(Item(1))
    h.run()
    assert len(seen) == 1 and isinstance(seen[0], MessageContext)


@pytest.mark.parametrize("headers", [
    [("trace", b"abc"), ("tenant", "acme")],
    (("trace", b"abc"), ("tenant", "acme")),
], ids=["list", "tuple"])
def test_output_headers_may_be_a_list_of_pairs_like_confluent_kafka_takes(headers: Any) -> None:
    """py-volley handed headers to confluent-kafka, which takes a list of (name, value) pairs; that list
    dead-lettered every message ("must be a dict")."""
    engine = make_engine()

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item, dict[str, Any]]]:
        return [("out", item, {"headers": headers})]

    h = harness(handler)
    h.send(Item(1))
    result = h.run()
    assert result.dead_letters == []
    [record] = result.raw("out")
    assert record.headers == {"trace": b"abc", "tenant": b"acme"}


@pytest.mark.parametrize(("headers", "words"), [
    ([("a", b"1"), ("a", b"2")], "given twice"),
    ([("a", b"1", b"x")], "(name, value) pair"),
    (["a"], "(name, value) pair"),
])
def test_header_pairs_that_cannot_be_a_mapping_are_a_clear_output_failure(headers: Any, words: str) -> None:
    engine = make_engine()

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item, dict[str, Any]]]:
        return [("out", item, {"headers": headers})]

    h = harness(handler)
    h.send(Item(1))
    [dead] = h.run().dead_letters
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"output"
    assert words in dead.headers["volley-error-reason"].decode()


@pytest.mark.parametrize("shape", ["generator", "list items", "list of list items"])
def test_outputs_as_py_volley_iterated_them(shape: str) -> None:
    """py-volley unpacked whatever the handler returned: a generator of tuples, or [queue, message] lists."""
    engine = make_engine()

    @engine.stream_app
    def handler(item: Item) -> Any:
        if shape == "generator":
            def outputs() -> Iterator[tuple[str, Item]]:
                yield ("out", item)
                yield ("out", Item(item.n + 1))
            return outputs()
        if shape == "list items":
            return [["out", item], ["out", Item(item.n + 1)]]
        return [["out", item, {"key": "k"}], ["out", Item(item.n + 1)]]

    h = harness(handler)
    h.send(Item(1))
    result = h.run()
    assert result.dead_letters == []
    assert result.outputs("out") == [Item(1), Item(2)]


@pytest.mark.parametrize("returned", ["out", b"out", {"out": 1}], ids=["str", "bytes", "dict"])
def test_iterables_that_are_not_outputs_still_fail_at_output(returned: Any) -> None:
    engine = make_engine()

    @engine.stream_app
    def handler(item: Item) -> Any:
        return returned

    h = harness(handler)
    h.send(Item(1))
    [dead] = h.run().dead_letters
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"output"


def test_a_harness_result_holds_only_what_its_own_run_produced() -> None:
    """``h.run()`` twice: the second result's outputs() and raw() held the first run's outputs too."""
    engine = make_engine()

    @engine.stream_app
    def handler(item: Item) -> list[tuple[str, Item]]:
        return [("out", item)] if item.n else [("out", Item(-1)), ("dlq-me", item)]

    h = harness(handler)
    h.send(Item(1))
    first = h.run()
    h.send(Item(2))
    h.send(Item(0))  # dead-lettered (unknown queue)
    second = h.run()
    assert first.outputs("out") == [Item(1)] and first.dead_letters == []
    assert second.outputs("out") == [Item(2)]
    assert len(second.dead_letters) == 1
    assert len(second.raw("out")) == 1


def test_a_second_parameter_with_a_default_keeps_it_beside_var_positional() -> None:
    engine = make_engine()
    seen: list[Any] = []

    @engine.stream_app
    def handler(item: Item, limit: int = 10, *rest: Any) -> bool:
        seen.append((limit, rest))
        return True

    h = harness(handler)
    h.send(Item(1))
    h.run()
    assert seen == [(10, ())]


def test_a_positional_only_msg_ctx_that_is_not_second_is_refused_at_construction() -> None:
    engine = make_engine()

    def handler(item: Item, limit: int = 10, msg_ctx: MessageContext | None = None, /) -> bool:
        return True

    with pytest.raises(ConfigurationError, match="positional-only"):
        engine.stream_app(handler)


def test_an_object_with_an_async_call_is_awaited() -> None:
    engine = make_engine()

    class Handler:
        def __init__(self) -> None:
            self.seen: list[Item] = []

        async def __call__(self, item: Item) -> list[tuple[str, Item]]:
            self.seen.append(item)
            return [("out", item)]

    handler = Handler()
    app = engine.stream_app(handler)
    assert app.is_async
    h = harness(app)
    h.send(Item(3))
    result = h.run()
    assert handler.seen == [Item(3)]
    assert result.outputs("out") == [Item(3)] and result.dead_letters == []


@pytest.mark.parametrize("max_retries", [0, 1])
@pytest.mark.parametrize("with_context", [False, True])
def test_a_handler_that_yields_its_outputs_fails_as_a_handler(max_retries: int, with_context: bool) -> None:
    """What the body of a generator handler raises is the handler's failure: retried (max_retries), then dead-lettered
    at stage ``handler``. Before, the generator ran only when its outputs were routed: at stage ``output``, with no
    retry."""
    engine = make_engine(max_retries=max_retries)
    calls: list[int] = []

    def outputs(item: Item) -> Iterator[tuple[str, Item]]:
        calls.append(item.n)
        yield ("out", item)
        if len(calls) == 1:
            raise RuntimeError("the first run of the body fails after one output")
        yield ("out", Item(item.n + 1))

    if with_context:
        @engine.stream_app
        def handler(item: Item, msg_ctx: MessageContext) -> Iterator[tuple[str, Item]]:
            yield from outputs(item)
    else:
        @engine.stream_app
        def handler(item: Item) -> Iterator[tuple[str, Item]]:
            yield from outputs(item)

    h = harness(handler)
    h.send(Item(1))
    result = h.run()
    if max_retries:
        assert result.dead_letters == [] and calls == [1, 1]
        assert result.outputs("out") == [Item(1), Item(2)]  # the failed run's first output was never sent
    else:
        [dead] = result.dead_letters
        assert dead.headers is not None and dead.headers["volley-error-stage"] == b"handler"
        assert result.outputs("out") == [] and calls == [1]


def test_a_decorated_generator_handler_runs_within_the_call() -> None:
    """A decorator with functools.wraps around a generator handler: found through __wrapped__, run within the call
    (a failure is the handler's); a decorator that returns a list instead is left alone."""
    engine = make_engine(max_retries=0)

    def logged(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any) -> Any:
            return func(*args)
        return wrapper

    @engine.stream_app
    @logged
    def handler(item: Item) -> Iterator[tuple[str, Item]]:
        yield ("out", item)
        raise RuntimeError("fails after one output")

    h = harness(handler)
    h.send(Item(1))
    [dead] = h.run().dead_letters
    assert dead.headers is not None and dead.headers["volley-error-stage"] == b"handler"

    def as_list(func: Any) -> Any:
        @functools.wraps(func)
        def wrapper(*args: Any) -> Any:
            return list(func(*args))
        return wrapper

    listing = make_engine(max_retries=0)

    @listing.stream_app
    @as_list
    def handler2(item: Item) -> Iterator[tuple[str, Item]]:
        yield ("out", item)

    h2 = harness(handler2)
    h2.send(Item(2))
    assert h2.run().outputs("out") == [Item(2)]


def test_an_async_generator_handler_is_refused_when_the_app_is_built() -> None:
    """Every message of an async generator handler went to the DLQ at stage output (an async generator is not a
    list of outputs); it is a configuration error now."""
    engine = make_engine()

    async def handler(item: Item) -> Any:
        yield ("out", item)

    with pytest.raises(ConfigurationError, match="async generator"):
        engine.stream_app(handler)
