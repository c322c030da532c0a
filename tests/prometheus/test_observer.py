"""The observer turns engine events into py-volley's metrics plus Volley's additions, with the right labels."""

from __future__ import annotations

import pytest
from prometheus_client import CollectorRegistry, Summary

from volley.errors import ConfigurationError
from volley.plugins import build_registry
from volley.ports import Observer
from volley_prometheus import SPECS, PrometheusObserver, VolleyMetrics
from volley_prometheus.observer import MAX_REASONS, observe_total


def value(metrics: VolleyMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, labels)


def test_is_an_observer_registered_through_the_plugin_hook(metrics: VolleyMetrics) -> None:
    registry = build_registry()
    registration = registry.entries["observer"]["prometheus"]
    assert registration.distribution == "volley-prometheus"
    observer = registry.get("observer", "prometheus")("app", None, {"prometheus_metrics": metrics})
    assert isinstance(observer, Observer)
    assert isinstance(observer, PrometheusObserver)
    assert observer.port is None


def test_py_volley_metrics_keep_their_names_and_labels(metrics: VolleyMetrics) -> None:
    obs = PrometheusObserver("orders", metrics=metrics)
    obs.on_start("orders")
    obs.on_consumed("orders", "success", 5)
    obs.on_consumed("orders", "success", 2)
    obs.on_consumed("orders", "fail", 1)
    obs.on_produced("orders", "input-topic", "output-topic", 4)
    obs.on_process_time("orders", "component", 1.0, 3)
    obs.on_process_time("orders", "cycle", 3.0, 2)
    obs.on_data_model_time("deserialize", 0.3, 3)
    obs.on_heartbeat("orders")
    obs.on_heartbeat("orders")

    assert value(metrics, "messages_consumed_count_total", volley_app="orders", status="success") == 7
    assert value(metrics, "messages_consumed_count_total", volley_app="orders", status="fail") == 1
    assert value(metrics, "messages_produced_count_total", volley_app="orders", source="input-topic",
                 destination="output-topic") == 4
    assert value(metrics, "process_time_seconds_count", volley_app="orders", process_name="component") == 3
    assert value(metrics, "process_time_seconds_sum", volley_app="orders", process_name="component") == 1.0
    assert value(metrics, "process_time_seconds_count", volley_app="orders", process_name="cycle") == 2
    assert value(metrics, "process_time_seconds_sum", volley_app="orders", process_name="cycle") == 3.0
    assert value(metrics, "data_model_process_seconds_count", process="deserialize") == 3
    assert value(metrics, "data_model_process_seconds_sum", process="deserialize") == pytest.approx(0.3)
    assert value(metrics, "heartbeats_total") == 2


def test_types_match_py_volley(metrics: VolleyMetrics) -> None:
    types = {family.name: family.type for family in metrics.registry.collect()}
    # prometheus-client strips a counter's _total from the family name; py-volley's names have none.
    assert types["messages_consumed_count"] == "counter"
    assert types["messages_produced_count"] == "counter"
    assert types["process_time_seconds"] == "summary"
    assert types["data_model_process_seconds"] == "summary"
    assert types["heartbeats"] == "counter"
    assert types["delivery_report_status"] == "counter"
    assert {spec.name: spec.kind for spec in SPECS} == {name: types[name] for name in types}


def test_delivery_reports_are_counted_by_status_as_py_volley_did_with_the_app_added(metrics: VolleyMetrics) -> None:
    obs = PrometheusObserver("orders", metrics=metrics)
    obs.on_start("orders")
    obs.on_delivery("orders", "success", 5)
    obs.on_delivery("orders", "fail", 1)
    obs.on_delivery("orders", "success", 2)
    obs.on_delivery("refunds", "fail", 3)  # another app of the process: labelled apart

    assert value(metrics, "delivery_report_status_total", volley_app="orders", status="success") == 7
    assert value(metrics, "delivery_report_status_total", volley_app="orders", status="fail") == 1
    assert value(metrics, "delivery_report_status_total", volley_app="refunds", status="fail") == 3
    [family] = [f for f in metrics.registry.collect() if f.name == "delivery_report_status"]
    assert family.type == "counter"
    assert {frozenset(s.labels) for s in family.samples} == {frozenset({"volley_app", "status"})}
    [spec] = [spec for spec in SPECS if spec.name == "delivery_report_status"]
    assert spec.labels == ("volley_app", "status")


def test_volley_additions(metrics: VolleyMetrics) -> None:
    obs = PrometheusObserver("orders", metrics=metrics)
    obs.on_start("orders")
    obs.on_in_flight("orders", 12)
    obs.on_dead_letter("orders", "deserialize", 2)
    obs.on_dead_letter("orders", "handler", 1)
    obs.on_retry("orders", 3)
    obs.on_ready("orders", True)
    obs.on_lag("orders", {("topic.in", 0): 10, ("topic.in", 1): 0})
    obs.on_commit("orders", 0.004)
    obs.on_commit("orders", 0.2)
    obs.on_depth("orders", "jobs", 42)

    assert value(metrics, "volley_messages_in_flight", volley_app="orders") == 12
    assert value(metrics, "volley_dead_letter_count_total", volley_app="orders", reason="deserialize") == 2
    assert value(metrics, "volley_dead_letter_count_total", volley_app="orders", reason="handler") == 1
    assert value(metrics, "volley_handler_retry_count_total", volley_app="orders") == 3
    assert value(metrics, "volley_ready", volley_app="orders") == 1
    assert value(metrics, "volley_consumer_lag", volley_app="orders", topic="topic.in", partition="0") == 10
    assert value(metrics, "volley_consumer_lag", volley_app="orders", topic="topic.in", partition="1") == 0
    assert value(metrics, "volley_commit_seconds_count", volley_app="orders") == 2
    assert value(metrics, "volley_commit_seconds_bucket", volley_app="orders", le="0.005") == 1
    assert value(metrics, "volley_commit_seconds_bucket", volley_app="orders", le="0.25") == 2
    assert value(metrics, "volley_queue_depth", volley_app="orders", queue="jobs") == 42

    obs.on_in_flight("orders", 0)
    obs.on_ready("orders", False)
    assert value(metrics, "volley_messages_in_flight", volley_app="orders") == 0
    assert value(metrics, "volley_ready", volley_app="orders") == 0


def test_lag_of_a_partition_no_longer_owned_disappears(metrics: VolleyMetrics) -> None:
    obs = PrometheusObserver("orders", metrics=metrics)
    obs.on_lag("orders", {("t", 0): 5, ("t", 1): 7})
    obs.on_lag("orders", {("t", 1): 3})
    assert value(metrics, "volley_consumer_lag", volley_app="orders", topic="t", partition="0") is None
    assert value(metrics, "volley_consumer_lag", volley_app="orders", topic="t", partition="1") == 3


def test_stop_withdraws_the_lag_of_every_partition(metrics: VolleyMetrics) -> None:
    """A stopped worker owns no partition: its last lag report must not stay as if it still did."""
    obs = PrometheusObserver("orders", metrics=metrics)
    obs.on_start("orders")
    obs.on_lag("orders", {("t", 0): 5, ("t", 1): 7})
    obs.on_stop("orders")
    assert value(metrics, "volley_consumer_lag", volley_app="orders", topic="t", partition="0") is None
    assert value(metrics, "volley_consumer_lag", volley_app="orders", topic="t", partition="1") is None
    obs.on_start("orders")
    obs.on_lag("orders", {("t", 1): 2})  # started again: reported again
    assert value(metrics, "volley_consumer_lag", volley_app="orders", topic="t", partition="1") == 2


def test_stop_withdraws_readiness_and_in_flight(metrics: VolleyMetrics) -> None:
    obs = PrometheusObserver("orders", metrics=metrics)
    obs.on_start("orders")
    obs.on_ready("orders", True)
    obs.on_in_flight("orders", 9)
    obs.on_stop("orders")
    assert value(metrics, "volley_ready", volley_app="orders") == 0
    assert value(metrics, "volley_messages_in_flight", volley_app="orders") == 0


def test_apps_are_labelled_apart_and_share_the_families(metrics: VolleyMetrics) -> None:
    first = PrometheusObserver("a", metrics=metrics)
    second = PrometheusObserver("b", metrics=metrics)
    first.on_consumed("a", "success", 1)
    second.on_consumed("b", "success", 2)
    # An observer also accepts events naming another app (one engine process, several apps).
    first.on_consumed("c", "fail", 3)
    assert value(metrics, "messages_consumed_count_total", volley_app="a", status="success") == 1
    assert value(metrics, "messages_consumed_count_total", volley_app="b", status="success") == 2
    assert value(metrics, "messages_consumed_count_total", volley_app="c", status="fail") == 3


def test_two_observers_on_the_default_registry_do_not_collide() -> None:
    # py-volley's module-level metrics broke a second Engine in one process; families here are created once.
    first = PrometheusObserver("default-a")
    second = PrometheusObserver("default-b")
    assert first.metrics is second.metrics


def test_dead_letter_reasons_are_capped(metrics: VolleyMetrics) -> None:
    obs = PrometheusObserver("orders", metrics=metrics)
    for i in range(MAX_REASONS + 10):
        obs.on_dead_letter("orders", f"reason-{i}", 1)
    obs.on_dead_letter("orders", "reason-0", 1)
    reasons = {
        s.labels["reason"]
        for family in metrics.registry.collect() if family.name == "volley_dead_letter_count"
        for s in family.samples if s.name.endswith("_total")
    }
    assert len(reasons) == MAX_REASONS + 1
    assert "other" in reasons
    assert value(metrics, "volley_dead_letter_count_total", volley_app="orders", reason="other") == 10
    assert value(metrics, "volley_dead_letter_count_total", volley_app="orders", reason="reason-0") == 2


@pytest.mark.parametrize("values", [[], [0.1], [0.5, 0.25, 1e-6, 3.0] * 50])
def test_batched_summary_equals_one_observe_per_value(values: list[float]) -> None:
    registry = CollectorRegistry()
    batched = Summary("batched", "x", registry=registry)
    looped = Summary("looped", "x", registry=registry)
    observe_total(batched)(sum(values), len(values))
    for v in values:
        looped.observe(v)
    assert registry.get_sample_value("batched_count") == registry.get_sample_value("looped_count") == len(values)
    assert registry.get_sample_value("batched_sum") == pytest.approx(registry.get_sample_value("looped_sum"))


def test_batched_total_counts_each_message_once() -> None:
    registry = CollectorRegistry()
    summary = Summary("dm", "x", registry=registry)
    observe_total(summary)(0.5, 5)
    observe_total(summary)(0.0, 0)
    assert registry.get_sample_value("dm_count") == 5
    assert registry.get_sample_value("dm_sum") == 0.5


def test_fallback_without_value_objects_still_counts() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, amount: float) -> None:
            self.seen.append(amount)

    plain = Plain()
    observe_total(plain)(1.0, 4)  # type: ignore[arg-type]
    observe_total(plain)(1.0, 0)  # type: ignore[arg-type]
    assert plain.seen == [0.25, 0.25, 0.25, 0.25]


@pytest.mark.parametrize(
    ("port", "settings", "match"),
    [
        (-1, {}, "metrics_port"),
        (70000, {}, "metrics_port"),
        (None, {"metrics_host": ""}, "metrics_host"),
        (None, {"health_max_silence_seconds": "soon"}, "health_max_silence_seconds"),
        (None, {"health_max_silence_seconds": 0}, "health_max_silence_seconds"),
        (None, {"prometheus_metrics": object()}, "prometheus_metrics"),
    ],
)
def test_bad_settings_say_what_to_change(port: int | None, settings: dict[str, object], match: str) -> None:
    with pytest.raises(ConfigurationError, match=match):
        PrometheusObserver.from_settings("app", port, settings)


def test_dead_letters_replayed_and_purged_by_source_queue(metrics: VolleyMetrics) -> None:
    from volley.ports import DeadLetterObserver

    obs = PrometheusObserver("orders", metrics=metrics)
    assert isinstance(obs, DeadLetterObserver)
    obs.on_dead_letters_replayed("orders", "shop.orders", 3)
    obs.on_dead_letters_replayed("orders", "shop.orders", 2)
    obs.on_dead_letters_purged("orders", "shop.returns", 4)
    assert value(metrics, "volley_dead_letters_replayed_total", volley_app="orders", source_queue="shop.orders") == 5
    assert value(metrics, "volley_dead_letters_purged_total", volley_app="orders", source_queue="shop.returns") == 4
