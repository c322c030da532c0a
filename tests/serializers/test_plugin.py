"""Registration through the ``volley`` entry point, and the failure when an optional library is missing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from typing import Any

import pytest

from volley import Engine, MemoryBroker
from volley.errors import ConfigurationError
from volley.plugins import build_registry, get_registry
from volley.ports import ModelHandler, Serializer


def test_entry_point_registers_the_parts_and_profiles() -> None:
    registry = build_registry()
    assert {"orjson", "msgpack", "json", "none"} <= set(registry.names("serializer"))
    assert {"pydantic", "pydantic-parser", "pydantic-list", "none", "dataclass"} <= set(
        registry.names("model_handler"))
    assert registry.entries["serializer"]["orjson"].distribution == "volley-serializers"
    assert registry.entries["serializer"]["json"].distribution == "volley-core"  # not registered twice
    assert "disabled" not in registry.names("serializer")  # a none-name: core handles it
    for name in ("memory-pydantic", "memory-orjson-pydantic", "memory-msgpack-pydantic", "memory-json-pydantic"):
        profile = registry.get("profile", name)
        assert profile["connector"] == "memory"
        assert profile["data_model"] == "volley_serializers.models.GenericMessage"
    assert registry.get("profile", "memory-pydantic")["model_handler"] == "pydantic-parser"
    assert registry.get("profile", "memory-pydantic")["serializer"] == "none"


def test_factories_build_fresh_protocol_instances() -> None:
    registry = get_registry()
    for name in ("orjson", "msgpack"):
        factory = registry.get("serializer", name)
        first, second = factory(), factory()
        assert isinstance(first, Serializer) and first is not second
    for name in ("pydantic", "pydantic-parser", "pydantic-list"):
        handler = registry.get("model_handler", name)()
        assert isinstance(handler, ModelHandler)
        assert callable(handler.bind) and callable(handler.bind_deconstruct) and callable(handler.check_output)


def _engine(serializer: str, handler: str) -> Engine:
    broker = MemoryBroker()
    queue: dict[str, Any] = {"connector": "memory", "serializer": serializer, "model_handler": handler,
                             "data_model": dict, "config": {"broker": broker}}
    return Engine(app_name="t", input_queue="in", output_queues=[], metrics_port=None,
                  queue_config={"in": {"value": "in", **queue}})


@pytest.mark.parametrize(("library", "serializer", "handler", "extra"), [
    ("orjson", "orjson", "none", "orjson"),
    ("msgpack", "msgpack", "none", "msgpack"),
    ("pydantic", "json", "pydantic", "pydantic"),
    ("pydantic", "none", "pydantic-parser", "pydantic"),
    ("pydantic", "json", "pydantic-list", "pydantic"),
])
def test_missing_library_fails_at_engine_construction_with_the_install_command(
        monkeypatch: pytest.MonkeyPatch, library: str, serializer: str, handler: str, extra: str) -> None:
    monkeypatch.setitem(sys.modules, library, None)  # import now raises ImportError
    with pytest.raises(ConfigurationError) as caught:
        _engine(serializer, handler)
    assert f"pip install 'volley-serializers[{extra}]'" in str(caught.value)
    monkeypatch.undo()
    assert _engine(serializer, handler).input.serializer is not None


BLOCKER = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {"orjson", "msgpack", "pydantic", "pydantic_core"}:
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
        return None
sys.meta_path.insert(0, Block())
"""


def _run(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", BLOCKER + textwrap.dedent(code)], capture_output=True, text=True,
                          timeout=60, check=False)


def test_without_any_extra_the_plugin_still_loads_and_names_the_fix() -> None:
    result = _run("""
        import volley_serializers, volley_serializers.plugin
        from volley import Engine, MemoryBroker
        from volley.errors import ConfigurationError
        from volley.plugins import get_registry
        assert "orjson" in get_registry().names("serializer")
        for profile in ("memory-orjson-pydantic", "memory-msgpack-pydantic", "memory-pydantic"):
            try:
                Engine(app_name="t", input_queue="in", queue_config={"in": {"value": "in", "profile": profile}},
                       metrics_port=None)
            except ConfigurationError as exc:
                print(exc)
            else:
                raise SystemExit(f"{profile} built without its libraries")
        try:
            Engine(app_name="t", input_queue="in", metrics_port=None, queue_config={"in": {
                "value": "in", "profile": "memory", "data_model": "volley_serializers.models.GenericMessage"}})
        except ConfigurationError as exc:
            print(exc)
        print(sorted(m for m in sys.modules if m.split(".")[0] in {"orjson", "msgpack", "pydantic"}))
    """)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "pip install 'volley-serializers[orjson]'" in lines[0]
    assert "pip install 'volley-serializers[msgpack]'" in lines[1]
    assert "pip install 'volley-serializers[pydantic]'" in lines[2]
    assert "pip install 'volley-serializers[pydantic]'" in lines[3]
    assert lines[4] == "[]"


def test_importing_the_package_imports_no_optional_library() -> None:
    result = subprocess.run([sys.executable, "-c", textwrap.dedent("""
        import sys
        import volley_serializers, volley_serializers.plugin
        from volley.plugins import get_registry
        get_registry()
        print(sorted(m for m in sys.modules if m.split(".")[0] in {"orjson", "msgpack", "pydantic"}))
        assert volley_serializers.OrjsonSerializer.__name__ == "OrjsonSerializer"  # lazily importable
        print("orjson" in sys.modules)
    """)], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["[]", "True"]
