"""volley-otel's plugin: registers the ``otel`` tracer with Volley (``Engine(tracing="otel")``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from volley.plugins import Register, hookimpl
from volley.ports import Tracer
from volley_otel.tracer import OtelTracer


def create_tracer(app_name: str, settings: Mapping[str, Any]) -> Tracer:
    """factory(app_name, settings) -> Tracer, as the ``volley_register_tracers`` hook asks."""
    return OtelTracer.from_settings(app_name, settings)


@hookimpl
def volley_register_tracers(register: Register) -> None:
    register("otel", create_tracer)
