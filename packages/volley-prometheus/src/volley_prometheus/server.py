"""A small HTTP server on a daemon thread: ``/metrics``, ``/healthz`` and ``/readyz``.

One server per (host, port) in a process: several engines that name the same
metrics port share it, and the probes answer for all of them (healthy only if
every one is). Port 0 asks the OS for a free port and is never shared.
"""

from __future__ import annotations

import gzip
import logging
import selectors
import socket
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.multiprocess import MultiProcessCollector
from prometheus_client.registry import Collector

log = logging.getLogger("volley_prometheus")

Clock = Callable[[], float]


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
        for name, value in headers:
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), format % args)


class MetricsServer:
    """Serves one registry (or the multiprocess aggregate) and the health of the apps attached to it."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, multiprocess_dir: str | None) -> None:
        self.host = host
        self.requested_port = port
        self._states: list[HealthState] = []
        self._lock = threading.Lock()
        if multiprocess_dir is not None:
            aggregate = CollectorRegistry()
            MultiProcessCollector(aggregate, path=multiprocess_dir)  # type: ignore[no-untyped-call]
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


def release_server(server: MetricsServer, state: HealthState) -> None:
    """Detach ``state``; stop the server once no application uses it."""
    with _servers_lock:
        if server.detach(state) > 0:
            return
        for key, value in list(_servers.items()):
            if value is server:
                del _servers[key]
    server.stop()
