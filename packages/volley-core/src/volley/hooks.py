"""The plugin hooks: pluggy's markers for the ``volley`` project and the specs of every hook.

This module imports nothing of Volley, so that any plugin module, volley-core's
own ``volley.builtin`` included, can import ``hookimpl`` from it without
importing the registry that loads the plugins (``volley.plugins``, which
re-exports these names for third-party plugins).
"""

from __future__ import annotations

from collections.abc import Callable

import pluggy

PROJECT = "volley"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)

Register = Callable[..., None]


class VolleySpecs:
    """The hooks a plugin may implement. Each receives ``register(name, thing)``."""

    @hookspec
    def volley_register_connectors(self, register: Register) -> None:
        """register(name, connector): an object with create_consumer / create_producer (ports.Connector)."""

    @hookspec
    def volley_register_serializers(self, register: Register) -> None:
        """register(name, factory): a zero-argument callable returning a ports.Serializer."""

    @hookspec
    def volley_register_model_handlers(self, register: Register) -> None:
        """register(name, factory): a zero-argument callable returning a ports.ModelHandler."""

    @hookspec
    def volley_register_profiles(self, register: Register) -> None:
        """register(name, settings): a mapping of queue defaults (connector, serializer, model_handler, ...)."""

    @hookspec
    def volley_register_observers(self, register: Register) -> None:
        """register(name, factory): factory(app_name, metrics_port, settings) returning a ports.Observer."""

    @hookspec
    def volley_register_tracers(self, register: Register) -> None:
        """register(name, factory): factory(app_name, settings) returning a ports.Tracer (``Engine(tracing=name)``)."""
