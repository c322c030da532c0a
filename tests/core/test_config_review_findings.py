"""Configuration and codec defects found by a review (session 31): each test failed on the code before its fix.

A misconfiguration must fail at Engine construction with a ConfigurationError that says what to change;
never as a bare traceback, never silently ignored, never as every message going to the dead-letter queue.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from volley import ConfigurationError, Engine, MemoryBroker, QueueConfig
from volley.codecs import JsonSerializer
from volley.errors import SerializationError


def queues(broker: MemoryBroker, **overrides: dict[str, Any]) -> dict[str, dict[str, Any]]:
    config: dict[str, dict[str, Any]] = {
        "in": {"value": "in", "profile": "memory", "config": {"broker": broker}},
        "out": {"value": "out", "profile": "memory", "config": {"broker": broker}},
        "dlq": {"value": "dlq", "profile": "memory-dlq", "config": {"broker": broker}},
    }
    for name, settings in overrides.items():
        config[name] = {**config[name], **settings}
    return config


def engine(queue_config: Any, **kwargs: Any) -> Engine:
    settings: dict[str, Any] = {"input_queue": "in", "output_queues": ["out"], "dead_letter_queue": "dlq",
                                "metrics_port": None}
    settings.update(kwargs)
    return Engine(queue_config=queue_config, **settings)


# ---------------------------------------------------------------- two queues with the same name


def test_two_queue_config_objects_with_the_same_name_are_refused() -> None:
    """A list with the alias 'in' twice: the second silently replaced the first (the app read topic 'b')."""
    config = [QueueConfig(name="in", value="a", profile="memory"),
              QueueConfig(name="out", value="out", profile="memory"),
              QueueConfig(name="in", value="b", profile="memory")]
    with pytest.raises(ConfigurationError, match=r"'in'.*(more than once|twice|duplicate)"):
        engine(config, dead_letter_queue=None)


def test_a_yaml_file_naming_a_queue_twice_is_refused(tmp_path: Path) -> None:
    """PyYAML's safe_load keeps the last of two equal keys: a copy-pasted queue block silently won."""
    path = tmp_path / "volley_config.yml"
    path.write_text("queues:\n"
                    "  in:\n    value: shop.orders\n    profile: memory\n"
                    "  out:\n    value: shop.invoices\n    profile: memory\n"
                    "  in:\n    value: shop.orders.v2\n    profile: memory\n")
    with pytest.raises(ConfigurationError, match=r"'?in'?.*(more than once|twice|duplicate)"):
        Engine(input_queue="in", output_queues=["out"], yaml_config_path=path, metrics_port=None)


def test_a_yaml_queue_giving_a_setting_twice_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "volley_config.yml"
    path.write_text("queues:\n"
                    "  in:\n    value: shop.orders\n    profile: memory\n    value: shop.refunds\n"
                    "  out:\n    value: shop.invoices\n    profile: memory\n")
    with pytest.raises(ConfigurationError, match=r"value.*(more than once|twice|duplicate)"):
        Engine(input_queue="in", output_queues=["out"], yaml_config_path=path, metrics_port=None)


def test_yaml_merge_keys_are_read_as_safe_load_reads_them(tmp_path: Path) -> None:
    """Shared defaults through an anchor and merge keys (``<<: *defaults``), which safe_load (and py-volley) read,
    were refused as "not valid YAML" by the duplicate-key check (found by a review, session 38). A key given both
    by the merge and in the mapping itself is an override, not a duplicate; one given twice in the mapping still
    is."""
    import yaml

    from volley.config import load_yaml

    document = ("x-defaults: &defaults\n  profile: memory\n  serializer: json\n"
                "queues:\n"
                "  orders:\n    <<: *defaults\n    value: shop.orders\n"
                "  dlq:\n    <<: *defaults\n    value: shop.dlq\n    serializer: orjson\n")
    path = tmp_path / "volley_config.yml"
    path.write_text(document)
    expected = yaml.safe_load(document)["queues"]
    queues = load_yaml(path)
    assert queues["orders"] == {"profile": "memory", "serializer": "json", "value": "shop.orders", "name": "orders"}
    assert queues["dlq"] == {**expected["dlq"], "name": "dlq"} and queues["dlq"]["serializer"] == "orjson"
    path.write_text(document + "    value: shop.dlq.v2\n")
    with pytest.raises(ConfigurationError, match=r"value.*(more than once|twice|duplicate)"):
        load_yaml(path)


# ---------------------------------------------------------------- wrong types: ConfigurationError, not a traceback


@pytest.mark.parametrize("bad_config", ["broker=x", ["broker", "x"], 5])
def test_a_queue_config_that_is_not_a_mapping_is_a_configuration_error(bad_config: Any) -> None:
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match=r"config.*'in'|'in'.*config"):
        engine(queues(broker, **{"in": {"config": bad_config}}))


@pytest.mark.parametrize("bad", ["abc", -1.0, math.nan, math.inf])
def test_a_bad_batch_timeout_is_a_configuration_error(bad: Any) -> None:
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match="batch_timeout_seconds"):
        engine(queues(broker, **{"in": {"batch_timeout_seconds": bad}}))


@pytest.mark.parametrize(("setting", "bad"), [
    ("max_in_flight", "10"),
    ("max_retries", None),
    ("max_retries", "3"),
    ("consume_batch_size", "500"),
    ("shutdown_timeout_seconds", "30"),
])
def test_an_engine_setting_of_the_wrong_type_is_a_configuration_error(setting: str, bad: Any) -> None:
    """A value read from an environment variable and passed on unconverted raised a bare TypeError."""
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match=setting):
        engine(queues(broker), **{setting: bad})


@pytest.mark.parametrize(("setting", "bad"), [
    ("max_retries", math.nan),
    ("max_retries", 1.5),
    ("retry_backoff_seconds", math.nan),
    ("retry_backoff_max_seconds", math.nan),
    ("poll_interval_seconds", math.nan),
    ("redelivery_delay_seconds", math.nan),
    ("shutdown_timeout_seconds", math.nan),
    ("max_deliveries", math.nan),
])
def test_an_engine_setting_that_is_nan_or_fractional_is_refused(setting: str, bad: float) -> None:
    """NaN passes ``value < 0`` and ``value == 0``: with retry_backoff_seconds=NaN (or max_retries=NaN) a failing
    message is never retried nor dead-lettered, it stays in flight until the shutdown deadline."""
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match=setting):
        engine(queues(broker), **{setting: bad})


def test_retry_backoff_nan_would_hold_a_failing_message_forever() -> None:
    """The consequence of accepting NaN above: a handler that raised was called once and never again (no retry, no
    dead letter) and ``run_until_drained`` timed out. Expected: the Engine refuses the setting."""
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match="retry_backoff_seconds"):
        engine(queues(broker), retry_backoff_seconds=math.nan, poll_interval_seconds=0.02)


def test_output_queues_given_as_a_string_says_it_must_be_a_list() -> None:
    """output_queues="out" was read as the queues 'o', 'u', 't'."""
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match="output_queues"):
        engine(queues(broker), output_queues="out")


# ---------------------------------------------------------------- late failures that belong at construction


@pytest.mark.parametrize("model", [5, "os.sep"])
def test_a_data_model_that_is_not_a_type_fails_at_construction(model: Any) -> None:
    """With the dataclass handler a data_model of 5 (or a dotted path to a str) was accepted, and then every
    message went to the dead-letter queue with "validate failed: 5: 'int' object is not callable"."""
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match="data_model"):
        engine(queues(broker, **{"in": {"data_model": model}}))


def test_a_queue_value_that_resolves_to_an_empty_string_is_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    """'value' is checked before ${VAR} substitution only: TOPIC='' gave a queue named '' on the broker."""
    monkeypatch.setenv("ORDERS_TOPIC", "")
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match=r"'in'.*value|value.*'in'"):
        engine(queues(broker, **{"in": {"value": "${ORDERS_TOPIC}"}}))


# ---------------------------------------------------------------- the stdlib json serializer


@pytest.mark.parametrize("payload", [b'{"a": NaN}', b'{"a": Infinity}', b'[-Infinity]'])
def test_json_serializer_refuses_nan_and_infinities_on_input(payload: bytes) -> None:
    """docs/serializers.md: json -- "NaN and infinities are refused". Only the output side refused them: the
    input reached the handler with a float('nan') and failed later at the output stage (or never)."""
    with pytest.raises(SerializationError):
        JsonSerializer().deserialize(payload)


def test_a_json_input_with_nan_goes_to_the_dlq_at_deserialize_without_calling_the_handler() -> None:
    broker = MemoryBroker()
    app_engine = engine(queues(broker), poll_interval_seconds=0.02, retry_backoff_seconds=0.0)
    broker.publish("in", b'{"price": NaN}')
    calls: list[Any] = []

    @app_engine.stream_app
    def forward(message: Any) -> list[tuple[str, Any]]:
        calls.append(message)
        return [("out", message)]

    report = forward.run_until_drained(timeout=10)
    assert report.dead_lettered == 1
    assert calls == []
    [letter] = broker.produced_records("dlq")
    assert letter.headers["volley-error-stage"] == b"deserialize"


def test_json_serializer_encoding_a_too_deep_value_raises_serialization_error() -> None:
    """Every encoding failure is a SerializationError (docs/serializers.md); a deep value raised RecursionError."""
    deep: list[Any] = []
    for _ in range(5000):
        deep = [deep]
    with pytest.raises(SerializationError):
        JsonSerializer().serialize(deep)


def test_tune_gc_that_is_not_a_bool_is_refused() -> None:
    """``tune_gc="no"`` (a YAML or environment string) was ``bool("no")``: True, the opposite of what was asked."""
    broker = MemoryBroker()
    with pytest.raises(ConfigurationError, match="tune_gc must be True or False"):
        engine(queues(broker), tune_gc="no")
