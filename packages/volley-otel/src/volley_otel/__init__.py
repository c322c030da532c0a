"""OpenTelemetry tracing for Volley.

Install it and name it: ``Engine(tracing="otel")`` (or ``VOLLEY_TRACING=otel``). Each input gets a "process"
span continuing the trace context its headers carry, every output carries that span's context onward, retries
are span events, failures set the span's status, and dead letters carry the context of the span that failed.
Only ``opentelemetry-api`` is required: spans are recorded by whatever SDK the application configures.
"""

from __future__ import annotations

from volley_otel.logs import install_log_correlation
from volley_otel.propagation import TRACE_HEADERS
from volley_otel.tracer import ContextRunTracer, OtelRunTracer, OtelTrace, OtelTracer

__all__ = ["TRACE_HEADERS", "ContextRunTracer", "OtelRunTracer", "OtelTrace", "OtelTracer", "install_log_correlation"]
