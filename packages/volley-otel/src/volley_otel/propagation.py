"""Trace context in message headers: Volley's headers are ``str -> bytes``, OpenTelemetry's carriers ``str -> str``.

Extraction is skipped outright for a message that carries none of the propagator's fields (most messages of a
pipeline's first hop): the propagator is only asked when there is something to read.
"""

from __future__ import annotations

from collections.abc import Mapping

from opentelemetry.context import Context
from opentelemetry.propagators.textmap import Getter, TextMapPropagator

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

    def extract(self, headers: Headers | None) -> Context:
        """The context ``headers`` carry; the empty context (a new trace) when they carry none."""
        if not headers or self.fields.isdisjoint(headers):
            return EMPTY_CONTEXT
        return self.propagator.extract(headers, EMPTY_CONTEXT, GETTER)

    def inject(self, context: Context) -> dict[str, bytes]:
        """The headers that carry ``context``."""
        carrier: dict[str, str] = {}
        self.propagator.inject(carrier, context)
        return {name: value.encode("latin-1") for name, value in carrier.items()}

    def strip(self, headers: Headers) -> None:
        """Remove every header this propagator writes (before writing a newer context into the same map)."""
        for name in self.fields.intersection(headers):
            del headers[name]

