"""Tests of the real-server tooling: if these fail, every Kafka and Redis integration test is suspect."""

from __future__ import annotations

import base64
import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from services._proc import pid_alive
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
