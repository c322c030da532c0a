"""The ``otel`` tracer: OpenTelemetry spans for Volley's tracing ports (``volley.ports.Tracer`` and friends).

Per input, one "process" span (kind CONSUMER), child of the context the input's headers carry; per batch of a
batch handler, one span linking every member's context. Attributes follow OpenTelemetry's messaging semantic
conventions and are built once per run, so that a span is created with its attributes in one call. Outputs
carry the process span's context (it is their creation context); with ``send_spans`` on, each producer call
also gets a "send" span (kind PRODUCER) linking the records it sent.

Cost matters: a span of the OpenTelemetry SDK costs more than Volley's whole per-message path, so nothing is
done that a message does not need: no propagator call for a message without trace headers, one
``start_span`` (never ``start_as_current_span``), the context made current only around the handler's work,
the headers of a span injected once however many outputs it has.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from importlib import metadata
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.context import Context
from opentelemetry.propagators.textmap import TextMapPropagator
from opentelemetry.trace import Link, Span, SpanKind, Status, StatusCode

from volley.errors import ConfigurationError
from volley.message import Envelope, Headers, OutgoingMessage
from volley.ports import QueueSpec
from volley_otel.logs import install_log_correlation
from volley_otel.propagation import EMPTY_CONTEXT, Propagation

SCOPE = "volley_otel"
MAX_LINKS = 128  # the SDK's default span limit: links past it would be dropped anyway

# Volley connector names -> messaging.system (OpenTelemetry's well-known values where there is one).
SYSTEMS = {"kafka": "kafka", "confluent": "kafka"}

SETTINGS = {
    "tracer_provider": "an opentelemetry TracerProvider (default: the global one, set before the app starts)",
    "propagator": "an opentelemetry TextMapPropagator (default: the global one, W3C trace context and baggage)",
    "send_spans": "True: a 'send' span per producer call, linking the records it sent (default False)",
    "log_correlation": "True (default): log records carry otelTraceID / otelSpanID while a span is current",
}


def _version() -> str:
    try:
        return metadata.version("volley-otel")
    except metadata.PackageNotFoundError:  # a source tree without installed metadata
        return "0"


def messaging_system(spec: QueueSpec) -> str:
    head = spec.connector.split("-", 1)[0]
    return SYSTEMS.get(head, head)


class OtelTracer:
    """Registered as ``otel``: ``Engine(tracing="otel", tracing_settings={...})`` with the keys of ``SETTINGS``."""

    def __init__(self, app_name: str, *, tracer_provider: trace.TracerProvider | None = None,
                 propagator: TextMapPropagator | None = None, send_spans: bool = False,
                 log_correlation: bool = True) -> None:
        self.app_name = app_name
        self.tracer_provider = tracer_provider
        self.propagator = propagator
        self.send_spans = send_spans
        if log_correlation:
            install_log_correlation()

    @classmethod
    def from_settings(cls, app_name: str, settings: Mapping[str, Any]) -> OtelTracer:
        unknown = sorted(set(settings) - set(SETTINGS))
        if unknown:
            known = "; ".join(f"{name}: {what}" for name, what in SETTINGS.items())
            raise ConfigurationError(f"unknown tracing_settings {unknown} for the otel tracer; known: {known}")
        provider = settings.get("tracer_provider")
        if provider is not None and not callable(getattr(provider, "get_tracer", None)):
            raise ConfigurationError(f"tracing_settings['tracer_provider'] must be an OpenTelemetry TracerProvider, "
                                     f"got {type(provider).__qualname__}")
        propagator = settings.get("propagator")
        if propagator is not None and not isinstance(propagator, TextMapPropagator):
            raise ConfigurationError(f"tracing_settings['propagator'] must be an OpenTelemetry TextMapPropagator, "
                                     f"got {type(propagator).__qualname__}")
        for flag in ("send_spans", "log_correlation"):
            if flag in settings and not isinstance(settings[flag], bool):
                raise ConfigurationError(f"tracing_settings[{flag!r}] must be True or False, got {settings[flag]!r}")
        return cls(app_name, tracer_provider=provider, propagator=propagator,
                   send_spans=settings.get("send_spans", False), log_correlation=settings.get("log_correlation", True))

    def bind(self, source: QueueSpec, outputs: Sequence[QueueSpec]) -> OtelRunTracer | ContextRunTracer:
        # Resolved at each run's start, not at Engine construction: the application may set its global
        # provider and propagator in between.
        provider = self.tracer_provider or trace.get_tracer_provider()
        propagation = Propagation(self.propagator or propagate.get_global_textmap())
        if isinstance(provider, (trace.ProxyTracerProvider, trace.NoOpTracerProvider)):
            # No SDK configured (the API's own providers): no span can record, only the context is passed on.
            return ContextRunTracer(propagation)
        tracer = provider.get_tracer(SCOPE, _version())
        return OtelRunTracer(tracer, propagation, source, outputs, send_spans=self.send_spans)


class OtelRunTracer:
    """The tracer of one run: span names and attributes of its queues, built once."""

    def __init__(self, tracer: trace.Tracer, propagation: Propagation, source: QueueSpec,
                 outputs: Sequence[QueueSpec], *, send_spans: bool) -> None:
        self.tracer = tracer
        self.propagation = propagation
        self.send_spans = send_spans
        system = messaging_system(source)
        self.kafka = system == "kafka"
        # The subscription as configured: a Kafka input may name several topics ("orders,refunds"), which is
        # no destination's name; each span is named after its message's own topic (``by_source``), and only a
        # batch mixing topics is named after the subscription, without messaging.destination.name.
        self.name = f"process {source.value}"
        attributes: dict[str, Any] = {
            "messaging.system": system,
            "messaging.operation.name": "process",
            "messaging.operation.type": "process",
        }
        group = (source.config.get("group.id") or os.environ.get("KAFKA_CONSUMER_GROUP")) if self.kafka else None
        if group:
            attributes["messaging.consumer.group.name"] = str(group)
        self.attributes = attributes
        self.by_source: dict[str, tuple[str, dict[str, Any]]] = {}  # bound once per topic seen
        self.send: dict[str, tuple[str, dict[str, Any]]] = {
            spec.value: (f"send {spec.value}", {
                "messaging.system": messaging_system(spec),
                "messaging.destination.name": spec.value,
                "messaging.operation.name": "send",
                "messaging.operation.type": "send",
            }) for spec in outputs
        }

    def _of(self, source: str) -> tuple[str, dict[str, Any]]:
        """The span name and attributes of messages from ``source``."""
        bound = self.by_source.get(source)
        if bound is None:
            bound = self.by_source[source] = (f"process {source}",
                                              {**self.attributes, "messaging.destination.name": source})
        return bound

    def start(self, members: Sequence[Envelope], batch: bool) -> OtelTrace:
        if batch:
            return self._start_batch(members)
        env = members[0]
        headers = env.headers
        propagation = self.propagation
        if not headers or propagation.fields.isdisjoint(headers):
            parent, plain = EMPTY_CONTEXT, True
        else:
            parent, _, carried = propagation.parent(headers)
            plain = carried is not None  # nothing but the span context: no baggage to carry on
        name, base = self.by_source.get(env.source) or self._of(env.source)
        attributes = base.copy()  # the run's attributes, and this message's own
        if self.kafka:
            attributes["messaging.kafka.offset"] = env.position
            if env.partition is not None:
                attributes["messaging.destination.partition.id"] = str(env.partition)
        else:
            attributes["messaging.message.id"] = str(env.position)
        span = self.tracer.start_span(name, parent, SpanKind.CONSUMER, attributes)
        return OtelTrace(span, trace.set_span_in_context(span, parent), propagation, plain)

    def _start_batch(self, members: Sequence[Envelope]) -> OtelTrace:
        span_context_of = self.propagation.span_context
        links: list[Link] = []
        for env in members:
            span_context = span_context_of(env.headers)
            if span_context is not None:
                links.append(Link(span_context))
                if len(links) == MAX_LINKS:
                    break
        source = members[0].source
        if all(env.source == source for env in members):
            name, base = self._of(source)
        else:
            name, base = self.name, self.attributes
        attributes = base.copy()
        attributes["messaging.batch.message_count"] = len(members)
        span = self.tracer.start_span(name, EMPTY_CONTEXT, SpanKind.CONSUMER, attributes, links)
        return OtelTrace(span, trace.set_span_in_context(span, EMPTY_CONTEXT), self.propagation, True)

    def sent(self, records: Sequence[OutgoingMessage]) -> None:
        """With ``send_spans``: one "send" span per destination of a producer call, linking its records."""
        if not self.send_spans:
            return
        by_topic: dict[str, list[OutgoingMessage]] = {}
        for record in records:
            by_topic.setdefault(record.topic, []).append(record)
        span_context_of = self.propagation.span_context
        for topic, group in by_topic.items():
            name, base = self.send.get(topic) or (f"send {topic}", {"messaging.destination.name": topic,
                                                                     "messaging.operation.name": "send",
                                                                     "messaging.operation.type": "send"})
            links: list[Link] = []
            for record in group[:MAX_LINKS]:
                span_context = span_context_of(record.headers)
                if span_context is not None:
                    links.append(Link(span_context))
            attributes = dict(base)
            if len(group) > 1:
                attributes["messaging.batch.message_count"] = len(group)
            self.tracer.start_span(name, EMPTY_CONTEXT, SpanKind.PRODUCER, attributes, links).end()


class ContextRunTracer:
    """The tracer of a run without an SDK (``opentelemetry-api`` alone): no span can record, so a message's trace
    is only the context it came with, current while the handler runs (its log records carry the upstream ids,
    spans it starts continue that trace) and carried on by its outputs and dead letters. A message without trace
    context has nothing to trace: ``start`` returns None and the engine handles it untraced."""

    def __init__(self, propagation: Propagation) -> None:
        self.propagation = propagation

    def start(self, members: Sequence[Envelope], batch: bool) -> OtelTrace | None:
        headers = members[0].headers
        if batch or not headers or self.propagation.fields.isdisjoint(headers):
            return None  # a batch has no single parent, and nothing records its links
        parent, span, carried = self.propagation.parent(headers)
        if parent is EMPTY_CONTEXT:  # the fields hold nothing the propagator accepts
            return None
        # The parent's non-recording span (invalid when only baggage came): its own context is passed on.
        return OtelTrace(span, parent, self.propagation, carried is not None, carried)

    def sent(self, records: Sequence[OutgoingMessage]) -> None:
        pass


class OtelTrace:
    """A message's process span, as the engine's ``MessageTrace``."""

    __slots__ = ("context", "headers", "plain", "propagation", "span")

    def __init__(self, span: Span, context: Context, propagation: Propagation, plain: bool,
                 headers: dict[str, bytes] | None = None) -> None:
        self.span = span
        # The span in its parent's context: the parent's entries (baggage) stay visible to the handler.
        self.context = context
        self.plain = plain  # the context holds no baggage to carry on
        self.propagation = propagation
        self.headers = headers  # injected once, for every output

    def activate(self) -> object:
        return otel_context.attach(self.context)

    def deactivate(self, activation: object) -> None:
        otel_context.detach(activation)  # type: ignore[arg-type]

    def _headers(self) -> dict[str, bytes]:
        headers = self.headers
        if headers is None:
            headers = self.headers = self.propagation.inject(self.context, self.span.get_span_context(),
                                                             plain=self.plain)
        return headers

    def inject(self, headers: Headers | None) -> Headers | None:
        if not headers:
            return dict(self._headers())
        merged = dict(headers)
        self.propagation.strip(merged)
        merged.update(self._headers())
        return merged

    def retry(self, attempt: int, error: BaseException) -> None:
        self.span.add_event("volley.retry", {
            "volley.retry.attempt": attempt,
            "exception.type": type(error).__qualname__,
            "exception.message": _message(error),
        })

    def fail(self, stage: str, error: BaseException) -> None:
        span = self.span
        if not span.is_recording():
            return
        name = type(error).__qualname__
        span.set_attribute("error.type", name)
        span.set_attribute("volley.error.stage", stage)
        span.record_exception(error, {"volley.error.stage": stage})
        span.set_status(Status(StatusCode.ERROR, f"{stage}: {name}: {_message(error)}"))

    def dead_letter(self, destination: str, headers: Headers) -> None:
        self.propagation.strip(headers)
        headers.update(self._headers())
        self.span.add_event("volley.dead_letter", {"messaging.destination.name": destination})

    def end(self) -> None:
        self.span.end()


def _message(error: BaseException) -> str:
    try:
        return str(error)[:500]
    except Exception:
        return "<the exception's str() raised>"
