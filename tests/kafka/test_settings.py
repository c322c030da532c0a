"""Configuration: py-volley's environment variables, Volley's own keys, and errors that say what to change.

No broker needed: librdkafka validates settings when a client is built, before it connects.
"""

from __future__ import annotations

import logging

import pytest

from volley.errors import ConfigurationError
from volley.plugins import build_registry
from volley.ports import QueueSpec
from volley_kafka import KafkaConnector
from volley_kafka.settings import consumer_settings, producer_settings

ENV = ("KAFKA_BROKERS", "KAFKA_CONSUMER_BROKERS", "KAFKA_PRODUCER_BROKERS", "KAFKA_KEY", "KAFKA_SECRET",
       "KAFKA_CONSUMER_GROUP")


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def spec(config: dict[str, object], value: str = "topic-a", role: str = "input") -> QueueSpec:
    return QueueSpec(name="q", value=value, connector="confluent", config=config, app_name="app", role=role)


def test_brokers_and_group_from_py_volley_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_BROKERS", "b1:9092")
    monkeypatch.setenv("KAFKA_CONSUMER_BROKERS", "c1:9092,c2:9092")
    monkeypatch.setenv("KAFKA_PRODUCER_BROKERS", "p1:9092")
    monkeypatch.setenv("KAFKA_CONSUMER_GROUP", "workers")
    consumer = consumer_settings(spec({}))
    assert consumer.librdkafka["bootstrap.servers"] == "c1:9092,c2:9092"
    assert consumer.group_id == "workers"
    assert consumer.librdkafka["group.id"] == "workers"
    assert producer_settings(spec({}, role="output")).librdkafka["bootstrap.servers"] == "p1:9092"
    monkeypatch.delenv("KAFKA_CONSUMER_BROKERS")
    monkeypatch.delenv("KAFKA_PRODUCER_BROKERS")
    assert consumer_settings(spec({})).librdkafka["bootstrap.servers"] == "b1:9092"
    assert producer_settings(spec({})).librdkafka["bootstrap.servers"] == "b1:9092"
    explicit = consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "mine"}))
    assert explicit.librdkafka["bootstrap.servers"] == "x:1", "config wins over the environment"
    assert explicit.group_id == "mine"


def test_sasl_credentials_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_KEY", "user")
    monkeypatch.setenv("KAFKA_SECRET", "secret")
    config = producer_settings(spec({"bootstrap.servers": "x:1"})).librdkafka
    assert config["sasl.username"] == "user"
    assert config["sasl.password"] == "secret"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["sasl.mechanism"] == "PLAIN"
    own = producer_settings(spec({"bootstrap.servers": "x:1", "sasl.username": "me", "sasl.password": "pw"}))
    assert own.librdkafka["sasl.username"] == "me", "explicit credentials win"


def test_missing_brokers_or_group_say_what_to_set() -> None:
    with pytest.raises(ConfigurationError, match=r"bootstrap\.servers.*KAFKA_BROKERS"):
        consumer_settings(spec({"group.id": "g"}))
    with pytest.raises(ConfigurationError, match=r"group\.id.*KAFKA_CONSUMER_GROUP"):
        consumer_settings(spec({"bootstrap.servers": "x:1"}))
    with pytest.raises(ConfigurationError, match="KAFKA_BROKERS"):
        producer_settings(spec({}, role="output"))


def test_defaults_commit_handling_and_volley_keys(caplog: pytest.LogCaptureFixture) -> None:
    settings = consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "linger.ms": 5,
                                       "volley.commit.interval.seconds": 0.25, "poll_interval": 3}))
    config = settings.librdkafka
    assert config["enable.auto.commit"] is False
    assert config["enable.auto.offset.store"] is False
    assert config["auto.offset.reset"] == "earliest", "py-volley's default"
    assert "linger.ms" not in config, "producer-only settings stay off the consumer"
    assert "poll_interval" not in config, "py-volley's own keys are not librdkafka settings"
    assert not any(k.startswith("volley.") for k in config)
    assert settings.commit_interval == 0.25
    assert config["fetch.queue.backoff.ms"] == 50, "librdkafka's 1,000 ms stalls a worker that outruns its fetches"
    assert consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "fetch.queue.backoff.ms": 7})
                             ).librdkafka["fetch.queue.backoff.ms"] == 7
    assert settings.topics == ("topic-a",)
    assert consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g"}, value="a, b,c")).topics == (
        "a", "b", "c")
    with caplog.at_level(logging.WARNING, logger="volley_kafka"):
        forced = consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "enable.auto.commit": True,
                                         "auto.commit.interval.ms": 3000}))
    assert forced.librdkafka["enable.auto.commit"] is False
    assert forced.commit_interval == 3.0, "py-volley users' commit interval is honoured"
    assert "enable.auto.commit=true is overridden" in caplog.text
    producer = producer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "auto.offset.reset": "latest"}))
    assert producer.librdkafka["enable.idempotence"] is True
    assert "group.id" not in producer.librdkafka, "consumer-only settings stay off the producer"


def test_unknown_volley_key_is_rejected() -> None:
    with pytest.raises(ConfigurationError, match=r"volley\.comit\.interval"):
        consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "volley.comit.interval": 1}))
    with pytest.raises(ConfigurationError, match="number of seconds"):
        consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "volley.commit.interval.seconds": "x"}))


def test_librdkafka_rejects_a_setting_at_create_time_naming_it() -> None:
    connector = KafkaConnector()
    with pytest.raises(ConfigurationError, match=r"No such configuration property: \"no.such.thing\""):
        connector.create_consumer(spec({"bootstrap.servers": "127.0.0.1:1", "group.id": "g", "no.such.thing": 1}))
    with pytest.raises(ConfigurationError, match=r"request\.required\.acks"):
        connector.create_producer(spec({"bootstrap.servers": "127.0.0.1:1", "acks": "sometimes"}, role="output"))


def test_exactly_once_settings() -> None:
    settings = consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "volley.exactly.once": True}))
    assert settings.exactly_once
    assert settings.librdkafka["isolation.level"] == "read_committed"
    assert settings.transactional_id is not None and settings.transactional_id.startswith("volley-app-g-")
    assert settings.producer_librdkafka["transactional.id"] == settings.transactional_id
    assert settings.producer_librdkafka["enable.idempotence"] is True
    stable = consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "volley.exactly.once": "true",
                                     "volley.transactional.id": "pod-0"}))
    assert stable.transactional_id == "pod-0"
    with pytest.raises(ConfigurationError, match="read_committed"):
        consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "volley.exactly.once": True,
                                "isolation.level": "read_uncommitted"}))
    with pytest.raises(ConfigurationError, match="input queue"):
        producer_settings(spec({"bootstrap.servers": "x:1", "transactional.id": "t"}, role="output"))


def test_profiles_and_connector_are_registered() -> None:
    registry = build_registry()
    assert {"confluent", "kafka"} <= set(registry.names("connector"))
    profiles = set(registry.names("profile"))
    assert {"confluent", "confluent-batch-json", "confluent-pydantic", "confluent-orjson-pydantic",
            "confluent-msgpack-pydantic", "confluent-dlq", "confluent-eos"} <= profiles
    assert registry.get("profile", "confluent-batch-json")["batch_size"] == 100
    assert registry.get("profile", "confluent-dlq")["data_model"] is None
    assert registry.get("profile", "confluent-eos")["config"] == {"volley.exactly.once": True}


@pytest.mark.parametrize("key", ["session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy"])
def test_consumer_group_protocol_rejects_classic_member_settings_naming_the_fix(key: str) -> None:
    config = {"bootstrap.servers": "x:1", "group.id": "g", "group.protocol": "consumer", key: "10000"}
    with pytest.raises(ConfigurationError) as caught:
        consumer_settings(spec(config))
    message = str(caught.value)
    assert key in message and "'q'" in message and "group.protocol=consumer" in message
    assert "group.protocol=classic" in message, "it says what to do"
    assert ("group.remote.assignor" if key == "partition.assignment.strategy" else "group.consumer.") in message


def test_classic_member_settings_are_fine_under_the_classic_protocol() -> None:
    config = {"bootstrap.servers": "x:1", "group.id": "g", "session.timeout.ms": 10_000,
              "partition.assignment.strategy": "cooperative-sticky"}
    assert consumer_settings(spec(config)).librdkafka["session.timeout.ms"] == 10_000
    explicit = consumer_settings(spec({**config, "group.protocol": "classic"})).librdkafka
    assert explicit["partition.assignment.strategy"] == "cooperative-sticky"


def test_unknown_group_protocol_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match=r"group\.protocol must be one of classic, consumer"):
        consumer_settings(spec({"bootstrap.servers": "x:1", "group.id": "g", "group.protocol": "cooperative"}))


@pytest.mark.parametrize("exactly_once", [False, True])
def test_volley_defaults_build_a_consumer_protocol_client(exactly_once: bool) -> None:
    """Volley's own defaults (and the exactly-once ones) must not add a setting librdkafka rejects there."""
    from confluent_kafka import Consumer

    config = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g", "group.protocol": "consumer",
              "volley.exactly.once": exactly_once}
    settings = consumer_settings(spec(config))
    assert not {"session.timeout.ms", "heartbeat.interval.ms", "partition.assignment.strategy"} & set(
        settings.librdkafka)
    Consumer(dict(settings.librdkafka)).close()  # librdkafka validates settings when the client is built


def test_a_queue_is_located_by_its_cluster(monkeypatch: pytest.MonkeyPatch) -> None:
    """volley.ports.LocatingConnector: what names a queue's dead-letter journal besides its name (review 38)."""
    for name in ("KAFKA_BROKERS", "KAFKA_CONSUMER_BROKERS", "KAFKA_PRODUCER_BROKERS"):
        monkeypatch.delenv(name, raising=False)
    connector = KafkaConnector()
    one = connector.locate(spec({"bootstrap.servers": "b:9092, a:9092"}, role="dlq"))
    assert one == connector.locate(spec({"bootstrap.servers": "a:9092,B:9092", "acks": "all"}, role="dlq"))
    assert one == connector.locate(spec({"bootstrap.servers": "PLAINTEXT://a,b:9092"}, role="dlq"))
    assert one == "kafka:a:9092,b:9092"
    assert connector.locate(spec({"bootstrap.servers": "c:9092"}, role="dlq")) != one
    # where the dead-letter tools' reader finds its brokers (review 38: the producer's variable was read instead)
    monkeypatch.setenv("KAFKA_CONSUMER_BROKERS", "a:9092,b:9092")
    assert connector.locate(spec({}, role="dlq")) == one
