"""Tests of the real-server tooling: if these fail, every Kafka and Redis integration test is suspect."""

from __future__ import annotations

import base64
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from services._proc import checkout_key, pid_alive, state_dir
from services.kafka import KafkaBroker, _random_cluster_id, api_versions, request_metadata
from services.pytest_plugin import ExternalRedis, RedisHandle, parse_redis_host
from services.redis import RedisServer, ping

TOOLS = Path(__file__).resolve().parents[2] / "tools" / "services"

# Kafka API keys a transactional, group-committing client cannot work without.
PRODUCE, FETCH, OFFSET_COMMIT, FIND_COORDINATOR, JOIN_GROUP = 0, 1, 8, 10, 11
INIT_PRODUCER_ID, ADD_PARTITIONS_TO_TXN, END_TXN, TXN_OFFSET_COMMIT = 22, 24, 26, 28


def _redis_command(host: str, port: int, *args: bytes) -> bytes:
    frame = b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)
    with socket.create_connection((host, port), timeout=5) as sock:
        sock.sendall(frame)
        return sock.recv(4096)


def _split_host_port(value: str) -> tuple[str, int]:
    host, _, port = value.split(",", maxsplit=1)[0].rpartition(":")
    return host, int(port)


# ------------------------------------------------------------------------------------------ pure helpers


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("redis.local", ("redis.local", 6379)),
        ("127.0.0.1:7000", ("127.0.0.1", 7000)),
        ("[::1]:7001", ("::1", 7001)),
        ("[::1]", ("::1", 6379)),
        ("redis://cache:7002/0", ("cache", 7002)),
    ],
)
def test_parse_redis_host_accepts_common_forms(value: str, expected: tuple[str, int]) -> None:
    assert parse_redis_host(value, default_port=6379) == expected


def test_cluster_id_uses_kafka_uuid_text_form() -> None:
    for _ in range(200):
        text = _random_cluster_id()
        assert len(text) == 22
        assert not text.startswith("-")
        assert len(base64.urlsafe_b64decode(text + "==")) == 16


def test_state_dir_is_keyed_by_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("VOLLEY_STATE_DIR", raising=False)
    monkeypatch.setenv("VOLLEY_CACHE_DIR", str(tmp_path / "cache"))
    one, two = tmp_path / "a" / "volley", tmp_path / "b" / "volley"  # same folder name, different checkouts
    assert state_dir(one) != state_dir(two)
    assert state_dir(one) == state_dir(one)
    assert state_dir(one).parent == tmp_path / "cache" / "run"
    assert checkout_key(one).startswith("volley-")
    assert state_dir() == tmp_path / "cache" / "run" / checkout_key(Path(__file__).resolve().parents[2])
    monkeypatch.setenv("VOLLEY_STATE_DIR", str(tmp_path / "explicit"))
    assert state_dir(one) == state_dir(two) == tmp_path / "explicit"


def test_external_redis_refuses_restart_with_a_skip() -> None:
    handle = ExternalRedis("127.0.0.1", 6390)
    assert handle.url == "redis://127.0.0.1:6390/0"
    assert not handle.supports_restart
    with pytest.raises(pytest.skip.Exception, match="external server"):
        handle.restart()


# ------------------------------------------------------------------------------------------------- Redis


@pytest.mark.redis
def test_redis_fixture_answers_ping(redis_server: RedisHandle) -> None:
    assert ping(redis_server.host, redis_server.port)
    assert redis_server.url.endswith(f":{redis_server.port}/0")


@pytest.mark.redis
def test_redis_restart_keeps_port_and_appendonly_data() -> None:
    server = RedisServer(appendonly=True).start()
    try:
        first_pid, port = server.pid, server.port
        assert first_pid is not None
        assert _redis_command(server.host, port, b"RPUSH", b"stream", b"a", b"b") == b":2\r\n"
        server.restart()
        assert server.port == port
        assert server.pid != first_pid
        assert not pid_alive(first_pid)
        assert _redis_command(server.host, port, b"LRANGE", b"stream", b"0", b"-1") == b"*2\r\n$1\r\na\r\n$1\r\nb\r\n"
        work_dir = server.work_dir
    finally:
        last_pid = server.pid
        server.stop()
    assert last_pid is not None
    assert not pid_alive(last_pid)
    assert work_dir is not None
    assert not work_dir.exists()
    assert not server.ping()


@pytest.mark.redis
def test_redis_without_appendonly_forgets_on_restart() -> None:
    with RedisServer(appendonly=False) as server:
        assert _redis_command(server.host, server.port, b"SET", b"k", b"v") == b"+OK\r\n"
        server.restart()
        assert _redis_command(server.host, server.port, b"GET", b"k") == b"$-1\r\n"


@pytest.mark.redis
def test_redis_cli_start_status_stop(tmp_path: Path) -> None:
    env = {**os.environ, "VOLLEY_STATE_DIR": str(tmp_path)}

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(TOOLS / "redis.py"), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )

    started = cli("start")
    assert started.returncode == 0, started.stderr
    line = started.stdout.strip()
    assert line.startswith("REDIS_HOST=")
    host, port = _split_host_port(line.removeprefix("REDIS_HOST="))
    try:
        assert ping(host, port)
        assert cli("start").stdout.strip() == line  # idempotent: reports the running server
        status = cli("status")
        assert status.returncode == 0
        assert status.stdout.strip() == line
    finally:
        assert cli("stop").returncode == 0
    with pytest.raises(ConnectionRefusedError):
        ping(host, port, timeout=1.0)
    assert cli("status").returncode == 1


def _checkout_cli(tools: Path, env: dict[str, str]) -> Callable[..., subprocess.CompletedProcess[str]]:
    def cli(script: str, *args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, str(tools / script), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )

    return cli


def _copy_checkout(root: Path) -> Path:
    """A second checkout of the tooling: what a git worktree or another clone looks like to it."""
    tools = root / "tools" / "services"
    shutil.copytree(TOOLS, tools, ignore=shutil.ignore_patterns("__pycache__"))
    return tools


@pytest.mark.redis
def test_cli_in_two_checkouts_never_adopts_or_stops_the_others_server(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in {"VOLLEY_STATE_DIR", "VOLLEY_CACHE_DIR"}}
    env["XDG_CACHE_HOME"] = str(tmp_path / "cache")  # one shared cache, as on a developer machine
    one = _checkout_cli(_copy_checkout(tmp_path / "one"), env)
    two = _checkout_cli(_copy_checkout(tmp_path / "two"), env)
    first = one("redis.py", "start")
    assert first.returncode == 0, first.stderr
    try:
        second = two("redis.py", "start")
        assert second.returncode == 0, second.stderr
        try:
            assert second.stdout.strip() != first.stdout.strip()  # its own server, not the other checkout's
            assert two("redis.py", "stop").returncode == 0
            assert ping(*_split_host_port(first.stdout.strip().removeprefix("REDIS_HOST=")))
            assert one("redis.py", "status").stdout.strip() == first.stdout.strip()
            assert two("redis.py", "status").returncode == 1
        finally:
            two("redis.py", "stop")
    finally:
        assert one("redis.py", "stop").returncode == 0
    assert one("redis.py", "status").returncode == 1


@pytest.mark.redis
def test_redis_cli_prints_what_rsmq_reads_and_restart_keeps_port_and_data(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rsmq_settings = pytest.importorskip("volley_rsmq.settings")
    cli = _checkout_cli(TOOLS, {**os.environ, "VOLLEY_STATE_DIR": str(tmp_path)})
    started = cli("redis.py", "start", "--appendonly")
    assert started.returncode == 0, started.stderr
    line = started.stdout.strip()
    name, _, value = line.partition("=")
    try:
        assert name == "REDIS_HOST"
        monkeypatch.setenv(name, value)  # as `export $(redis.py start)` would
        settings = rsmq_settings.parse_settings({}, "queue", "input")
        host, port = settings.host, settings.port
        assert ping(host, port)
        assert _redis_command(host, port, b"RPUSH", b"stream", b"a", b"b") == b":2\r\n"
        pid = json_state(tmp_path / "redis.json")["pid"]
        restarted = cli("redis.py", "restart")
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.strip() == line
        assert json_state(tmp_path / "redis.json")["pid"] != pid
        assert not pid_alive(pid)
        assert _redis_command(host, port, b"LLEN", b"stream") == b":2\r\n"
    finally:
        assert cli("redis.py", "stop").returncode == 0


def json_state(path: Path) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(path.read_text())
    return data


# ------------------------------------------------------------------------------------------------- Kafka


@pytest.mark.kafka
def test_kafka_fixture_serves_transaction_and_group_apis(kafka_bootstrap: str) -> None:
    host, port = _split_host_port(kafka_bootstrap)
    versions = api_versions(host, port)
    needed = {
        PRODUCE,
        FETCH,
        OFFSET_COMMIT,
        FIND_COORDINATOR,
        JOIN_GROUP,
        INIT_PRODUCER_ID,
        ADD_PARTITIONS_TO_TXN,
        END_TXN,
        TXN_OFFSET_COMMIT,
    }
    assert needed <= versions.keys()
    meta = request_metadata(host, port)
    assert meta.cluster_id
    assert meta.brokers


@pytest.mark.kafka
def test_kafka_transactional_produce_and_group_commit(kafka_bootstrap: str) -> None:
    ck = pytest.importorskip("confluent_kafka")
    topic = f"services-{uuid.uuid4().hex[:10]}"
    producer = ck.Producer({"bootstrap.servers": kafka_bootstrap, "transactional.id": f"tx-{topic}"})
    producer.init_transactions(60)
    producer.begin_transaction()
    for i in range(5):
        producer.produce(topic, value=b"%d" % i)
    producer.commit_transaction(60)
    producer.begin_transaction()
    producer.produce(topic, value=b"aborted")
    producer.abort_transaction(60)

    consumer = ck.Consumer(
        {
            "bootstrap.servers": kafka_bootstrap,
            "group.id": f"g-{topic}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
        }
    )
    try:
        consumer.subscribe([topic])
        values: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(values) < 5 and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                values.append(message.value())
        assert values == [b"0", b"1", b"2", b"3", b"4"]
        consumer.commit(asynchronous=False)
        committed = consumer.committed([ck.TopicPartition(topic, 0)], 30)
        assert committed[0].offset >= 5
    finally:
        consumer.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_broker_start_and_stop_kill_the_process() -> None:
    broker = KafkaBroker().start()
    try:
        pid, port, work_dir = broker.pid, broker.port, broker.work_dir
        assert pid is not None
        assert port is not None
        assert work_dir is not None
        assert broker.bootstrap_servers == f"127.0.0.1:{port}"
        assert pid_alive(pid)
        meta = request_metadata("127.0.0.1", port)
        assert [(b.node_id, b.port) for b in meta.brokers] == [(1, port)]
        assert "Kafka Server started" in broker.log_path.read_text()
    finally:
        broker.stop()
    assert not pid_alive(pid)
    assert not work_dir.exists()
    with pytest.raises(ConnectionRefusedError):
        api_versions("127.0.0.1", port, timeout=1.0)
    broker.stop()  # a second stop is harmless


def _produce_and_read_back(bootstrap: str, topic: str, values: list[bytes], *, produce: bool) -> list[bytes]:
    ck = pytest.importorskip("confluent_kafka")
    if produce:
        producer = ck.Producer({"bootstrap.servers": bootstrap})
        for value in values:
            producer.produce(topic, value=value)
        assert producer.flush(60) == 0
    consumer = ck.Consumer(
        {"bootstrap.servers": bootstrap, "group.id": f"g-{uuid.uuid4().hex[:8]}", "auto.offset.reset": "earliest"}
    )
    try:
        consumer.assign([ck.TopicPartition(topic, 0, 0)])
        seen: list[bytes] = []
        deadline = time.monotonic() + 60
        while len(seen) < len(values) and time.monotonic() < deadline:
            message = consumer.poll(0.5)
            if message is not None and message.error() is None:
                seen.append(message.value())
        return seen
    finally:
        consumer.close()


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_restart_keeps_ports_cluster_and_data() -> None:
    topic = f"restart-{uuid.uuid4().hex[:10]}"
    values = [b"%d" % i for i in range(20)]
    with KafkaBroker() as broker:
        assert broker.port is not None
        port, controller_port, first_pid = broker.port, broker.controller_port, broker.pid
        cluster = request_metadata("127.0.0.1", port).cluster_id
        assert _produce_and_read_back(broker.bootstrap_servers, topic, values, produce=True) == values
        broker.halt()
        assert first_pid is not None
        assert not pid_alive(first_pid)
        with pytest.raises(ConnectionRefusedError):
            api_versions("127.0.0.1", port, timeout=1.0)
        broker.start()  # after halt(): the same broker comes back
        assert (broker.port, broker.controller_port) == (port, controller_port)
        assert broker.pid != first_pid
        assert request_metadata("127.0.0.1", port).cluster_id == cluster
        assert _produce_and_read_back(broker.bootstrap_servers, topic, values, produce=False) == values


@pytest.mark.kafka
@pytest.mark.slow
def test_kafka_cli_restart_and_stop_keep_data(tmp_path: Path) -> None:
    cli = _checkout_cli(TOOLS, {**os.environ, "VOLLEY_STATE_DIR": str(tmp_path)})
    started = cli("kafka.py", "start")
    assert started.returncode == 0, started.stderr
    line = started.stdout.strip()
    assert line.startswith("KAFKA_BROKERS=")
    bootstrap = line.removeprefix("KAFKA_BROKERS=")
    topic = f"cli-restart-{uuid.uuid4().hex[:10]}"
    values = [b"a", b"b", b"c"]
    work_dir = Path(json_state(tmp_path / "kafka.json")["work_dir"])
    try:
        first_pid = json_state(tmp_path / "kafka.json")["pid"]
        assert _produce_and_read_back(bootstrap, topic, values, produce=True) == values
        restarted = cli("kafka.py", "restart")
        assert restarted.returncode == 0, restarted.stderr
        assert restarted.stdout.strip() == line
        assert not pid_alive(first_pid)
        assert _produce_and_read_back(bootstrap, topic, values, produce=False) == values
        halted = cli("kafka.py", "stop", "--keep-data")
        assert halted.returncode == 0, halted.stderr
        assert cli("kafka.py", "status").returncode == 1
        resumed = cli("kafka.py", "start")
        assert resumed.returncode == 0, resumed.stderr
        assert resumed.stdout.strip() == line
        assert _produce_and_read_back(bootstrap, topic, values, produce=False) == values
    finally:
        assert cli("kafka.py", "stop").returncode == 0
    assert not (tmp_path / "kafka.json").exists()
    assert not work_dir.exists()
