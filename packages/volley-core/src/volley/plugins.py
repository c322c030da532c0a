"""Plugin discovery: pluggy hookspecs that take a ``register`` callback, and the registry they fill.

Every connector, serializer, model handler, profile and observer reaches the
engine through these hooks, built-ins included, so that a third-party plugin
is a first-class citizen. Installing a distribution that declares
``[project.entry-points.volley]`` is all it takes.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from volley.config import check_profile_settings
from volley.errors import ConfigurationError, UnknownComponentError
from volley.hooks import PROJECT, Register, VolleySpecs, hookimpl, hookspec

# The markers and specs live in volley.hooks (volley.builtin imports them from there, not from this module);
# they are re-exported here because plugins write ``from volley.plugins import Register, hookimpl``.
__all__ = [
    "KINDS",
    "KNOWN_PROVIDERS",
    "PROJECT",
    "Register",
    "Registration",
    "Registry",
    "VolleySpecs",
    "build_registry",
    "core_requirement",
    "distribution_version",
    "get_registry",
    "hookimpl",
    "hookspec",
    "install_hint",
    "provider_hint",
    "reset_registry",
]

KINDS = ("connector", "serializer", "model_handler", "profile", "observer", "tracer")

# Each hook and the kind of thing it registers.
HOOK_KINDS: dict[str, str] = {
    "volley_register_connectors": "connector",
    "volley_register_serializers": "serializer",
    "volley_register_model_handlers": "model_handler",
    "volley_register_profiles": "profile",
    "volley_register_observers": "observer",
    "volley_register_tracers": "tracer",
}

# Names that a Volley distribution provides, so that a missing one can be named with its install command.
# The one table of them: every install hint of volley-core comes from here (provider_hint, install_hint).
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
    "otel": "volley-otel",
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


def distribution_version(distribution: str) -> str | None:
    """The installed version of ``distribution``, or None when it has no installed metadata (a source tree)."""
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return None


def core_requirement(distribution: str) -> str | None:
    """The ``volley-core`` range that ``distribution`` declares (``volley-core>=0.1.0,<0.2``), if any."""
    try:
        requirements = metadata.requires(distribution) or []
    except metadata.PackageNotFoundError:
        return None
    for requirement in requirements:
        head = requirement.split(";", 1)[0].strip()
        name = head
        for stop in "<>=!~[ (":
            name = name.split(stop, 1)[0]
        if name.lower().replace("_", "-") == "volley-core":
            return head.replace(" ", "")
    return None


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
        if kind == "profile":
            check_profile_settings(name, value, distribution)
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
    distributions = {plugin: _distribution_of(plugin, pm) for plugin in pm.get_plugins()}
    for hook_name, kind in HOOK_KINDS.items():
        _call_per_plugin(pm, hook_name, kind, registry, distributions)
    return registry


def _call_per_plugin(pm: pluggy.PluginManager, hook_name: str, kind: str, registry: Registry,
                     distributions: Mapping[object, str]) -> None:
    """Call one hook through pluggy's relay, once per implementing plugin, with a ``register`` that
    attributes what it registers to that plugin's distribution.

    The calls go in pluggy's own order (tryfirst / trylast, later registrations first), each through
    ``subset_hook_caller`` with the other implementations left out, so wrappers (of any plugin) and
    tracing apply as to any hook call, and a ``specname=`` implementation is found like any other.
    """
    caller = getattr(pm.hook, hook_name)
    implementations = [impl for impl in caller.get_hookimpls() if not (impl.hookwrapper or impl.wrapper)]
    for impl in reversed(implementations):  # pluggy calls the last of get_hookimpls() first
        distribution = distributions.get(impl.plugin) or _distribution_of(impl.plugin, pm)

        def register(name: str, value: Any, _distribution: str = distribution) -> None:
            registry.add(kind, name, value, _distribution)

        others = [other.plugin for other in implementations if other is not impl]
        pm.subset_hook_caller(hook_name, remove_plugins=others)(register=register)


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
