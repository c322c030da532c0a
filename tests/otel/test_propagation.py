"""volley-otel's header handling against OpenTelemetry's own propagators: the fast W3C path writes exactly what
the propagator writes, and steps aside whenever there is more to carry (trace state, baggage, other formats)."""

from __future__ import annotations

import pytest
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
