"""Configuration errors fail at Engine construction with a message that says what to change."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from volley import ConfigurationError, Engine, MemoryBroker, QueueConfig, UnknownComponentError
from volley.config import resolve_env
from volley.plugins import Registry, build_registry


@dataclass
class Point:
    x: int
    y: int


def memory_queues(broker: MemoryBroker, **extra: object) -> dict[str, dict[str, object]]:
    return {
        "in": {"value": "in", "profile": "memory", "config": {"broker": broker}, **extra},
        "out": {"value": "out", "profile": "memory", "config": {"broker": broker}},
    }


def test_queue_config_objects_dicts_and_yaml_are_equivalent(tmp_path: Path) -> None:
    objects = [QueueConfig(name="in", value="topic.in", profile="memory"),
               QueueConfig(name="out", value="topic.out", profile="memory")]
    from_objects = Engine(input_queue="in", output_queues=["out"], queue_config=objects, metrics_port=None)
    yaml_file = tmp_path / "volley_config.yml"
    yaml_file.write_text("queues:\n  in:\n    value: topic.in\n    profile: memory\n"
                         "  out:\n    value: topic.out\n    profile: memory\n")
    from_yaml = Engine(input_queue="in", output_queues=["out"], yaml_config_path=yaml_file, metrics_port=None)
    from_dict = Engine(input_queue="in", output_queues=["out"], metrics_port=None,
                       queue_config={"in": {"value": "topic.in", "profile": "memory"},
                                     "out": {"value": "topic.out", "profile": "memory"}})
    for engine in (from_objects, from_yaml, from_dict):
        assert engine.queues["in"].value == "topic.in"
        assert engine.queues["out"].value == "topic.out"
        assert engine.queues["in"].spec.connector == "memory"


def test_yaml_without_pyyaml_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    yaml_file = tmp_path / "volley_config.yml"
    yaml_file.write_text("queues: {}\n")
    monkeypatch.setitem(sys.modules, "yaml", None)  # makes `import yaml` fail
    with pytest.raises(ConfigurationError, match=r"volley-core\[yaml\]"):
        Engine(input_queue="in", yaml_config_path=yaml_file, metrics_port=None)


def test_missing_yaml_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="does not exist"):
        Engine(input_queue="in", yaml_config_path=tmp_path / "nope.yml", metrics_port=None)


def test_unknown_profile_lists_known_names_and_the_install_hint() -> None:
    with pytest.raises(UnknownComponentError) as caught:
        Engine(input_queue="in", metrics_port=None, registry=core_only_registry(),
               queue_config={"in": {"value": "t", "profile": "memroy"}})
    message = str(caught.value)
    assert "Known profiles: memory, memory-batch-json, memory-dlq" in message
    assert "misspelled or not installed" in message and "pip install" not in message


def core_only_registry() -> Registry:
    """What volley-core alone registers, whatever else this environment has installed."""
    registry = build_registry()
    registry.entries = {kind: {name: entry for name, entry in entries.items() if entry.distribution == "volley-core"}
                        for kind, entries in registry.entries.items()}
    return registry


@pytest.mark.parametrize(("setting", "name", "label", "command"), [
    ("profile", "rsmq-dlq", "profile", "pip install volley-rsmq"),
    ("profile", "confluent-eos", "profile", "pip install volley-kafka"),
    ("profile", "memory-orjson-pydantic", "profile", "pip install 'volley-serializers[orjson,pydantic]'"),
    ("profile", "memory-pydantic", "profile", "pip install 'volley-serializers[pydantic]'"),
    ("connector", "kafka", "connector", "pip install volley-kafka"),
    ("serializer", "msgpack", "serializer", "pip install 'volley-serializers[msgpack]'"),
    ("model_handler", "pydantic", "model handler", "pip install 'volley-serializers[pydantic]'"),
])
def test_a_name_from_a_missing_distribution_comes_with_its_install_command(
        setting: str, name: str, label: str, command: str) -> None:
    queue = {"value": "t", "profile": "memory", setting: name}
    with pytest.raises(UnknownComponentError) as caught:
        Engine(input_queue="in", metrics_port=None, registry=core_only_registry(), queue_config={"in": queue})
    message = str(caught.value)
    assert message.startswith(f"Unknown {label} {name!r}: it is misspelled or not installed. Known {label}s: ")
    assert message.endswith(f"({command})"), message


def test_a_misspelled_name_of_an_installed_distribution_gets_no_install_command() -> None:
    registry = core_only_registry()
    registry.add("profile", "rsmq", {"connector": "rsmq"}, "volley-rsmq")  # as if volley-rsmq were installed
    with pytest.raises(UnknownComponentError) as caught:
        Engine(input_queue="in", metrics_port=None, registry=registry,
               queue_config={"in": {"value": "t", "profile": "rsmq-dlqq"}})
    assert "Known profiles: memory, memory-batch-json, memory-dlq, rsmq." in str(caught.value)
    assert "pip install" not in str(caught.value)


def test_queue_missing_from_config() -> None:
    with pytest.raises(ConfigurationError, match=r"\['out'\] are not in the queue configuration"):
        Engine(input_queue="in", output_queues=["out"], metrics_port=None,
               queue_config={"in": {"value": "t", "profile": "memory"}})


def test_dead_letter_queue_cannot_be_the_input() -> None:
    with pytest.raises(ConfigurationError, match="cannot be the input"):
        Engine(input_queue="in", dead_letter_queue="in", metrics_port=None,
               queue_config={"in": {"value": "t", "profile": "memory"}})


def test_unknown_queue_setting_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match="unknown setting"):
        Engine(input_queue="in", metrics_port=None,
               queue_config={"in": {"value": "t", "profile": "memory", "seralizer": "json"}})


def test_bad_engine_settings_fail_early() -> None:
    config = {"in": {"value": "t", "profile": "memory"}}
    with pytest.raises(ConfigurationError, match="on_failure"):
        Engine(input_queue="in", metrics_port=None, queue_config=config, on_failure="explode")
    with pytest.raises(ConfigurationError, match="max_in_flight"):
        Engine(input_queue="in", metrics_port=None, queue_config=config, max_in_flight=0)
    with pytest.raises(ConfigurationError, match="ordering"):
        Engine(input_queue="in", metrics_port=None, queue_config={"in": {**config["in"], "ordering": "random"}})


def test_data_model_as_dotted_path_and_class() -> None:
    engine = Engine(input_queue="in", metrics_port=None,
                    queue_config={"in": {"value": "t", "profile": "memory",
                                         "data_model": "volley.demo.MaxMessage"}})
    from volley.demo import MaxMessage

    assert engine.queues["in"].data_model is MaxMessage
    with pytest.raises(ConfigurationError, match="no attribute 'Nope'"):
        Engine(input_queue="in", metrics_port=None,
               queue_config={"in": {"value": "t", "profile": "memory", "data_model": "volley.demo.Nope"}})


def test_env_vars_resolve_in_values_and_config(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TOPIC_SUFFIX", "prod")
    engine = Engine(input_queue="in", metrics_port=None,
                    queue_config={"in": {"value": "orders.${TOPIC_SUFFIX}", "profile": "memory",
                                         "config": {"group": "${GROUP:-fallback}"}}})
    assert engine.queues["in"].value == "orders.prod"
    assert engine.queues["in"].spec.config["group"] == "fallback"
    monkeypatch.delenv("NOT_SET_ANYWHERE", raising=False)
    with pytest.raises(ConfigurationError, match="NOT_SET_ANYWHERE"):
        resolve_env("${NOT_SET_ANYWHERE}")


def test_handler_without_a_message_parameter_is_rejected() -> None:
    engine = Engine(input_queue="in", metrics_port=None, queue_config={"in": {"value": "t", "profile": "memory"}})
    with pytest.raises(ConfigurationError, match="first argument"):
        engine.stream_app(lambda: True)


def test_metrics_port_without_observer_warns_naming_the_package() -> None:
    registry = build_registry()
    registry.entries["observer"].clear()
    with pytest.warns(UserWarning, match="pip install volley-prometheus"):
        Engine(input_queue="in", metrics_port=3000, registry=registry,
               queue_config={"in": {"value": "t", "profile": "memory"}})


def test_env_var_defaults_follow_the_shell(monkeypatch: pytest.MonkeyPatch) -> None:
    """``${VAR:-default}`` also covers a variable set to nothing, as in the shell (``TOPIC=`` gave an empty topic
    name, and the error then told the user to write the default they had written); ``${VAR-default}`` covers only
    an unset one. Tuples are resolved like lists (found by a review, session 38)."""
    monkeypatch.setenv("EMPTY_ONE", "")
    monkeypatch.delenv("UNSET_ONE", raising=False)
    assert resolve_env("${EMPTY_ONE:-shop.orders}") == "shop.orders"
    assert resolve_env("${UNSET_ONE:-shop.orders}") == "shop.orders"
    assert resolve_env("${EMPTY_ONE-shop.orders}") == ""
    assert resolve_env("${UNSET_ONE-shop.orders}") == "shop.orders"
    assert resolve_env("${EMPTY_ONE}") == ""
    assert resolve_env(("${UNSET_ONE:-a}", ["${UNSET_ONE:-b}"])) == ("a", ["b"])
