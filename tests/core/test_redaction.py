"""Queue objects print their connector settings with the secrets named but not shown (tracebacks with locals,
error trackers and log lines format them); the connector still gets the real values."""

from __future__ import annotations

from typing import Any

import pytest

from volley.config import QueueConfig
from volley.ports import QueueSpec
from volley.redaction import redacted

SECRETS = {
    "sasl.password": "hunter2-sasl",
    "ssl.key.password": "hunter2-key",
    "password": "hunter2-redis",
    "sasl.oauthbearer.client.secret": "hunter2-oauth",
    "api_token": "hunter2-token",
    "KAFKA_SECRET": "hunter2-env",
}
PLAIN = {"bootstrap.servers": "127.0.0.1:9092", "group.id": "g", "host": "localhost"}


def _leaks(text: str) -> list[str]:
    return [value for value in SECRETS.values() if value in text]


@pytest.mark.parametrize("make", [
    lambda config: QueueSpec(name="in", value="t", connector="confluent", config=config),
    lambda config: QueueConfig(name="in", value="t", profile="confluent", config=config),
], ids=["QueueSpec", "QueueConfig"])
def test_queue_objects_name_their_secrets_without_showing_them(make: Any) -> None:
    config = {**PLAIN, **SECRETS, "nested": {"options": {"password": "hunter2-nested"}}}
    queue = make(config)
    text = repr(queue) + str(queue) + f"{queue}"
    assert _leaks(text) == [] and "hunter2-nested" not in text, text
    for key in [*SECRETS, "bootstrap.servers", "127.0.0.1:9092", "nested"]:
        assert key in text, f"{key} is named"
    assert queue.config["sasl.password"] == "hunter2-sasl", "the connector still gets the real value"


def test_redacted_keeps_plain_settings_and_the_original() -> None:
    config = {**PLAIN, **SECRETS}
    shown = redacted(config)
    assert {k: shown[k] for k in PLAIN} == PLAIN
    assert all(shown[k] == "[redacted]" for k in SECRETS)
    assert config["password"] == "hunter2-redis"
