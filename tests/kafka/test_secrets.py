"""``sasl.password`` and ``ssl.key.password`` never reach logs, errors or ``volley plugins`` output.

librdkafka redacts its sensitive properties in its own configuration dump; what is checked here is everything
Volley writes around it: start-up errors, rejected settings, the engine's logs at DEBUG with librdkafka's debug
contexts on, a normal run, the CLI, and the text of the settings objects and adapters that carry the passwords
(what a traceback with locals or an error tracker prints).
"""

from __future__ import annotations

import asyncio
import json
import logging
import traceback
from typing import Any

import pytest

from volley import Engine
from volley.cli import main as volley_main

pytestmark = pytest.mark.kafka

SASL_SECRET = "sasl-pw-7f3e9c1d"
KEY_SECRET = "key-pw-2b8a6e4f"
ENV_SECRET = "env-pw-5d1c0a9b"
SECRETS = (SASL_SECRET, KEY_SECRET, ENV_SECRET)
CODEC = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}


def credentials(**extra: Any) -> dict[str, Any]:
    return {"sasl.username": "volley", "sasl.password": SASL_SECRET, "ssl.key.password": KEY_SECRET, **extra}


def leaks(text: str) -> list[str]:
    return [secret for secret in SECRETS if secret in text]


def error_text(exc: BaseException) -> str:
    return "".join(traceback.format_exception(exc)) + repr(exc) + repr(exc.args)


def engine(kit: Any, source: str, sink: str, input_config: dict[str, Any],
           output_config: dict[str, Any] | None = None) -> Engine:
    return Engine(
        app_name=kit.unique("secrets"), input_queue="input", output_queues=["out"], metrics_port=None,
        poll_interval_seconds=0.1,
        queue_config={
            "input": {"value": source, "profile": "confluent", **CODEC,
                      "config": {"bootstrap.servers": kit.bootstrap, "group.id": kit.unique("g"), **input_config}},
            "out": {"value": sink, "profile": "confluent", **CODEC,
                    "config": {"bootstrap.servers": kit.bootstrap, **(output_config or {})}},
        },
    )


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch) -> pytest.LogCaptureFixture:
    monkeypatch.setenv("KAFKA_KEY", "volley")
    monkeypatch.setenv("KAFKA_SECRET", ENV_SECRET)
    caplog.set_level(logging.DEBUG)
    return caplog


@pytest.mark.parametrize(
    ("label", "input_config"),
    [
        # SASL against the broker's plaintext listener: the start-up check times out.
        ("sasl-handshake", credentials(**{"security.protocol": "SASL_PLAINTEXT", "sasl.mechanism": "PLAIN",
                                          "volley.startup.timeout.seconds": 2, "debug": "all"})),
        # A key that cannot be loaded: librdkafka rejects the client with an error about the key.
        ("bad-key", credentials(**{"security.protocol": "SSL", "ssl.key.location": "/nonexistent/key.pem",
                                   "debug": "all"})),
        # Credentials from KAFKA_KEY / KAFKA_SECRET, and a setting librdkafka does not know.
        ("env-and-typo", {"sasl.mechanism": "PLAIN", "security.protocol": "SASL_PLAINTEXT",
                          "sasl.pasword": SASL_SECRET, "volley.startup.timeout.seconds": 2}),
    ],
)
async def test_start_up_errors_and_their_logs_carry_no_password(kit: Any, everything_logged: pytest.LogCaptureFixture,
                                                                label: str, input_config: dict[str, Any]) -> None:
    source, sink = kit.topic(f"sec-{label}-in"), kit.unique(f"sec-{label}-out")
    app = engine(kit, source, sink, input_config, output_config=credentials())

    @app.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("out", message)]

    with pytest.raises(Exception) as caught:  # noqa: PT011 - which error depends on the case; its text is the point
        await asyncio.wait_for(handler.run_async(max_messages=1), 60)
    assert not leaks(error_text(caught.value)), error_text(caught.value)
    logged = "\n".join(r.getMessage() + (error_text(r.exc_info[1]) if r.exc_info and r.exc_info[1] else "")
                       for r in everything_logged.records)
    assert everything_logged.records, "the case logged nothing: it tests nothing"
    assert not leaks(logged), [r.getMessage() for r in everything_logged.records if leaks(r.getMessage())][:5]


async def test_a_normal_run_with_passwords_configured_logs_none(kit: Any,
                                                               everything_logged: pytest.LogCaptureFixture) -> None:
    """Plaintext broker: librdkafka ignores the SASL and SSL settings, but Volley carries them end to end."""
    source, sink = kit.topic("sec-run-in"), kit.topic("sec-run-out")
    kit.produce(source, [json.dumps({"n": i}).encode() for i in range(5)])
    app = engine(kit, source, sink, credentials(debug="conf,security,broker,cgrp"),
                 output_config=credentials(debug="conf,security,broker"))

    @app.stream_app
    def handler(message: dict[str, Any]) -> list[tuple[str, Any]]:
        return [("out", message)]

    report = await asyncio.wait_for(handler.run_async(max_messages=5), 60)
    assert report.acked == 5
    texts = [r.getMessage() for r in everything_logged.records]
    assert any("[redacted]" in t for t in texts), "librdkafka's configuration dump was not logged: nothing checked"
    assert not [t for t in texts if leaks(t)][:5]
    assert not leaks(repr(report)) and not leaks(str(report))


def test_volley_plugins_prints_no_password(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KAFKA_KEY", "volley")
    monkeypatch.setenv("KAFKA_SECRET", ENV_SECRET)
    assert volley_main(["plugins"]) == 0
    out, err = capsys.readouterr()
    assert "confluent" in out, "the Kafka plugin is listed"
    assert not leaks(out + err)


def queue(role: str, **config: Any) -> Any:
    from volley.ports import QueueSpec

    base = {"bootstrap.servers": "127.0.0.1:1", "group.id": "g", "volley.startup.timeout.seconds": 0}
    return QueueSpec(name=role, value="t", connector="confluent", config={**base, **credentials(), **config},
                     app_name="secrets", role=role)


def test_settings_and_adapters_render_no_password() -> None:
    """What a traceback with locals (pytest --showlocals, an error tracker), a debugger or a log line that
    formats the object would print: the settings objects carry the passwords to librdkafka, their text must not."""
    from volley_kafka import KafkaConnector
    from volley_kafka.settings import consumer_settings, producer_settings

    settings = [consumer_settings(queue("input")), consumer_settings(queue("input", **{"volley.exactly.once": True})),
                producer_settings(queue("output"))]
    for each in settings:
        assert not leaks(repr(each) + str(each)), repr(each)
        assert "sasl.password" in repr(each), "the setting is named (redacted), not dropped"
    assert settings[0].librdkafka["sasl.password"] == SASL_SECRET, "librdkafka still gets the real one"
    assert settings[1].producer_librdkafka["ssl.key.password"] == KEY_SECRET
    connector = KafkaConnector()
    consumer = connector.create_consumer(queue("input"))
    producer = connector.create_producer(queue("output"))
    try:
        assert not leaks(repr(consumer) + str(consumer) + repr(producer) + str(producer))
    finally:
        asyncio.run(consumer.close())


@pytest.mark.parametrize("bad", [
    {"group.protocol": "consumer", "session.timeout.ms": 10000},  # a classic-only setting under KIP-848
    {"group.protocol": "cooperative"},
    {"volley.commit.interval.seconds": "soon"},
    {"volley.revoke.timeout.seconds": -1},
])
def test_rejected_settings_name_the_setting_not_the_password(bad: dict[str, Any]) -> None:
    from volley.errors import ConfigurationError
    from volley_kafka.settings import consumer_settings

    with pytest.raises(ConfigurationError) as caught:
        consumer_settings(queue("input", **bad))
    assert not leaks(error_text(caught.value)), error_text(caught.value)
