"""Trace context in message headers: Volley's headers are ``str -> bytes``, OpenTelemetry's carriers ``str -> str``.

Extraction is skipped outright for a message that carries none of the propagator's fields (most messages of a
pipeline's first hop): the propagator is only asked when there is something to read.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.baggage import get_all as get_baggage
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import SpanContext
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from volley.message import Headers

# The headers W3C propagation (OpenTelemetry's default propagator) reads and writes. A tool that copies or replays
# messages (the dead-letter replay included) keeps these, so that the copy stays in its trace.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")

EMPTY_CONTEXT = Context()


class BytesHeadersGetter(Getter[Mapping[str, bytes]]):
    """Reads a Volley header map: names as they are (Kafka header names are case-sensitive), values as Latin-1."""

    def get(self, carrier: Mapping[str, bytes], key: str) -> list[str] | None:
        value = carrier.get(key)
        if value is None:
            return None
        return [value.decode("latin-1") if isinstance(value, bytes) else str(value)]

    def keys(self, carrier: Mapping[str, bytes]) -> list[str]:
        return list(carrier)


GETTER = BytesHeadersGetter()


class Propagation:
    """One propagator, bound once per run: extract from an input's headers, inject as header bytes."""

    def __init__(self, propagator: TextMapPropagator) -> None:
        self.propagator = propagator
        self.fields = frozenset(propagator.fields) or frozenset(TRACE_HEADERS)
        self.w3c = is_w3c(propagator)

    def extract(self, headers: Headers | None) -> Context:
        """The context ``headers`` carry; the empty context (a new trace) when they carry none."""
        if not headers or self.fields.isdisjoint(headers):
            return EMPTY_CONTEXT
        return self.propagator.extract(headers, EMPTY_CONTEXT, GETTER)

    def inject(self, context: Context, span_context: SpanContext, *, plain: bool = False) -> dict[str, bytes]:
        """The headers that carry ``context``, whose span has ``span_context`` (``plain``: the context holds
        nothing else, it was made from the empty context).

        With W3C propagation (OpenTelemetry's default) and nothing but a span context to carry (no trace state,
        no baggage: the common case), the ``traceparent`` header is written here, byte for byte as the
        propagator writes it, at a fraction of its cost."""
        if self.w3c and not span_context.trace_state and (plain or not get_baggage(context)):
            if not span_context.is_valid:
                return {}
            return {"traceparent": b"00-%032x-%016x-%02x" % (span_context.trace_id, span_context.span_id,
                                                               span_context.trace_flags)}
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context)
        return {name: value.encode("latin-1") for name, value in carrier.items()}

    def strip(self, headers: Headers) -> None:
        """Remove every header this propagator writes (before writing a newer context into the same map)."""
        for name in self.fields.intersection(headers):
            del headers[name]



def is_w3c(propagator: TextMapPropagator) -> bool:
    """Whether ``propagator`` is W3C trace context (with or without W3C baggage) and nothing else."""
    parts = [propagator]
    if type(propagator) is CompositePropagator:
        parts = list(getattr(propagator, "_propagators", [None]))
    kinds = [type(part) for part in parts]
    return kinds in ([TraceContextTextMapPropagator], [TraceContextTextMapPropagator, W3CBaggagePropagator])
