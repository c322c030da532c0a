"""The Prometheus observer: turns the engine's events into metrics and health.

The engine calls these methods on its event loop, mostly once per batch, so
each one is a dictionary look-up of a pre-bound labelled child and one or two
increments: label values are resolved (``.labels(...)``) once per distinct
value and cached, never per call.
"""

from __future__ import annotations

import glob
import logging
import os
import time
from collections.abc import Callable, Mapping
from typing import Any

from prometheus_client import Gauge, Summary
from prometheus_client.multiprocess import mark_process_dead

from volley.errors import ConfigurationError
from volley.ports import PartitionId
from volley_prometheus.metrics import WITHDRAWN, VolleyMetrics, default_metrics, multiprocess_dir
from volley_prometheus.server import Clock, HealthState, MetricsServer, acquire_or_defer, release_server

log = logging.getLogger("volley_prometheus")

DEFAULT_HOST = "0.0.0.0"
DEFAULT_MAX_SILENCE = 30.0
MAX_REASONS = 50
"""Distinct dead-letter reasons kept per app; further ones are counted as "other" to bound cardinality."""

ObserveTotal = Callable[[float, int], None]


def forget_dead_workers(directory: str) -> list[int]:
    """Remove the live gauges (in flight, ready, lag) that dead worker processes left in the multiprocess directory.

    A worker killed by ``kill -9`` or the OOM killer never says goodbye: its ``live*`` gauge files would count
    forever in the aggregate (``volley_ready`` 2 with one worker left). Called when a worker of ``volley run
    --workers N`` starts, which is also when the supervisor restarts one that died; counters and summaries of
    dead workers stay, as they should. Returns the process ids cleaned up.
    """
    dead: set[int] = set()
    for path in glob.glob(os.path.join(glob.escape(directory), "gauge_live*_*.db")):
        pid_text = os.path.basename(path)[: -len(".db")].rsplit("_", 1)[-1]
        if pid_text.isdigit() and int(pid_text) != os.getpid() and not _alive(int(pid_text)):
            dead.add(int(pid_text))
    for pid in sorted(dead):
        try:
            mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]
        except OSError:  # a sibling worker restarting at the same moment removed them first
            continue
        log.info("removed the live gauges of worker process %d, which is gone", pid)
    return sorted(dead)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def observe_total(child: Summary) -> ObserveTotal:
    """A function recording ``count`` observations that took ``seconds`` together on a summary child."""
    count_inc, sum_inc = _value_incs(child)
    if count_inc is None or sum_inc is None:
        observe = child.observe

        def each(seconds: float, count: int) -> None:
            if count > 0:
                share = seconds / count
                for _ in range(count):
                    observe(share)

        return each

    def batch(seconds: float, count: int) -> None:
        if count > 0:
            count_inc(count)
            sum_inc(seconds)

    return batch


def _value_incs(child: Summary) -> tuple[Callable[[float], None] | None, Callable[[float], None] | None]:
    count: Any = getattr(child, "_count", None)
    total: Any = getattr(child, "_sum", None)
    count_inc = getattr(count, "inc", None)
    sum_inc = getattr(total, "inc", None)
    if callable(count_inc) and callable(sum_inc):
        return count_inc, sum_inc
    return None, None


class _App:
    """The children of one application, bound lazily per label value and then reused."""

    __slots__ = ("commit", "consumed", "delivery", "depth", "dlq", "in_flight", "lag", "m", "name", "process",
                 "produced", "ready", "retries")

    def __init__(self, m: VolleyMetrics, name: str) -> None:
        self.m = m
        self.name = name
        self.consumed: dict[str, Callable[[float], None]] = {}
        self.produced: dict[tuple[str, str], Callable[[float], None]] = {}
        self.delivery: dict[str, Callable[[float], None]] = {}
        self.process: dict[str, ObserveTotal] = {}
        self.dlq: dict[str, Callable[[float], None]] = {}
        self.lag: dict[PartitionId, Gauge] = {}
        self.depth: dict[str, Gauge] = {}
        self.in_flight = m.in_flight.labels(name).set
        self.retries = m.retries.labels(name).inc
        self.ready = m.ready.labels(name).set
        self.commit: Callable[[float], None] | None = None  # bound on first use: only Kafka commits

    def bind_consumed(self, status: str) -> Callable[[float], None]:
        inc = self.consumed[status] = self.m.consumed.labels(self.name, status).inc
        return inc

    def bind_produced(self, source: str, destination: str) -> Callable[[float], None]:
        inc = self.produced[source, destination] = self.m.produced.labels(self.name, source, destination).inc
        return inc

    def bind_delivery(self, status: str) -> Callable[[float], None]:
        inc = self.delivery[status] = self.m.delivery_reports.labels(self.name, status).inc
        return inc

    def bind_process(self, process_name: str) -> ObserveTotal:
        fn = self.process[process_name] = observe_total(self.m.process_time.labels(self.name, process_name))
        return fn

    def bind_dlq(self, reason: str) -> Callable[[float], None]:
        label = reason if len(self.dlq) < MAX_REASONS else "other"
        inc = self.dlq[reason] = self.m.dead_letters.labels(self.name, label).inc
        return inc


class PrometheusObserver:
    """Volley's ``Observer`` for Prometheus, plus the HTTP server for ``/metrics``, ``/healthz``, ``/readyz``.

    ``metrics_port=None`` records metrics without serving them (another
    exporter may serve the registry). ``port`` tells the bound port once
    started, which is how ``metrics_port=0`` (any free port) is useful.
    """

    def __init__(
        self,
        app_name: str,
        metrics_port: int | None = None,
        *,
        host: str = DEFAULT_HOST,
        max_silence: float = DEFAULT_MAX_SILENCE,
        metrics: VolleyMetrics | None = None,
        clock: Clock = time.monotonic,
    ) -> None:
        if metrics_port is not None and not (isinstance(metrics_port, int) and 0 <= metrics_port <= 65535):
            raise ConfigurationError(f"metrics_port must be an int from 0 to 65535 or None, got {metrics_port!r}")
        if not max_silence > 0:  # also NaN, which would make /healthz never fail
            raise ConfigurationError(f"health_max_silence_seconds must be positive, got {max_silence!r}")
        self._multiprocess = multiprocess_dir()
        if self._multiprocess is not None and not os.path.isdir(self._multiprocess):
            # prometheus-client would fail on the first metric with a bare FileNotFoundError.
            raise ConfigurationError(
                f"PROMETHEUS_MULTIPROC_DIR={self._multiprocess!r} is not a directory: create it (empty) before "
                "starting the workers, or unset the variable for single-process metrics"
            )
        if self._multiprocess is not None and os.environ.get("VOLLEY_WORKER_INDEX"):
            forget_dead_workers(self._multiprocess)
        self.app_name = app_name
        self.metrics_port = metrics_port
        self.host = host
        self.metrics = metrics if metrics is not None else default_metrics()
        self.health = HealthState(app_name, max_silence, clock)
        self._apps: dict[str, _App] = {}
        self._data_model: dict[str, ObserveTotal] = {}
        self._heartbeat = self.metrics.heartbeats.inc
        self._server: MetricsServer | None = None
        self._app(app_name)

    @classmethod
    def from_settings(cls, app_name: str, metrics_port: int | None, settings: Mapping[str, Any]) -> PrometheusObserver:
        """The plugin factory: ``settings`` may hold ``metrics_host`` and ``health_max_silence_seconds``."""
        host = settings.get("metrics_host", DEFAULT_HOST)
        if not isinstance(host, str) or not host:
            raise ConfigurationError(f"metrics_host must be a host name or address, got {host!r}")
        silence = settings.get("health_max_silence_seconds", DEFAULT_MAX_SILENCE)
        if isinstance(silence, bool) or not isinstance(silence, int | float):
            raise ConfigurationError(f"health_max_silence_seconds must be a number of seconds, got {silence!r}")
        metrics = settings.get("prometheus_metrics")
        if metrics is not None and not isinstance(metrics, VolleyMetrics):
            raise ConfigurationError("prometheus_metrics must be a volley_prometheus.VolleyMetrics")
        clock = settings.get("clock", time.monotonic)
        return cls(app_name, metrics_port, host=host, max_silence=float(silence), metrics=metrics, clock=clock)

    # ------------------------------------------------------------------ helpers

    def _app(self, app_name: str) -> _App:
        app = self._apps.get(app_name)
        if app is None:
            app = self._apps[app_name] = _App(self.metrics, app_name)
        return app

    @property
    def port(self) -> int | None:
        """The port being served, or None when not serving."""
        return self._server.port if self._server is not None else None

    # ------------------------------------------------------------------ life cycle

    def on_start(self, app_name: str) -> None:
        app = self._app(app_name)
        app.ready(0)
        app.in_flight(0)
        self.health.stopped = False
        self.health.ready = False
        self.health.beat()
        if self.metrics_port is None or self._server is not None:
            return
        # None when a sibling worker of this run serves the port (multiprocess mode); any other bind failure
        # is a ConfigurationError saying what to change, which stops the app at start-up.
        self._server = acquire_or_defer(self.host, self.metrics_port, self.metrics.registry, self._multiprocess,
                                        self.health)

    def on_stop(self, app_name: str) -> None:
        app = self._app(app_name)
        app.ready(0)
        app.in_flight(0)
        for key, gauge in list(app.lag.items()):  # a stopped consumer owns no partition
            del app.lag[key]
            self._withdraw_lag(app_name, key, gauge)
        self.health.ready = False
        self.health.stopped = True
        server, self._server = self._server, None
        if server is not None:
            release_server(server, self.health)

    def on_heartbeat(self, app_name: str) -> None:
        self._heartbeat()
        self.health.beat()

    def on_ready(self, app_name: str, ready: bool) -> None:
        self._app(app_name).ready(1 if ready else 0)
        self.health.ready = ready

    # ------------------------------------------------------------------ per batch

    def on_consumed(self, app_name: str, status: str, count: int) -> None:
        app = self._apps.get(app_name) or self._app(app_name)
        inc = app.consumed.get(status) or app.bind_consumed(status)
        inc(count)

    def on_produced(self, app_name: str, source: str, destination: str, count: int) -> None:
        app = self._apps.get(app_name) or self._app(app_name)
        inc = app.produced.get((source, destination)) or app.bind_produced(source, destination)
        inc(count)

    def on_delivery(self, app_name: str, status: str, count: int) -> None:
        app = self._apps.get(app_name) or self._app(app_name)
        inc = app.delivery.get(status) or app.bind_delivery(status)
        inc(count)

    def on_process_time(self, app_name: str, process_name: str, seconds: float, count: int) -> None:
        """``seconds`` is the time ``count`` messages took together; each counts as one observation."""
        app = self._apps.get(app_name) or self._app(app_name)
        observe = app.process.get(process_name) or app.bind_process(process_name)
        observe(seconds, count)

    def on_data_model_time(self, process: str, seconds: float, count: int) -> None:
        """``seconds`` is the time ``count`` messages took together; each counts as one observation."""
        observe = self._data_model.get(process)
        if observe is None:
            observe = self._data_model[process] = observe_total(self.metrics.data_model_time.labels(process))
        observe(seconds, count)

    def on_dead_letter(self, app_name: str, reason: str, count: int) -> None:
        app = self._apps.get(app_name) or self._app(app_name)
        inc = app.dlq.get(reason) or app.bind_dlq(reason)
        inc(count)

    def on_dead_letters_replayed(self, app_name: str, source_queue: str, count: int) -> None:
        """``volley dlq replay`` (volley.ports.DeadLetterObserver): rare, so no child cache."""
        self.metrics.replayed.labels(app_name, source_queue).inc(count)

    def on_dead_letters_purged(self, app_name: str, source_queue: str, count: int) -> None:
        self.metrics.purged.labels(app_name, source_queue).inc(count)

    def on_retry(self, app_name: str, count: int) -> None:
        (self._apps.get(app_name) or self._app(app_name)).retries(count)

    def on_in_flight(self, app_name: str, count: int) -> None:
        (self._apps.get(app_name) or self._app(app_name)).in_flight(count)

    # ------------------------------------------------------------------ connector reports

    def on_lag(self, app_name: str, lag: Mapping[PartitionId, int]) -> None:
        """The lag of every partition the consumer owns now; partitions no longer in it are withdrawn."""
        app = self._app(app_name)
        gauges = app.lag
        for key, value in lag.items():
            gauge = gauges.get(key)
            if gauge is None:
                gauge = gauges[key] = self.metrics.lag.labels(app_name, key[0], str(key[1]))
            gauge.set(value)
        for key in [k for k in gauges if k not in lag]:
            self._withdraw_lag(app_name, key, gauges.pop(key))

    def _withdraw_lag(self, app_name: str, key: PartitionId, gauge: Gauge) -> None:
        """A partition this worker no longer owns has no lag series here: a 0 would read as "caught up".

        Single-process: the labelled child is removed. Multiprocess: prometheus-client cannot remove a label
        set there (it only warns), so the partition's value becomes NaN, its withdrawal mark: the aggregate this
        package serves leaves such series out, and a worker that owns the partition reports it again (the most
        recent report wins).
        """
        if self._multiprocess is not None:
            gauge.set(WITHDRAWN)
        else:
            self.metrics.lag.remove(app_name, key[0], str(key[1]))

    def on_commit(self, app_name: str, seconds: float) -> None:
        app = self._app(app_name)
        if app.commit is None:
            app.commit = self.metrics.commit_time.labels(app_name).observe
        app.commit(seconds)

    def on_depth(self, app_name: str, queue: str, depth: int) -> None:
        app = self._app(app_name)
        gauge = app.depth.get(queue)
        if gauge is None:
            gauge = app.depth[queue] = self.metrics.depth.labels(app_name, queue)
        gauge.set(depth)
