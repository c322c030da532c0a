"""volley-otel's header handling against OpenTelemetry's own propagators: the fast W3C path writes exactly what
the propagator writes, and steps aside whenever there is more to carry (trace state, baggage, other formats)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from opentelemetry import baggage, trace
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagate import get_global_textmap
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from volley_otel.propagation import EMPTY_CONTEXT, Propagation

SPAN_CONTEXTS = [
    SpanContext(0x0AF7651916CD43DD8448EB211C80319C, 0xB7AD6B7169203331, True, TraceFlags(1)),
    SpanContext(1, 2, True, TraceFlags(0)),
    SpanContext(0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF, True, TraceFlags(1)),
    trace.INVALID_SPAN_CONTEXT,
    SpanContext(5, 6, True, TraceFlags(1), TraceState([("vendor", "value")])),
]


def reference(propagator: TextMapPropagator, context: Context) -> dict[str, bytes]:
    carrier: dict[str, str] = {}
    propagator.inject(carrier, context)
    return {k: v.encode("latin-1") for k, v in carrier.items()}


@pytest.mark.parametrize("propagator", [get_global_textmap(), TraceContextTextMapPropagator(),
                                        CompositePropagator([TraceContextTextMapPropagator()]),
                                        CompositePropagator([W3CBaggagePropagator(),
                                                             TraceContextTextMapPropagator()])],
                         ids=["default", "tracecontext", "composite-of-one", "other-order"])
@pytest.mark.parametrize("span_context", SPAN_CONTEXTS, ids=["sampled", "unsampled", "max", "invalid", "state"])
@pytest.mark.parametrize("with_baggage", [False, True], ids=["plain", "baggage"])
def test_injected_headers_are_the_propagators_own(propagator: TextMapPropagator, span_context: SpanContext,
                                                   with_baggage: bool) -> None:
    parent = baggage.set_baggage("tenant", "a b", EMPTY_CONTEXT) if with_baggage else EMPTY_CONTEXT
    context = trace.set_span_in_context(NonRecordingSpan(span_context), parent)
    assert Propagation(propagator).inject(context, span_context) == reference(propagator, context)


def test_extraction_skips_messages_without_trace_headers_and_reads_the_rest() -> None:
    propagation = Propagation(get_global_textmap())
    assert propagation.extract(None) is EMPTY_CONTEXT
    assert propagation.extract({"key": b"v"}) is EMPTY_CONTEXT
    context = propagation.extract({"traceparent": b"00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
                                   "baggage": b"tenant=a"})
    assert trace.get_current_span(context).get_span_context().span_id == 0xB7AD6B7169203331
    assert baggage.get_baggage("tenant", context) == "a"


CANONICAL = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
TRACEPARENTS = [
    CANONICAL,
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-00",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-ff",
    "00-ffffffffffffffffffffffffffffffff-ffffffffffffffff-09",
    "00-00000000000000000000000000000000-b7ad6b7169203331-01",  # no trace id
    "00-0af7651916cd43dd8448eb211c80319c-0000000000000000-01",  # no span id
    "00-0AF7651916CD43DD8448EB211C80319C-B7AD6B7169203331-01",  # upper case
    "ff-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",  # forbidden version
    "01-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-future",  # a later version: more fields
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01-x",  # version 00 with more
    " 00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01\t",  # spacing
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-1",
    "00_0af7651916cd43dd8448eb211c80319c_b7ad6b7169203331_01",
    "00-0af7651916cd43dd8448eb211c80319c-b7ad6b716920333+-01",
    "00-+af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01",
    "00-0af7651916cd43dd_448eb211c80319c-b7ad6b7169203331-01",
    "garbage",
    "",
]


def span_context_of(context: Context) -> SpanContext:
    return trace.get_current_span(context).get_span_context()


@pytest.mark.parametrize("value", TRACEPARENTS)
@pytest.mark.parametrize("extra", [{}, {"tracestate": b"vendor=value"}, {"baggage": b"tenant=a"}],
                         ids=["alone", "tracestate", "baggage"])
def test_extraction_reads_what_the_propagator_reads(value: str, extra: dict[str, bytes]) -> None:
    """Whatever path a value takes (read here, or by the propagator), the context is the propagator's."""
    propagator = get_global_textmap()
    headers = {"traceparent": value.encode("latin-1"), "other": b"x", **extra}
    expected = propagator.extract({k: v.decode("latin-1") for k, v in headers.items()})
    context = Propagation(propagator).extract(headers)
    assert span_context_of(context) == span_context_of(expected)
    assert repr(span_context_of(context)) == repr(span_context_of(expected))
    assert dict(baggage.get_all(context)) == dict(baggage.get_all(expected))
    found = Propagation(propagator).span_context(headers)
    assert found == (span_context_of(expected) if span_context_of(expected).is_valid else None)


@pytest.mark.parametrize("value", TRACEPARENTS)
def test_a_context_passed_on_as_it_came_is_what_the_propagator_writes(value: str) -> None:
    """The headers that carry an input's context on unchanged (no SDK) are exactly the propagator's own."""
    propagation = Propagation(get_global_textmap())
    context, span, carried = propagation.parent({"traceparent": value.encode("latin-1")})
    assert span is trace.get_current_span(context)
    if carried is not None:
        assert carried == reference(get_global_textmap(), context)
        assert carried == {"traceparent": value.encode("latin-1")}


def test_other_propagators_read_their_own_headers() -> None:
    """A propagator that is not W3C is always asked (no header is read here)."""

    class Custom(TextMapPropagator):
        def extract(self, carrier: Any, context: Context | None = None, getter: Any = None) -> Context:
            value = getter.get(carrier, "x-trace")[0]
            span_context = SpanContext(int(value), 7, True, TraceFlags(1))
            return trace.set_span_in_context(NonRecordingSpan(span_context), context)

        def inject(self, carrier: Any, context: Context | None = None, setter: Any = None) -> None:
            raise NotImplementedError

        @property
        def fields(self) -> set[str]:
            return {"x-trace"}

    propagation = Propagation(Custom())
    headers = {"x-trace": b"42", "traceparent": CANONICAL.encode()}
    assert span_context_of(propagation.extract(headers)).trace_id == 42
    assert propagation.parent(headers)[2] is None
    assert propagation.extract({"traceparent": CANONICAL.encode()}) is EMPTY_CONTEXT


@given(st.lists(st.tuples(st.integers(0, 60), st.sampled_from("0123456789abcdefABCDEF-_+ \tx")), max_size=3))
def test_any_near_canonical_value_reads_as_the_propagator_reads_it(edits: list[tuple[int, str]]) -> None:
    value = list(CANONICAL)
    for position, char in edits:
        if position < len(value):
            value[position] = char
        else:
            value.append(char)
    text = "".join(value)
    propagator = get_global_textmap()
    expected = span_context_of(propagator.extract({"traceparent": text}))
    assert span_context_of(Propagation(propagator).extract({"traceparent": text.encode()})) == expected
