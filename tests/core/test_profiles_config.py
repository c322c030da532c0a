"""Regression tests for issue 11, bug 15: a profile's settings are checked like a queue's.

A misspelled key on a queue raises ConfigurationError; the same typo in a registered profile was accepted
silently and the queue ended up without the serializer it asked for.
"""

from __future__ import annotations

import pytest

from volley import ConfigurationError, Engine
from volley.plugins import Register, Registry, build_registry, hookimpl

TYPO_PROFILE = {"connector": "memory", "serialiser": "json", "model_handler": "dataclass", "data_model": dict}


class TypoPlugin:
    """A plugin registering a profile with ``serialiser`` for ``serializer``."""

    @hookimpl
    def volley_register_profiles(self, register: Register) -> None:
        register("memory-typo", TYPO_PROFILE)


def _engine(registry: Registry) -> Engine:
    return Engine(app_name="t", input_queue="in", queue_config={"in": {"value": "in", "profile": "memory-typo"}},
                  metrics_port=None, registry=registry)


def _engine_with_plugin() -> Engine:
    """Register the plugin and build an Engine on its profile (today: a queue whose serializer is RawSerializer,
    not json)."""
    registry = build_registry(extra_plugins={"typo": TypoPlugin()})
    registry.entries["observer"] = {}
    return _engine(registry)


def _engine_with_added_profile() -> Engine:
    registry = build_registry()
    registry.entries["observer"] = {}
    registry.add("profile", "memory-typo", dict(TYPO_PROFILE), "tests")
    return _engine(registry)


def test_bug15_a_profile_from_a_plugin_with_a_misspelled_key_is_refused() -> None:
    """Bug 15: a plugin's profile with a misspelled key (``serialiser``) was accepted; the queue had no serializer.
    It must raise ConfigurationError naming the key, when registered or at the latest when an Engine uses it."""
    with pytest.raises(ConfigurationError, match="serialiser"):
        _engine_with_plugin()


def test_bug15_a_profile_added_to_a_registry_with_a_misspelled_key_is_refused() -> None:
    """Bug 15, the same through Registry.add."""
    with pytest.raises(ConfigurationError, match="serialiser"):
        _engine_with_added_profile()
