"""RSMQ queue configuration is checked at create_* time, with messages that say what to change (no server needed)."""

from __future__ import annotations

import subprocess
import sys
from typing import Any

import pytest

from volley.errors import ConfigurationError
from volley.plugins import build_registry
from volley.ports import QueueSpec
from volley_rsmq import RsmqConnector, parse_settings
from volley_rsmq.envelope import unwrap, wrap

HOST = {"host": "127.0.0.1"}


def test_defaults_follow_pyrsmq_and_py_volley() -> None:
    settings = parse_settings(HOST, "q", "input")
    assert (settings.host, settings.port, settings.db, settings.namespace) == ("127.0.0.1", 6379, 0, "rsmq")
    assert (settings.create_vt, settings.create_delay, settings.create_maxsize) == (30.0, 0.0, 65565)
    assert settings.headers == "drop"
    assert settings.heartbeat is True
    assert parse_settings(HOST, "q", "dlq").headers == "envelope"


def test_redis_host_environment_variable(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("REDIS_HOST", "redis.internal:6380")
    settings = parse_settings({}, "q", "input")
    assert (settings.host, settings.port) == ("redis.internal", 6380)
    monkeypatch.setenv("REDIS_HOST", "redis.internal")
    assert parse_settings({}, "q", "input").port == 6379
    assert parse_settings({"host": "other", "port": "7000"}, "q", "input").port == 7000  # config wins


def test_redis_host_accepts_what_the_test_tooling_accepts(monkeypatch: pytest.MonkeyPatch) -> None:
    """REDIS_HOST as a URL or a bracketed IPv6 address, and REDIS_PORT beside a bare host: the forms the service
    tooling and the pytest plugin read must mean the same server to the connector."""
    monkeypatch.setenv("REDIS_HOST", "redis://cache.internal:6390/0")
    assert (parse_settings({}, "q", "input").host, parse_settings({}, "q", "input").port) == ("cache.internal", 6390)
    monkeypatch.setenv("REDIS_HOST", "[::1]:6391")
    assert (parse_settings({}, "q", "input").host, parse_settings({}, "q", "input").port) == ("::1", 6391)
    monkeypatch.setenv("REDIS_HOST", "redis.internal")
    monkeypatch.setenv("REDIS_PORT", "6392")
    assert parse_settings({}, "q", "input").port == 6392
    monkeypatch.setenv("REDIS_HOST", "redis.internal:6393")
    assert parse_settings({}, "q", "input").port == 6393  # a port in REDIS_HOST wins over REDIS_PORT
    assert parse_settings({"host": "other"}, "q", "input").port == 6379  # a configured host ignores the env
    monkeypatch.setenv("REDIS_PORT", "many")
    monkeypatch.setenv("REDIS_HOST", "redis.internal")
    with pytest.raises(ConfigurationError, match="REDIS_PORT"):
        parse_settings({}, "q", "input")


def test_missing_host_says_how_to_set_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("REDIS_HOST", raising=False)
    with pytest.raises(ConfigurationError, match="REDIS_HOST"):
        RsmqConnector().create_consumer(QueueSpec("in", "q", "rsmq", {}))


@pytest.mark.parametrize(
    ("config", "value", "match"),
    [
        ({"vt": 0}, "q", "'vt' must be greater than 0"),
        ({"vt": "soon"}, "q", "'vt' must be a number"),
        ({"delay": -1}, "q", "'delay' must be at least 0"),
        ({"maxsize": 0}, "q", "'maxsize' must be a byte count from 1024 to 65565"),
        ({"port": "http"}, "q", "'port' must be an integer"),
        ({"port": 70000}, "q", "between 1 and 65535"),
        ({"options": {"decode_responses": True}}, "q", "decode_responses must be false"),
        ({"options": "fast"}, "q", "'options' must be a mapping"),
        ({"headers": "keep"}, "q", "'headers' must be one of"),
        ({"heartbeat": "yes"}, "q", "'heartbeat' must be true or false"),
        ({"ns": "a:b"}, "q", "'ns' must not contain ':'"),
        ({"visibility_timeout": 5}, "q", r"unknown config key\(s\) \['visibility_timeout'\]"),
        ({}, "bad:name", "not a valid RSMQ queue name"),
        ({}, "x" * 65, "not a valid RSMQ queue name"),
        ({"send_batch_size": 0}, "q", "'send_batch_size' must be a positive integer"),
        ({"max_pending_deletes": 0}, "q", "'max_pending_deletes' must be a positive integer"),
        ({"max_pending_deletes": 1.5}, "q", "'max_pending_deletes' must be a positive integer"),
    ],
)
def test_invalid_config_is_refused_at_create_time(config: dict[str, Any], value: str, match: str) -> None:
    connector = RsmqConnector()
    with pytest.raises(ConfigurationError, match=match):
        connector.create_consumer(QueueSpec("in", value, "rsmq", {**HOST, **config}))
    with pytest.raises(ConfigurationError, match=match):
        connector.create_producer(QueueSpec("out", value, "rsmq", {**HOST, **config}))


def test_py_volley_pyrsmq_flags_are_accepted() -> None:
    settings = parse_settings({**HOST, "exceptions": False, "quiet": True, "options": {"decode_responses": False,
                                                                                       "socket_timeout": 3}}, "q",
                              "input")
    assert settings.redis_kwargs()["socket_timeout"] == 3
    assert settings.redis_kwargs()["decode_responses"] is False


def test_plugin_registers_the_connector_and_py_volley_profiles() -> None:
    registry = build_registry()
    assert isinstance(registry.get("connector", "rsmq"), RsmqConnector)
    for name in ("rsmq", "rsmq-pydantic", "rsmq-orjson-pydantic", "rsmq-msgpack-pydantic", "rsmq-dlq"):
        assert registry.get("profile", name)["connector"] == "rsmq"
    assert registry.get("profile", "rsmq")["serializer"] == "orjson"
    assert registry.get("profile", "rsmq-pydantic")["model_handler"] == "pydantic-parser"
    assert registry.get("profile", "rsmq-msgpack-pydantic")["serializer"] == "msgpack"
    dlq = registry.get("profile", "rsmq-dlq")
    assert (dlq["serializer"], dlq["model_handler"], dlq["data_model"]) == ("none", "none", None)
    assert dlq["config"] == {"headers": "envelope"}


@pytest.mark.parametrize(
    ("value", "key", "headers"),
    [
        (b"plain", None, None),
        (b"\xff\xfe", b"\x00k", {"a": b"1", "b": b"\xc3"}),
        ('{"x": "é"}'.encode(), b"key", {"volley-error-reason": b"boom"}),
    ],
)
def test_envelope_round_trip(value: bytes, key: bytes | None, headers: dict[str, bytes] | None) -> None:
    assert unwrap(wrap(value, key, headers)) == (value, key, headers)


@pytest.mark.parametrize("body", [b"plain text", b'{"volley-envelope": 1}', b'{"volley-envelope":1, "payload"', b""])
def test_bodies_that_are_not_envelopes_pass_through(body: bytes) -> None:
    assert unwrap(body) == (body, None, None)


def test_transient_redis_error_replies_are_told_from_permanent_ones() -> None:
    import redis

    from volley_rsmq.client import is_transient

    assert is_transient(redis.ConnectionError("refused"))
    assert is_transient(redis.exceptions.ReadOnlyError("You can't write against a read only replica."))
    assert is_transient(redis.exceptions.OutOfMemoryError("command not allowed when used memory > 'maxmemory'."))
    assert is_transient(redis.ResponseError("BUSY Redis is busy running a script. You can only call SCRIPT KILL"))
    assert is_transient(redis.ResponseError(
        "Command # 1 (ZREM rsmq:q a) of pipeline caused error: MASTERDOWN Link with MASTER is down"))
    assert not is_transient(redis.ResponseError("WRONGTYPE Operation against a key holding the wrong kind of value"))
    assert not is_transient(redis.ResponseError("ERR wrong number of arguments for 'zrem' command"))
    assert not is_transient(redis.ResponseError("BUSYGROUP Consumer Group name already exists"))


def test_settings_name_the_redis_password_without_showing_it() -> None:
    """A traceback with locals, an error tracker or a log line that formats the settings must not print the
    Redis password (given directly or among the redis options); redis-py still gets it."""
    settings = parse_settings({"host": "localhost", "password": "hunter2-redis",
                               "options": {"password": "hunter2-option", "socket_keepalive": True}}, "q", "input")
    text = repr(settings) + str(settings)
    assert "hunter2" not in text, text
    assert "password=" in text and "socket_keepalive" in text, "the settings are named, their values redacted"
    assert settings.redis_kwargs()["password"] == "hunter2-option", "redis-py gets the real one (options win)"


def test_an_app_that_uses_no_rsmq_queue_does_not_import_redis() -> None:
    """Building the plugin registry (every ``volley`` command and every app does) loads each installed plugin:
    volley-rsmq's must not import redis-py and PyRSMQ (about 0.3 s) until an RSMQ queue is built. The connector,
    its settings check and the package's names stay where they were."""
    script = (
        "import sys\n"
        "from volley.plugins import build_registry\n"
        "registry = build_registry()\n"
        "assert 'rsmq' in registry.entries['connector'], registry.entries['connector']\n"
        "import volley_rsmq\n"
        "from volley_rsmq import RsmqConnector, parse_settings\n"
        "RsmqConnector().check(type('Q', (), {'config': {'host': '127.0.0.1'}, 'value': 'q', 'role': 'input'})())\n"
        "print(sorted(name for name in ('redis', 'rsmq') if name in sys.modules))\n"
        "from volley_rsmq import RsmqClient, RsmqConsumer, LAST_ERROR_HEADER\n"
        "print('redis' in sys.modules, RsmqClient.__name__, RsmqConsumer.__name__, LAST_ERROR_HEADER)\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    first, second = done.stdout.splitlines()
    assert first == "[]"  # nothing of redis or PyRSMQ imported
    assert second.startswith("True RsmqClient RsmqConsumer")  # the names are still there, imported when asked


def test_a_queue_is_located_by_its_server_database_and_namespace() -> None:
    """volley.ports.LocatingConnector: what names a queue's dead-letter journal besides its name (review 38)."""
    connector = RsmqConnector()

    def at(**config: Any) -> str:
        return connector.locate(QueueSpec(name="q", value="q", connector="rsmq", config={**HOST, **config},
                                          role="dlq"))

    assert at() == at(vt=5) == "rsmq:127.0.0.1:6379/0/rsmq"
    assert len({at(), at(port=6380), at(db=1), at(ns="other"), at(options={"db": 2})}) == 5
    assert at(host="Redis.Local") == at(host="redis.local")


def test_the_envelope_writes_a_header_name_that_is_not_utf8() -> None:
    """An input whose envelope holds a header name with a lone surrogate (valid JSON any producer can write) is read;
    its dead letter copies the headers, and writing them raised UnicodeEncodeError: the app stopped, and stopped
    again on the same message after each restart (review 38). It is written escaped, as JSON allows."""
    name = "x-\udcff"
    body = wrap(b"v", None, {name: b"1", "ok": b"2"})
    assert unwrap(body) == (b"v", None, {name: b"1", "ok": b"2"})
    assert unwrap(wrap(b"v", None, {"caf\u00e9": b"1"})) == (b"v", None, {"caf\u00e9": b"1"})
