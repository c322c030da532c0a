"""Trace context in message headers: Volley's headers are ``str -> bytes``, OpenTelemetry's carriers ``str -> str``.

Extraction is skipped outright for a message that carries none of the propagator's fields (most messages of a
pipeline's first hop): the propagator is only asked when there is something to read. With W3C propagation
(OpenTelemetry's default) and a message carrying nothing but a ``traceparent`` in its canonical form (what every
W3C propagator writes), the header is read here, to the same span context as the propagator's, for a fraction of
its cost; anything else (trace state, baggage, another version, odd spacing, other propagators) goes to the
propagator.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry import trace
from opentelemetry.baggage import get_all as get_baggage
from opentelemetry.baggage.propagation import W3CBaggagePropagator
from opentelemetry.context import Context
from opentelemetry.propagators.composite import CompositePropagator
from opentelemetry.propagators.textmap import Getter, TextMapPropagator
from opentelemetry.trace import NonRecordingSpan, Span, SpanContext, TraceFlags
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator
from opentelemetry.trace.span import DEFAULT_TRACE_STATE

from volley.message import Headers

# The headers W3C propagation (OpenTelemetry's default propagator) reads and writes. A tool that copies or replays
# messages (the dead-letter replay included) keeps these, so that the copy stays in its trace.
TRACE_HEADERS = ("traceparent", "tracestate", "baggage")

EMPTY_CONTEXT = Context()

_HEX = b"0123456789abcdef"
_NO_TRACE_ID = b"0" * 32
_NO_SPAN_ID = b"0" * 16
_FLAGS = [TraceFlags(flags) for flags in range(256)]


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


def is_canonical_traceparent(value: object) -> bool:
    """Whether ``value`` is a ``traceparent`` in the form every W3C propagator writes: version 00, lower-case hex,
    nothing around it, valid (non-zero) ids. The propagator reads such a value to exactly the span context that
    ``RemoteParent`` reads; any other value is left to the propagator."""
    return (type(value) is bytes and len(value) == 55 and value[:3] == b"00-"
            and value[35] == value[52] == 45 and value.translate(None, _HEX) == b"---"
            and value[3:35] != _NO_TRACE_ID and value[36:52] != _NO_SPAN_ID)


class RemoteParent(NonRecordingSpan):
    """The upstream span a canonical ``traceparent`` names, made current as the message's context: its span
    context is read from the header when first asked for (the SDK asks when a span starts under it, logging and
    the handler's instrumentations when they run; without an SDK, often nobody asks)."""

    def __init__(self, traceparent: bytes) -> None:
        self._traceparent = traceparent
        self._context: SpanContext | None = None  # type: ignore[assignment]

    def get_span_context(self) -> SpanContext:
        context = self._context
        if context is None:
            value = self._traceparent
            context = self._context = SpanContext(int(value[3:35], 16), int(value[36:52], 16), True,
                                                  _FLAGS[int(value[53:55], 16)])
        return context

    def __repr__(self) -> str:
        return f"RemoteParent({self.get_span_context()!r})"


class Propagation:
    """One propagator, bound once per run: extract from an input's headers, inject as header bytes."""

    def __init__(self, propagator: TextMapPropagator) -> None:
        self.propagator = propagator
        self.fields = frozenset(propagator.fields) or frozenset(TRACE_HEADERS)
        self.w3c = is_w3c(propagator)

    def parent(self, headers: Headers) -> tuple[Context, Span, dict[str, bytes] | None]:
        """The context ``headers`` (which carry at least one of the propagator's fields) carry, its span, and, when
        that is nothing but a span context read from a canonical ``traceparent`` (no trace state, no baggage),
        the headers that carry it on as they are."""
        if self.w3c:
            value = headers.get("traceparent")
            if is_canonical_traceparent(value) and "tracestate" not in headers and "baggage" not in headers:
                span = RemoteParent(value)  # type: ignore[arg-type]
                carried: dict[str, bytes] = {"traceparent": value}  # type: ignore[dict-item]
                return trace.set_span_in_context(span, EMPTY_CONTEXT), span, carried
        context = self.propagator.extract(headers, EMPTY_CONTEXT, GETTER)
        return context, trace.get_current_span(context), None

    def extract(self, headers: Headers | None) -> Context:
        """The context ``headers`` carry; the empty context (a new trace) when they carry none."""
        if not headers or self.fields.isdisjoint(headers):
            return EMPTY_CONTEXT
        return self.parent(headers)[0]

    def span_context(self, headers: Headers | None) -> SpanContext | None:
        """The valid span context ``headers`` carry, if any (for links)."""
        if not headers or self.fields.isdisjoint(headers):
            return None
        if self.w3c:
            value = headers.get("traceparent")
            if is_canonical_traceparent(value) and "tracestate" not in headers:
                return RemoteParent(value).get_span_context()  # type: ignore[arg-type]
        span_context = trace.get_current_span(self.propagator.extract(headers, EMPTY_CONTEXT, GETTER)
                                              ).get_span_context()
        return span_context if span_context.is_valid else None

    def inject(self, context: Context, span_context: SpanContext, *, plain: bool = False) -> dict[str, bytes]:
        """The headers that carry ``context``, whose span has ``span_context`` (``plain``: the context holds
        nothing else: no baggage).

        With W3C propagation (OpenTelemetry's default) and nothing but a span context to carry (no trace state,
        no baggage: the common case), the ``traceparent`` header is written here, byte for byte as the
        propagator writes it, at a fraction of its cost."""
        if self.w3c:
            state = span_context.trace_state
            if (state is DEFAULT_TRACE_STATE or not state) and (plain or not get_baggage(context)):
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
