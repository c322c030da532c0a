"""A small HTTP server on a daemon thread: ``/metrics``, ``/healthz`` and ``/readyz``.

One server per (host, port) in a process: several engines that name the same
metrics port share it, and the probes answer for all of them (healthy only if
every one is). Port 0 asks the OS for a free port and is never shared.

In multiprocess mode every response names the run it aggregates in the
``X-Volley-Aggregate`` header (an id derived from ``PROMETHEUS_MULTIPROC_DIR``).
A worker that finds its port taken asks the holder for that header: a sibling
of the same run already serves every worker's metrics, and the worker carries
on without a server; anything else holding the port is a start-up error.
"""

from __future__ import annotations

import errno
import gzip
import hashlib
import http.client
import logging
import math
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import Metric
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

from volley.errors import ConfigurationError
from volley_prometheus.metrics import WITHDRAWABLE

log = logging.getLogger("volley_prometheus")

Clock = Callable[[], float]

AGGREGATE_HEADER = "X-Volley-Aggregate"
"""The response header that names the run whose multiprocess aggregate a server serves."""
PROBE_TIMEOUT = 2.0
"""How long a worker waits for the holder of its metrics port to answer."""
BIND_ATTEMPTS = 20
"""Binds tried while the port's holder refuses connections (it is closing, or has bound and not yet listened)."""
BIND_RETRY_PAUSE = 0.05


def run_id(multiprocess_dir: str) -> str:
    """The id of the run whose workers share ``multiprocess_dir``: the same for every worker, and for no other run."""
    return hashlib.sha256(os.path.realpath(multiprocess_dir).encode()).hexdigest()[:16]


class HealthState:
    """What the probes know about one application. Written on the event loop, read by the server thread.

    Liveness: the loop reported progress (a heartbeat, or its start) within
    ``max_silence`` seconds. Readiness: ``on_ready(True)`` was received and not
    withdrawn since.
    """

    __slots__ = ("app_name", "clock", "last_progress", "max_silence", "ready", "stopped")

    def __init__(self, app_name: str, max_silence: float, clock: Clock = time.monotonic) -> None:
        self.app_name = app_name
        self.max_silence = max_silence
        self.clock = clock
        self.last_progress = clock()
        self.ready = False
        self.stopped = False

    def beat(self) -> None:
        self.last_progress = self.clock()

    def liveness(self) -> tuple[bool, str]:
        if self.stopped:
            return False, f"{self.app_name}: stopped"
        silence = self.clock() - self.last_progress
        if silence > self.max_silence:
            return False, (f"{self.app_name}: no progress for {silence:.1f}s "
                           f"(limit {self.max_silence:g}s)")
        return True, f"{self.app_name}: ok ({silence:.1f}s since last progress)"

    def readiness(self) -> tuple[bool, str]:
        if self.ready and not self.stopped:
            return True, f"{self.app_name}: ready"
        return False, f"{self.app_name}: not ready"


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    volley: MetricsServer


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    server_version = "volley-prometheus"
    protocol_version = "HTTP/1.0"
    timeout = 10.0  # a client that connects and says nothing does not keep its thread forever

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        volley = self.server.volley
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        headers: list[tuple[str, str]] = []
        if path == "/metrics":
            encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
            body = encoder(volley.collector())
            if gzip_accepted(self.headers.get("Accept-Encoding", "")):
                body = gzip.compress(body)
                headers.append(("Content-Encoding", "gzip"))
            status = 200
        elif path in ("/healthz", "/livez"):
            ok, text = volley.check(HealthState.liveness)
            status, body, content_type = (200 if ok else 503), text.encode(), "text/plain; charset=utf-8"
        elif path == "/readyz":
            ok, text = volley.check(HealthState.readiness)
            status, body, content_type = (200 if ok else 503), text.encode(), "text/plain; charset=utf-8"
        elif path == "/":
            status, content_type = 200, "text/plain; charset=utf-8"
            body = b"volley: /metrics /healthz /readyz\n"
        else:
            status, body, content_type = 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        if volley.run is not None:
            self.send_header(AGGREGATE_HEADER, volley.run)
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class WithoutWithdrawn:
    """The multiprocess aggregate without the series withdrawn by a NaN (see ``metrics.WITHDRAWN``)."""

    def __init__(self, collector: Collector) -> None:
        self._collector = collector

    def collect(self) -> Iterable[Metric]:
        for metric in self._collector.collect():
            if metric.name in WITHDRAWABLE:
                metric.samples = [s for s in metric.samples if not math.isnan(s.value)]
            yield metric


class MetricsServer:
    """Serves one registry (or the multiprocess aggregate) and the health of the apps attached to it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, multiprocess_dir: str | None) -> None:
        self.host = host
        self.requested_port = port
        self._states: list[HealthState] = []
        self._lock = threading.Lock()
        self.run = run_id(multiprocess_dir) if multiprocess_dir is not None else None
        if multiprocess_dir is not None:
            aggregate = CollectorRegistry()
            merged = MultiProcessCollector(None, path=multiprocess_dir)  # type: ignore[no-untyped-call]
            aggregate.register(WithoutWithdrawn(merged))
            self._collector: Collector = aggregate
        else:
            self._collector = registry
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------ life cycle

    def start(self) -> None:
        """Bind now (so that a taken port fails at start-up) and serve on a daemon thread."""
        server_class: type[_Server] = _Server
        if ":" in self.host:
            server_class = type("_Server6", (_Server,), {"address_family": socket.AF_INET6})
        httpd = server_class((self.host, self.requested_port), _Handler)
        httpd.volley = self
        self._httpd = httpd
        self._wake_read, self._wake_write = socket.socketpair()
        self._thread = threading.Thread(target=self._serve, args=(httpd, self._wake_read),
                                        name=f"volley-metrics-{self.port}", daemon=True)
        self._thread.start()
        log.info("serving /metrics, /healthz and /readyz on %s:%d", self.host, self.port)

    @staticmethod
    def _serve(httpd: _Server, wake: socket.socket) -> None:
        # Not serve_forever: its shutdown() waits for a poll interval, and engines stop often in test suites.
        # This loop sleeps until a connection or the wake-up socket is readable, so stop() returns at once.
        with selectors.DefaultSelector() as selector:
            selector.register(httpd, selectors.EVENT_READ)
            selector.register(wake, selectors.EVENT_READ)
            while True:
                for key, _ in selector.select():
                    if key.fileobj is wake:
                        return
                    httpd.handle_request()  # readable: accepts without blocking, handles on its own thread

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        self._wake_write.send(b"x")
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None
        httpd.server_close()
        self._wake_read.close()
        self._wake_write.close()

    @property
    def port(self) -> int:
        """The bound port (the OS's choice when 0 was asked for)."""
        if self._httpd is None:
            return self.requested_port
        return int(self._httpd.server_address[1])

    @property
    def running(self) -> bool:
        return self._httpd is not None

    # ------------------------------------------------------------ apps

    def attach(self, state: HealthState) -> None:
        with self._lock:
            self._states = [*self._states, state]

    def detach(self, state: HealthState) -> int:
        """Forget an app; returns how many remain."""
        with self._lock:
            self._states = [s for s in self._states if s is not state]
            return len(self._states)

    def states(self) -> Iterable[HealthState]:
        return self._states

    def collector(self) -> Collector:
        return self._collector

    def check(self, probe: Callable[[HealthState], tuple[bool, str]]) -> tuple[bool, str]:
        results = [probe(state) for state in self._states]
        if not results:
            return False, "no application attached\n"
        ok = all(r[0] for r in results)
        return ok, ("ok\n" if ok else "fail\n") + "".join(r[1] + "\n" for r in results)


_servers: dict[tuple[str, int, int], MetricsServer] = {}
_servers_lock = threading.Lock()


def acquire_server(host: str, port: int, registry: CollectorRegistry, multiprocess_dir: str | None,
                   state: HealthState) -> MetricsServer:
    """The running server for (host, port), started if need be, with ``state`` attached to it."""
    key = (host, port, id(registry))
    with _servers_lock:
        server = _servers.get(key) if port != 0 else None
        if server is None:
            server = MetricsServer(host, port, registry, multiprocess_dir)
            server.start()
            if port != 0:
                _servers[key] = server
        server.attach(state)
        return server


def acquire_or_defer(host: str, port: int, registry: CollectorRegistry, multiprocess_dir: str | None,
                     state: HealthState) -> MetricsServer | None:
    """:func:`acquire_server`, or None when a sibling worker of the same run already serves ``port``.

    Any other failure to bind is a ``ConfigurationError`` that says what to change: a port held by an
    unrelated process (or by another run), no permission, an address that is not this machine's.
    """
    attempts = BIND_ATTEMPTS
    while True:
        try:
            return acquire_server(host, port, registry, multiprocess_dir, state)
        except OSError as exc:
            if multiprocess_dir is None or exc.errno != errno.EADDRINUSE:
                raise ConfigurationError(bind_advice(host, port, exc, multiprocess_dir)) from exc
            owner = probe_run(host, port)
            if owner is not None and owner == run_id(multiprocess_dir):
                log.info("metrics port %s:%d is served by another worker of this run (the aggregate of every "
                         "worker); this process does not serve it", host, port)
                return None
            attempts -= 1
            if owner is not None or attempts <= 0:
                raise ConfigurationError(bind_advice(host, port, exc, multiprocess_dir, owner)) from exc
            # Nothing accepts connections there: the holder is closing, or has bound and not listened yet.
            time.sleep(BIND_RETRY_PAUSE)


def probe_run(host: str, port: int) -> str | None:
    """What the server holding ``host:port`` names in ``X-Volley-Aggregate``: the run id, ``""`` when it
    answers without one (or not as HTTP), None when nothing accepts connections there."""
    connect_to = {"0.0.0.0": "127.0.0.1", "::": "::1", "": "127.0.0.1"}.get(host, host)
    connection = http.client.HTTPConnection(connect_to, port, timeout=PROBE_TIMEOUT)
    try:
        connection.request("HEAD", "/")
        return connection.getresponse().getheader(AGGREGATE_HEADER) or ""
    except ConnectionRefusedError:
        return None
    except (OSError, http.client.HTTPException):
        return ""
    finally:
        connection.close()


def bind_advice(host: str, port: int, exc: OSError, multiprocess_dir: str | None, owner: str | None = None) -> str:
    """Why the metrics server cannot bind, and what to change."""
    where = f"cannot serve metrics on {host}:{port}"
    off = "or metrics_port=None to turn the endpoint off"
    if isinstance(exc, socket.gaierror):
        return (f"{where}: metrics_host {host!r} does not resolve ({exc}); set metrics_host to an address of this "
                f"machine (\"0.0.0.0\" for every interface), {off}")
    if exc.errno == errno.EADDRINUSE:
        if multiprocess_dir is None:
            holder = "another process"
        elif owner:
            holder = "the metrics server of another run (PROMETHEUS_MULTIPROC_DIR differs), not a worker of this run"
        elif owner is None:
            holder = "a socket that accepts no connections, not a worker of this run"
        else:
            holder = "a process that is not a worker of this run (it does not serve this run's aggregate)"
        return (f"{where}: the port is taken by {holder} ({exc}). Choose a free metrics_port, stop what holds "
                f"the port, {off}")
    if exc.errno == errno.EACCES:
        return (f"{where}: permission denied ({exc}); ports below 1024 need privileges: choose a metrics_port "
                f"of 1024 or above, {off}")
    if exc.errno == errno.EADDRNOTAVAIL:
        return (f"{where}: {host} is not an address of this machine ({exc}); set metrics_host to one of its "
                f"addresses (\"0.0.0.0\" for every interface), {off}")
    return f"{where}: {exc}. Choose a free metrics_port or another metrics_host, {off}"


def release_server(server: MetricsServer, state: HealthState) -> None:
    """Detach ``state``; stop the server once no application uses it."""
    with _servers_lock:
        if server.detach(state) > 0:
            return
        for key, value in list(_servers.items()):
            if value is server:
                del _servers[key]
    server.stop()
