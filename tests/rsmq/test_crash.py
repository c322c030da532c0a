"""Zero loss through crashes: a worker killed with SIGKILL mid-stream, and Redis restarted mid-stream.

The worker is a real subprocess (rsmq_worker.py) running the engine RSMQ -> RSMQ.
At-least-once means duplicates may appear; they are counted and reported,
never lost messages.
"""

from __future__ import annotations

import json
import random
import sys
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.processes import WorkerProcess, wait_for
from volley_rsmq import RsmqClient, parse_settings

pytestmark = [pytest.mark.redis, pytest.mark.slow]

WORKER = Path(__file__).with_name("rsmq_worker.py")
TOTAL = 5000
VT = 2.0  # short, so that what a killed worker held comes back soon


def rsmq_worker(host: str, port: int, source: str, output: str, pause: float, log: Path) -> WorkerProcess:
    return WorkerProcess([sys.executable, str(WORKER), host, str(port), source, output, str(VT), str(pause)], log)


def seed(host: str, port: int, qname: str, count: int) -> None:
    client = RsmqClient(parse_settings({"host": host, "port": port}, qname, "output"))
    try:
        for start in range(0, count, 500):
            client.send(qname, [(None, json.dumps({"id": i}).encode()) for i in range(start, min(start + 500, count))])
    finally:
        client.close()


def output_ids(client: redis.Redis, qname: str) -> list[int]:
    ids = client.zrange(f"rsmq:{qname}", 0, -1)
    if not ids:
        return []
    bodies = client.hmget(f"rsmq:{qname}:Q", ids)
    return [json.loads(body)["id"] for body in bodies if body is not None]


def report(capsys: pytest.CaptureFixture[str], record_property: Callable[[str, Any], None], line: str,
           **values: Any) -> None:
    """Show the outcome in the test run's output (duplicates are reported, not hidden) and in junit properties."""
    for key, value in values.items():
        record_property(key, value)
    with capsys.disabled():
        print(f"\n{line}")


def settled(client: redis.Redis, qname_in: str, qname_out: str) -> Callable[[], bool]:
    def check() -> bool:
        return client.zcard(f"rsmq:{qname_in}") == 0 and len(set(output_ids(client, qname_out))) == TOTAL

    return check


def test_kill_9_three_times_loses_nothing(
    redis_server: Any, qname: str, raw_redis: redis.Redis, worker_processes: list[WorkerProcess], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], record_property: Callable[[str, Any], None],
) -> None:
    source, output = qname + "-in", qname + "-out"
    seed(redis_server.host, redis_server.port, source, TOTAL)
    worker = rsmq_worker(redis_server.host, redis_server.port, source, output, 0.0003, tmp_path / "worker.log")
    worker_processes.append(worker)
    rng = random.Random()
    seed_value = rng.randrange(1 << 30)
    rng.seed(seed_value)
    moments = sorted(rng.uniform(0.1, 0.8) for _ in range(3))

    for moment in moments:
        worker.start()
        target = int(moment * TOTAL)
        wait_for(lambda t=target: raw_redis.zcard(f"rsmq:{output}") >= t, 60,
                 f"{target} outputs before the kill", worker.ensure_alive)
        worker.kill()

    produced_before_last_run = raw_redis.zcard(f"rsmq:{output}")
    assert produced_before_last_run < TOTAL + 3 * 2000, "the kills all landed after the work was done"
    worker.start()
    wait_for(settled(raw_redis, source, output), VT + 60, "every id in the output and the input empty",
             worker.ensure_alive)
    assert worker.terminate() == 0

    ids = output_ids(raw_redis, output)
    counts = Counter(ids)
    assert set(counts) == set(range(TOTAL)), f"lost: {sorted(set(range(TOTAL)) - set(counts))[:20]}"
    duplicates = len(ids) - TOTAL
    assert duplicates <= 3 * 2000  # at most what the engine buffers (max_buffered) can be redone per crash
    report(capsys, record_property,
           f"RSMQ crash test: {TOTAL} ids, kills at {[round(m, 2) for m in moments]} of the stream "
           f"(random seed {seed_value}): 0 lost, {duplicates} duplicate(s) "
           f"({sum(1 for c in counts.values() if c > 1)} ids delivered more than once)",
           duplicates=duplicates, random_seed=seed_value)


@pytest.fixture
def restartable_redis(redis_server: Any, tmp_path: Path) -> Iterator[Any]:
    """The session's redis-server (append-only) when we own it; a private one when REDIS_HOST names another."""
    if getattr(redis_server, "supports_restart", False):
        yield redis_server
        return
    from services.redis import RedisServer

    with RedisServer(appendonly=True) as server:
        yield server


def test_redis_restart_mid_stream_loses_nothing(
    restartable_redis: Any, qname: str, worker_processes: list[WorkerProcess], tmp_path: Path,
    capsys: pytest.CaptureFixture[str], record_property: Callable[[str, Any], None],
) -> None:
    server = restartable_redis
    source, output = qname + "-in", qname + "-out"
    seed(server.host, server.port, source, TOTAL)
    client = redis.Redis(host=server.host, port=server.port)
    assert client.config_get("appendonly") == {"appendonly": "yes"}
    worker = rsmq_worker(server.host, server.port, source, output, 0.0003, tmp_path / "worker.log")
    worker_processes.append(worker)
    worker.start()
    wait_for(lambda: client.zcard(f"rsmq:{output}") >= TOTAL // 3, 60, "a third of the stream", worker.ensure_alive)
    server.restart()  # SIGTERM (Redis writes its append-only file), then start again on the same port
    restarted_at = client.zcard(f"rsmq:{output}")
    assert restarted_at < TOTAL, "the restart landed after the work was done"
    wait_for(settled(client, source, output), 90, "every id in the output after the restart", worker.ensure_alive)
    assert worker.terminate() == 0
    ids = output_ids(client, output)
    client.close()
    assert set(ids) == set(range(TOTAL))
    duplicates = len(ids) - TOTAL
    report(capsys, record_property,
           f"RSMQ Redis-restart test: restarted at {restarted_at}/{TOTAL} outputs; 0 lost, {duplicates} duplicate(s)",
           duplicates=duplicates)
