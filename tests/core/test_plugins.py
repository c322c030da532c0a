"""Plugins: profiles are checked when registered, hooks are called through pluggy, the modules have no cycles."""

from __future__ import annotations

import ast
from collections.abc import Generator
from pathlib import Path
from typing import Any

import pytest

import volley
from volley import ConfigurationError
from volley.plugins import KNOWN_PROVIDERS, Register, Registry, build_registry, hookimpl, provider_hint


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


def _module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _volley_imports() -> dict[str, set[str]]:
    """Which volley module imports which (lazy imports inside functions included), read from the sources."""
    package = Path(volley.__file__).parent
    graph: dict[str, set[str]] = {}
    paths = {_module_name(path, package): path for path in package.rglob("*.py")}
    modules = set(paths)
    for module, path in paths.items():
        targets: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                targets.update(alias.name for alias in node.names)
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                submodules = {f"{node.module}.{alias.name}" for alias in node.names}
                # `from volley import builtin` imports volley.builtin; its package is no edge (every module
                # imports its package first, so that edge would tie any two modules into a circle)
                targets.update(submodules if submodules & modules else {node.module})
        graph[module] = targets
    return {module: {t for t in targets if t in graph and t != module} for module, targets in graph.items()}


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    found: list[set[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        for target in graph[node]:
            if target not in index:
                visit(target)
                low[node] = min(low[node], low[target])
            elif target in stack:
                low[node] = min(low[node], index[target])
        if low[node] == index[node]:
            component: set[str] = set()
            while True:
                member = stack.pop()
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                found.append(component)

    for node in sorted(graph):
        if node not in index:
            visit(node)
    return found


def test_plugins_builtin_cli_and_workers_are_in_no_import_cycle() -> None:
    graph = _volley_imports()
    assert "volley.builtin" in graph["volley.plugins"]  # the reader sees lazy imports
    ours = {"volley.plugins", "volley.builtin", "volley.hooks", "volley.cli", "volley.workers", "volley.apps"}
    tangled = [sorted(cycle) for cycle in _cycles(graph) if cycle & ours]
    assert tangled == []


def test_the_moved_names_are_still_importable_from_where_plugins_and_tests_import_them() -> None:
    from volley import apps, cli, hooks, plugins

    assert plugins.hookimpl is hooks.hookimpl and plugins.hookspec is hooks.hookspec
    assert plugins.VolleySpecs is hooks.VolleySpecs and plugins.PROJECT == hooks.PROJECT == "volley"
    assert cli.load_app is apps.load_app


class _Recording:
    """A plugin registering one connector and noting that it was called."""

    def __init__(self, label: str, calls: list[str]) -> None:
        self.__name__ = f"dist-{label}"
        self.label = label
        self.calls = calls

    def _register(self, register: Register) -> None:
        self.calls.append(self.label)
        register(f"conn-{self.label}", object())


class _First(_Recording):
    @hookimpl(tryfirst=True)
    def volley_register_connectors(self, register: Register) -> None:
        self._register(register)


class _Last(_Recording):
    @hookimpl(trylast=True)
    def volley_register_connectors(self, register: Register) -> None:
        self._register(register)


class _Plain(_Recording):
    @hookimpl
    def volley_register_connectors(self, register: Register) -> None:
        self._register(register)


class _OtherName(_Recording):
    @hookimpl(specname="volley_register_connectors")
    def connectors(self, register: Register) -> None:
        self._register(register)


class _Wrapper:
    """Wraps every call of the connector hook, as a tracing or filtering plugin would."""

    __name__ = "dist-wrapper"

    def __init__(self, calls: list[str]) -> None:
        self.calls = calls

    @hookimpl(wrapper=True)
    def volley_register_connectors(self, register: Register) -> Generator[None, None, None]:
        self.calls.append("wrapper-before")
        result = yield
        self.calls.append("wrapper-after")
        return result


def test_hooks_are_called_through_pluggy_with_its_order_wrappers_and_specnames() -> None:
    calls: list[str] = []
    plugins = {"last": _Last("last", calls), "plain": _Plain("plain", calls), "first": _First("first", calls),
               "other-name": _OtherName("other-name", calls), "wrapper": _Wrapper(calls)}
    registry = build_registry(plugins)
    ours = [c for c in calls if not c.startswith("wrapper")]
    assert ours[0] == "first" and ours[-1] == "last"
    assert set(ours) == {"first", "plain", "other-name", "last"}  # specname= is an implementation too
    # around each implementation's call (volley-core's own included): before, [the call], after
    assert calls.count("wrapper-before") == calls.count("wrapper-after") >= len(ours) + 1
    for label in ours:
        at = calls.index(label)
        assert calls[at - 1] == "wrapper-before" and calls[at + 1] == "wrapper-after"
    for label in ("first", "plain", "other-name", "last"):
        assert registry.entries["connector"][f"conn-{label}"].distribution == f"dist-{label}"
    assert registry.entries["connector"]["memory"].distribution == "volley-core"


def test_two_distributions_registering_one_name_is_still_an_error_naming_both() -> None:
    class Clash:
        __name__ = "dist-clash"

        @hookimpl
        def volley_register_connectors(self, register: Register) -> None:
            register("memory", object())

    with pytest.raises(ConfigurationError, match=r"connector 'memory' is registered by both "
                                                 r"(volley-core and dist-clash|dist-clash and volley-core)"):
        build_registry({"clash": Clash()})


@pytest.mark.parametrize(("name", "requirement"), [
    ("sqlite", "volley-sqlite"), ("sqlite-dlq", "volley-sqlite"), ("otel", "volley-otel"),
    ("prometheus", "volley-prometheus"), ("confluent-eos", "volley-kafka"),
])
def test_install_hints_come_from_the_one_table(name: str, requirement: str) -> None:
    assert provider_hint(name) == requirement
    assert KNOWN_PROVIDERS[name.split("-", 1)[0]] == requirement
    message = Registry().unknown_message("connector", name)
    assert message.endswith(f"(pip install {requirement})")
