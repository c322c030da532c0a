"""pytest fixtures that hand tests a real Kafka broker and a real Redis server.

Load with ``pytest_plugins = ["services.pytest_plugin"]`` and ``pythonpath = ["tools"]``.

* ``kafka_bootstrap`` (session): ``"host:port"``. Uses ``KAFKA_BROKERS`` when set, otherwise starts a private
  broker the first time a test asks for it and stops it at session end.
* ``redis_server`` (session): an object with ``host``, ``port``, ``url``, ``supports_restart`` and ``restart()``.
  Uses ``REDIS_HOST`` (``host``, ``host:port`` or ``redis://host:port``) when set, otherwise starts a private
  redis-server with an append-only file, so that ``restart()`` keeps the data.

Servers are started lazily so a run that selects no such test pays nothing, but the slow provisioning steps (Maven
fetch, apt install) are done right after collection when a selected test needs them: that keeps them out of the
first test's timeout. A server that cannot be started fails the tests that need it (never skips them), because a
silently skipped integration suite looks green. Under pytest-xdist each worker owns its own servers on its own
ports; provisioning is serialised by file locks.
"""

from __future__ import annotations

import atexit
import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from types import FrameType
from typing import Any, NoReturn, Protocol
from urllib.parse import urlsplit

import pytest

from services._proc import ServiceError
from services.kafka import KafkaBroker, fetch_kafka
from services.processes import WorkerProcess
from services.redis import RedisServer, ensure_redis_server, ping

__all__ = ["ExternalRedis", "RedisHandle", "kafka_bootstrap", "parse_redis_host", "redis_server", "worker_processes"]

DEFAULT_REDIS_PORT = 6379


class _Stoppable(Protocol):
    def stop(self) -> None: ...


class RedisHandle(Protocol):
    """What ``redis_server`` yields, whether the server is ours or an external one."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def url(self) -> str: ...
    @property
    def supports_restart(self) -> bool: ...
    def restart(self) -> object: ...


# Every server this process started, so an abnormal exit (atexit, SIGTERM) still stops them: they run in their
# own process groups and would otherwise outlive the test run.
_owned: list[_Stoppable] = []
_owned_lock = threading.Lock()
_previous_sigterm: Callable[[int, FrameType | None], Any] | int | None = None


def _adopt(service: _Stoppable) -> None:
    with _owned_lock:
        _owned.append(service)


def _release(service: _Stoppable) -> None:
    with _owned_lock, contextlib.suppress(ValueError):
        _owned.remove(service)
    service.stop()


class _Startable(_Stoppable, Protocol):
    def start(self) -> object: ...


def _start(service: _Startable) -> ServiceError | None:
    """Start, or return why not; failing outside the ``except`` keeps the report free of a chained traceback."""
    try:
        service.start()
    except ServiceError as exc:
        _release(service)
        return exc
    return None


def _stop_all() -> None:
    with _owned_lock:
        services = list(reversed(_owned))
        _owned.clear()
    for service in services:
        with contextlib.suppress(Exception):
            service.stop()


atexit.register(_stop_all)


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    _stop_all()
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    os.kill(os.getpid(), signal.SIGTERM)


# --------------------------------------------------------------------------------------------- pytest hooks


def pytest_configure(config: pytest.Config) -> None:
    # Only take over SIGTERM when nobody else handles it: the default would kill pytest without running atexit.
    global _previous_sigterm
    with contextlib.suppress(ValueError):  # not the main thread: leave signals alone
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            _previous_sigterm = signal.signal(signal.SIGTERM, _on_sigterm)


def pytest_unconfigure(config: pytest.Config) -> None:
    _stop_all()
    with contextlib.suppress(ValueError, TypeError):
        if _previous_sigterm is not None and signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, _previous_sigterm)


def pytest_report_header(config: pytest.Config) -> list[str]:
    kafka = os.environ.get("KAFKA_BROKERS") or "private broker, started on demand"
    redis = os.environ.get("REDIS_HOST") or "private redis-server, started on demand"
    return [f"services: kafka={kafka}; redis={redis}"]


def pytest_collection_finish(session: pytest.Session) -> None:
    """Provision ahead of the first test so a cold Maven fetch or apt install is not billed to a test's timeout.

    Failures are swallowed here on purpose: the fixture retries and fails the affected tests with the full message.
    """
    if session.config.option.collectonly:
        return
    wanted = {name for item in session.items for name in getattr(item, "fixturenames", ())}
    if "kafka_bootstrap" in wanted and not os.environ.get("KAFKA_BROKERS"):
        with contextlib.suppress(ServiceError):
            fetch_kafka()
    if "redis_server" in wanted and not os.environ.get("REDIS_HOST"):
        with contextlib.suppress(ServiceError):
            ensure_redis_server()


# ------------------------------------------------------------------------------------------------- Kafka


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """Bootstrap servers of a real broker that supports transactions and consumer groups."""
    external = os.environ.get("KAFKA_BROKERS", "").strip()
    if external:
        yield external
        return
    broker = KafkaBroker()
    _adopt(broker)
    error = _start(broker)
    if error is not None:
        pytest.fail(
            f"could not start a Kafka broker for the tests: {error}\n"
            "(set KAFKA_BROKERS=host:port to use a running broker instead)",
            pytrace=False,
        )
    try:
        yield broker.bootstrap_servers
    finally:
        _release(broker)


# ------------------------------------------------------------------------------------------------- Redis


@dataclass(frozen=True)
class ExternalRedis:
    """A server named by REDIS_HOST: used as is, and never restarted, because it is not ours to stop."""

    host: str
    port: int

    @property
    def url(self) -> str:
        return f"redis://{self.host}:{self.port}/0"

    @property
    def supports_restart(self) -> bool:
        return False

    def restart(self) -> NoReturn:
        pytest.skip(
            f"REDIS_HOST={self.host}:{self.port} is an external server; only a server this test session "
            "started can be restarted (unset REDIS_HOST to run this test)"
        )


def parse_redis_host(value: str, default_port: int | None = None) -> tuple[str, int]:
    """Accept the forms people actually put in REDIS_HOST: ``host``, ``host:port``, ``[::1]:port``, ``redis://…``."""
    port = default_port if default_port is not None else int(os.environ.get("REDIS_PORT") or DEFAULT_REDIS_PORT)
    value = value.strip()
    if "://" in value:
        parts = urlsplit(value)
        return parts.hostname or "127.0.0.1", parts.port or port
    if value.startswith("["):
        host, _, rest = value[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else port
    if value.count(":") == 1:
        host, _, port_text = value.partition(":")
        return host, int(port_text)
    return value, port


def _appendonly() -> bool:
    return os.environ.get("VOLLEY_REDIS_APPENDONLY", "yes").lower() not in {"no", "0", "false", "off"}


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisHandle]:
    """A real Redis; ours (restartable, append-only, same port after restart) unless REDIS_HOST names one."""
    external = os.environ.get("REDIS_HOST", "").strip()
    if external:
        host, port = parse_redis_host(external)
        problem = "answered PING with something other than +PONG"
        try:
            answered = ping(host, port)
        except OSError as exc:
            answered, problem = False, f"does not answer: {exc!r}"
        if not answered:
            pytest.fail(f"REDIS_HOST={external} {problem}", pytrace=False)
        yield ExternalRedis(host, port)
        return
    server = RedisServer(appendonly=_appendonly())
    _adopt(server)
    error = _start(server)
    if error is not None:
        pytest.fail(
            f"could not start redis-server for the tests: {error}\n"
            "(set REDIS_HOST=host[:port] to use a running server instead)",
            pytrace=False,
        )
    try:
        yield server
    finally:
        _release(server)


@pytest.fixture
def worker_processes() -> Iterator[list[WorkerProcess]]:
    """Append every WorkerProcess a test starts: whatever is still running when the test ends is killed."""
    made: list[WorkerProcess] = []
    yield made
    for worker in made:
        worker.cleanup()
