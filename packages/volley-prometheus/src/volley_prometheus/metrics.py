"""The metric families Volley exports, created once per registry.

py-volley's names, types and labels are kept as they were so that existing
dashboards and alerts keep working; everything Volley adds is prefixed
``volley_``. A counter named ``x`` is exposed as ``x_total`` (prometheus-client
adds the suffix), a summary as ``x_count`` and ``x_sum``, a histogram as
``x_bucket``, ``x_count`` and ``x_sum``.

Gauges carry a multiprocess mode for ``PROMETHEUS_MULTIPROC_DIR`` setups:
in-flight messages and readiness add up over the live worker processes, lag
and queue depth take the most recent report (every worker of an RSMQ queue
sees the same depth, and a Kafka partition moves between workers on
rebalance, so summing would count twice). A partition's lag is withdrawn when
the worker no longer owns it: its series is removed, or in multiprocess mode
marked NaN, which the aggregate served by this package leaves out.
"""

from __future__ import annotations

import os
import threading
from dataclasses import dataclass
from typing import Final

from prometheus_client import REGISTRY, CollectorRegistry, Counter, Gauge, Histogram, Summary

MULTIPROC_ENV: Final = "PROMETHEUS_MULTIPROC_DIR"

WITHDRAWN: Final = float("nan")
"""In multiprocess mode, the value that withdraws a gauge's series (prometheus-client cannot remove labels there)."""
WITHDRAWABLE: Final = frozenset({"volley_consumer_lag"})
"""Gauges whose NaN samples the multiprocess aggregate leaves out: their series was withdrawn."""

COMMIT_BUCKETS: Final = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, float("inf"))


def multiprocess_dir() -> str | None:
    """The multiprocess directory if multiprocess mode is on (prometheus-client's own switch), else None."""
    return os.environ.get(MULTIPROC_ENV) or os.environ.get(MULTIPROC_ENV.lower()) or None


@dataclass(frozen=True)
class MetricSpec:
    """One exported family: what the README's table and the dashboard test are made from."""

    name: str
    kind: str  # counter | gauge | summary | histogram
    labels: tuple[str, ...]
    help: str


SPECS: Final[tuple[MetricSpec, ...]] = (
    # py-volley's families, unchanged.
    MetricSpec("messages_consumed_count", "counter", ("volley_app", "status"),
               "Messages consumed from the input queue, by outcome (success or fail)"),
    MetricSpec("messages_produced_count", "counter", ("volley_app", "source", "destination"),
               "Messages produced to an output queue, by input queue and output queue"),
    MetricSpec("process_time_seconds", "summary", ("volley_app", "process_name"),
               "Time spent running a process: component (the handler) or cycle (one message end to end)"),
    MetricSpec("data_model_process_seconds", "summary", ("process",),
               "Time spent per message turning bytes into a data model and back, by step"),
    MetricSpec("heartbeats", "counter", (), "Application liveliness: about one per second while the loop runs"),
    # py-volley's Kafka delivery_report_status{status}, for every producer, with volley_app added (queries by
    # status alone keep working).
    MetricSpec("delivery_report_status", "counter", ("volley_app", "status"),
               "Delivery reports from the producers, by status: success (the broker confirmed the record, output or "
               "dead letter) or fail (each failed attempt, also one produced again later)"),
    # Volley's additions.
    MetricSpec("volley_messages_in_flight", "gauge", ("volley_app",),
               "Messages consumed and not yet settled (acked, nacked or dead-lettered)"),
    MetricSpec("volley_dead_letter_count", "counter", ("volley_app", "reason"),
               "Messages sent to the dead-letter queue, by reason"),
    MetricSpec("volley_handler_retry_count", "counter", ("volley_app",),
               "Handler calls retried after an exception"),
    MetricSpec("volley_ready", "gauge", ("volley_app",),
               "1 while the worker is connected and consuming (summed over worker processes)"),
    MetricSpec("volley_consumer_lag", "gauge", ("volley_app", "topic", "partition"),
               "Messages between the consumer's position and the end of the partition"),
    MetricSpec("volley_commit_seconds", "histogram", ("volley_app",),
               "Time taken by one offset commit"),
    MetricSpec("volley_queue_depth", "gauge", ("volley_app", "queue"),
               "Messages waiting in the input queue"),
    MetricSpec("volley_dead_letters_replayed", "counter", ("volley_app", "source_queue"),
               "Dead letters sent back by volley dlq replay (confirmed), by the queue they came from"),
    MetricSpec("volley_dead_letters_purged", "counter", ("volley_app", "source_queue"),
               "Dead letters deleted by volley dlq purge, by the queue they came from"),
)


class VolleyMetrics:
    """Every Volley metric family, registered in one registry.

    Families are process-wide (a name can be registered once per registry),
    while observers are per application and bind labelled children of them.
    Use :func:`default_metrics` for the global registry; tests pass their own
    ``CollectorRegistry``.
    """

    def __init__(self, registry: CollectorRegistry = REGISTRY) -> None:
        self.registry = registry
        r = registry
        self.consumed = Counter("messages_consumed_count", _help("messages_consumed_count"),
                                ["volley_app", "status"], registry=r)
        self.produced = Counter("messages_produced_count", _help("messages_produced_count"),
                                ["volley_app", "source", "destination"], registry=r)
        self.process_time = Summary("process_time_seconds", _help("process_time_seconds"),
                                    ["volley_app", "process_name"], registry=r)
        self.data_model_time = Summary("data_model_process_seconds", _help("data_model_process_seconds"),
                                       ["process"], registry=r)
        self.heartbeats = Counter("heartbeats", _help("heartbeats"), registry=r)
        self.delivery_reports = Counter("delivery_report_status", _help("delivery_report_status"),
                                        ["volley_app", "status"], registry=r)
        self.in_flight = Gauge("volley_messages_in_flight", _help("volley_messages_in_flight"),
                               ["volley_app"], registry=r, multiprocess_mode="livesum")
        self.dead_letters = Counter("volley_dead_letter_count", _help("volley_dead_letter_count"),
                                    ["volley_app", "reason"], registry=r)
        self.retries = Counter("volley_handler_retry_count", _help("volley_handler_retry_count"),
                               ["volley_app"], registry=r)
        self.ready = Gauge("volley_ready", _help("volley_ready"), ["volley_app"], registry=r,
                           multiprocess_mode="livesum")
        self.lag = Gauge("volley_consumer_lag", _help("volley_consumer_lag"),
                         ["volley_app", "topic", "partition"], registry=r, multiprocess_mode="livemostrecent")
        self.commit_time = Histogram("volley_commit_seconds", _help("volley_commit_seconds"), ["volley_app"],
                                     registry=r, buckets=COMMIT_BUCKETS)
        self.depth = Gauge("volley_queue_depth", _help("volley_queue_depth"), ["volley_app", "queue"],
                           registry=r, multiprocess_mode="livemostrecent")
        self.replayed = Counter("volley_dead_letters_replayed", _help("volley_dead_letters_replayed"),
                                ["volley_app", "source_queue"], registry=r)
        self.purged = Counter("volley_dead_letters_purged", _help("volley_dead_letters_purged"),
                              ["volley_app", "source_queue"], registry=r)


def _help(name: str) -> str:
    for spec in SPECS:
        if spec.name == name:
            return spec.help
    raise KeyError(name)  # pragma: no cover - SPECS and VolleyMetrics are kept together


_lock = threading.Lock()
_default: VolleyMetrics | None = None


def default_metrics() -> VolleyMetrics:
    """The families in prometheus-client's global registry, created on first use."""
    global _default
    with _lock:
        if _default is None:
            _default = VolleyMetrics(REGISTRY)
        return _default
