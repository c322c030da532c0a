"""Plugins: profiles are checked when registered, hooks are called through pluggy, the modules have no cycles."""

from __future__ import annotations

from typing import Any

import pytest

from volley import ConfigurationError
from volley.plugins import Register, Registry, build_registry, hookimpl


class MisspelledProfile:
    """A plugin whose profile misspells ``serializer``, as a third-party package might."""

    __name__ = "misspelled-plugin"

    @hookimpl
    def volley_register_profiles(self, register: Register) -> None:
        register("typo", {"connector": "memory", "serialiser": "json", "data_model": dict})


def test_a_profile_with_a_misspelled_setting_is_refused_at_registration() -> None:
    with pytest.raises(ConfigurationError) as caught:
        build_registry({"misspelled-plugin": MisspelledProfile()})
    message = str(caught.value)
    assert "profile 'typo' of misspelled-plugin" in message
    assert "['serialiser']" in message
    assert "'serializer'" in message and "'connector'" in message  # the allowed settings are listed
    assert "'value'" not in message  # a profile cannot set a queue's identity


@pytest.mark.parametrize(("settings", "problem"), [
    ({"connector": "memory", "name": "x"}, "['name']"),
    ({"connector": "memory", "profile": "memory"}, "['profile']"),
    (["connector", "memory"], "must be a mapping"),
])
def test_registry_add_checks_profile_settings(settings: Any, problem: str) -> None:
    with pytest.raises(ConfigurationError, match=r"profile 'p' of some-dist .*" + problem.replace("[", r"\[")
                       .replace("]", r"\]")):
        Registry().add("profile", "p", settings, "some-dist")


def test_every_built_in_profile_passes_the_check() -> None:
    registry = build_registry()
    assert {"memory", "memory-batch-json", "memory-dlq"} <= set(registry.names("profile"))
