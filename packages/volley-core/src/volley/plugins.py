"""Plugin discovery: pluggy hookspecs that take a ``register`` callback, and the registry they fill.

Every connector, serializer, model handler, profile and observer reaches the
engine through these hooks, built-ins included, so that a third-party plugin
is a first-class citizen. Installing a distribution that declares
``[project.entry-points.volley]`` is all it takes.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import pluggy

from volley.errors import ConfigurationError, UnknownComponentError

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


KINDS = ("connector", "serializer", "model_handler", "profile", "observer")

# Names that a Volley distribution provides, so that a missing one can be named with its install command.
KNOWN_PROVIDERS: dict[str, str] = {
    "kafka": "volley-kafka",
    "confluent": "volley-kafka",
    "rsmq": "volley-rsmq",
    "sqlite": "volley-sqlite",
    "orjson": "volley-serializers[orjson]",
    "msgpack": "volley-serializers[msgpack]",
    "pydantic": "volley-serializers[pydantic]",
    "pydantic-parser": "volley-serializers[pydantic]",
    "pydantic-list": "volley-serializers[pydantic]",
    "prometheus": "volley-prometheus",
    # volley-serializers' profiles on the memory connector (the prefix alone would name volley-core)
    "memory-pydantic": "volley-serializers[pydantic]",
    "memory-json-pydantic": "volley-serializers[pydantic]",
    "memory-orjson-pydantic": "volley-serializers[orjson,pydantic]",
    "memory-msgpack-pydantic": "volley-serializers[msgpack,pydantic]",
}


def provider_hint(name: str) -> str | None:
    """The distribution that provides ``name``, judged by its exact name or its prefix (``confluent-dlq``)."""
    if name in KNOWN_PROVIDERS:
        return KNOWN_PROVIDERS[name]
    head = name.split("-", 1)[0]
    return KNOWN_PROVIDERS.get(head)


def install_hint(requirement: str) -> str:
    """The pip command for ``requirement``, quoted when it has extras (``[`` is a glob in zsh)."""
    return f"pip install '{requirement}'" if "[" in requirement else f"pip install {requirement}"


@dataclass(frozen=True)
class Registration:
    name: str
    value: Any
    distribution: str


@dataclass
class Registry:
    """Everything the installed plugins registered, by kind and name."""

    entries: dict[str, dict[str, Registration]] = field(default_factory=lambda: {k: {} for k in KINDS})

    def add(self, kind: str, name: str, value: Any, distribution: str) -> None:
        existing = self.entries[kind].get(name)
        if existing is not None and existing.distribution != distribution:
            raise ConfigurationError(
                f"{kind} {name!r} is registered by both {existing.distribution} and {distribution}; "
                "uninstall one of them"
            )
        self.entries[kind][name] = Registration(name, value, distribution)

    def names(self, kind: str) -> list[str]:
        return sorted(self.entries[kind])

    def get(self, kind: str, name: str) -> Any:
        try:
            return self.entries[kind][name].value
        except KeyError:
            raise UnknownComponentError(self.unknown_message(kind, name)) from None

    def unknown_message(self, kind: str, name: str) -> str:
        label = kind.replace("_", " ")
        known = ", ".join(self.names(kind)) or "none"
        message = f"Unknown {label} {name!r}: it is misspelled or not installed. Known {label}s: {known}."
        hint = provider_hint(name)
        # No install hint when that distribution is installed (it registered something): the name is a typo.
        if hint is not None and hint.split("[", 1)[0] not in self.distributions():
            message += f" ({install_hint(hint)})"
        return message

    def distributions(self) -> set[str]:
        """The distributions that registered anything."""
        return {entry.distribution for entries in self.entries.values() for entry in entries.values()}

    def __contains__(self, item: tuple[str, str]) -> bool:
        kind, name = item
        return name in self.entries[kind]


def _distribution_of(plugin: object, pm: pluggy.PluginManager) -> str:
    for plugin_obj, dist in pm.list_plugin_distinfo():
        if plugin_obj is plugin:
            return str(dist.project_name)
    name = getattr(plugin, "__name__", type(plugin).__name__)
    return str(name)


def build_registry(extra_plugins: Mapping[str, object] | None = None) -> Registry:
    """Load every ``volley`` entry point (plus ``extra_plugins``) and collect their registrations."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(VolleySpecs)
    pm.load_setuptools_entrypoints(PROJECT)
    if not any(dist == "volley-core" for dist in (_distribution_of(p, pm) for p in pm.get_plugins())):
        # Running from a source tree without installed metadata: register built-ins directly.
        from volley import builtin

        if not pm.is_registered(builtin):
            pm.register(builtin, name="volley.builtin")
    for name, plugin in (extra_plugins or {}).items():
        pm.register(plugin, name=name)
    pm.check_pending()

    registry = Registry()
    for plugin in pm.get_plugins():
        dist = _distribution_of(plugin, pm)
        hooks: dict[str, str] = {
            "volley_register_connectors": "connector",
            "volley_register_serializers": "serializer",
            "volley_register_model_handlers": "model_handler",
            "volley_register_profiles": "profile",
            "volley_register_observers": "observer",
        }
        for hook_name, kind in hooks.items():
            impl = getattr(plugin, hook_name, None)
            if impl is None:
                continue

            def register(name: str, value: Any, _kind: str = kind, _dist: str = dist) -> None:
                registry.add(_kind, name, value, _dist)

            impl(register=register)
    return registry


_lock = threading.Lock()
_cached: Registry | None = None


def get_registry() -> Registry:
    """The process-wide registry, loaded once. Plugins are installed packages, so they cannot change mid-run."""
    global _cached
    with _lock:
        if _cached is None:
            _cached = build_registry()
        return _cached


def reset_registry(registry: Registry | None = None) -> None:
    """Replace (or forget) the cached registry: for tests that register plugins of their own."""
    global _cached
    with _lock:
        _cached = registry
