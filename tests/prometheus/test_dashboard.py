"""The Grafana dashboard, as volley-prometheus ships it (package data), only queries series Volley exports, with
labels those series have."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from volley_prometheus import PrometheusObserver, VolleyMetrics, dashboard_file, grafana_dashboard

PROMQL_WORDS = {"by", "without", "on", "ignoring", "group_left", "group_right", "bool", "and", "or", "unless",
                "offset", "inf", "nan"}
SCRAPE_LABELS = {"instance", "job"}  # added by Prometheus to every series it scrapes


def exercised(metrics: VolleyMetrics) -> VolleyMetrics:
    """Call every observer method so that every family has samples."""
    obs = PrometheusObserver("app", metrics=metrics)
    obs.on_start("app")
    obs.on_consumed("app", "success", 1)
    obs.on_consumed("app", "fail", 1)
    obs.on_produced("app", "in", "out", 1)
    obs.on_delivery("app", "success", 1)
    obs.on_delivery("app", "fail", 1)
    obs.on_process_time("app", "component", 0.1, 1)
    obs.on_process_time("app", "cycle", 0.2, 1)
    obs.on_data_model_time("construct", 0.1, 1)
    obs.on_dead_letter("app", "handler", 1)
    obs.on_retry("app", 1)
    obs.on_in_flight("app", 1)
    obs.on_heartbeat("app")
    obs.on_ready("app", True)
    obs.on_commit("app", 0.01)
    obs.on_depth("app", "q", 1)
    obs.on_dead_letters_replayed("app", "in", 1)
    obs.on_dead_letters_purged("app", "in", 1)
    obs.on_stop("app")
    obs.on_lag("app", {("t", 0): 1})  # after on_stop, which withdraws the lag of every partition
    return metrics


def exported(metrics: VolleyMetrics) -> dict[str, set[str]]:
    """Every exported sample name, with the label names its samples carry."""
    out: dict[str, set[str]] = {}
    for family in exercised(metrics).registry.collect():
        for s in family.samples:
            out.setdefault(s.name, set()).update(s.labels)
    return out


def queries(node: Any) -> Iterator[tuple[str, str]]:
    """(expr, legendFormat) of every panel target, and the queries of template variables."""
    if isinstance(node, dict):
        if isinstance(node.get("expr"), str):
            yield node["expr"], str(node.get("legendFormat", ""))
        query = node.get("query")
        if node.get("type") == "query" and isinstance(query, dict) and isinstance(query.get("query"), str):
            yield query["query"], ""
        for value in node.values():
            yield from queries(value)
    elif isinstance(node, list):
        for value in node:
            yield from queries(value)


def metric_names(expr: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)          # string literals
    text = re.sub(r"label_values\(\s*([^,()]+?)\s*,\s*\w+\s*\)", r"\1", text)  # Grafana: metric, label
    text = re.sub(r"\{[^}]*\}", "", text)                      # label matchers
    text = re.sub(r"\[[^\]]*\]", "", text)                     # range selectors
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", "", text)
    names = set()
    for match in re.finditer(r"(?<![\w.$])([A-Za-z_:][\w:]*)(\s*\()?", text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in PROMQL_WORDS:
            continue
        names.add(word)
    return names


def label_names(expr: str, legend: str) -> set[str]:
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    labels = set()
    for matchers in re.findall(r"\{([^}]*)\}", text):
        labels.update(re.findall(r"([A-Za-z_]\w*)\s*(?:=~|!~|!=|=)", matchers))
    for grouping in re.findall(r"\b(?:by|without)\s*\(([^)]*)\)", text):
        labels.update(name.strip() for name in grouping.split(",") if name.strip())
    labels.update(re.findall(r"label_values\(\s*[\w:]+\s*,\s*(\w+)\s*\)", text))
    labels.update(re.findall(r"\{\{\s*(\w+)\s*\}\}", legend))
    return labels


def test_the_dashboard_ships_inside_the_installed_package() -> None:
    import volley_prometheus

    package = Path(volley_prometheus.__file__).parent
    assert Path(str(dashboard_file())) == package / "dashboards" / "volley.json"
    done = subprocess.run([sys.executable, "-m", "volley_prometheus.dashboard"], capture_output=True, text=True,
                          timeout=60, check=True)
    assert json.loads(done.stdout) == grafana_dashboard()


def test_dashboard_is_valid_grafana_json() -> None:
    dashboard = grafana_dashboard()
    assert dashboard["title"]
    assert dashboard["panels"]
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    assert sum(1 for _ in queries(dashboard)) >= 10


def test_every_query_uses_exported_metrics_and_labels(metrics: VolleyMetrics) -> None:
    series = exported(metrics)
    dashboard = grafana_dashboard()
    used: set[str] = set()
    for expr, legend in queries(dashboard):
        names = metric_names(expr)
        assert names, f"no metric found in {expr!r}"
        unknown = names - set(series)
        assert not unknown, f"{expr!r} queries {sorted(unknown)}, which Volley does not export"
        allowed = set().union(*(series[name] for name in names)) | SCRAPE_LABELS
        stray = label_names(expr, legend) - allowed
        assert not stray, f"{expr!r} (legend {legend!r}) uses labels {sorted(stray)} that {sorted(names)} lack"
        used |= names
    # Every family Volley exports appears on the dashboard.
    families = {f.name for f in metrics.registry.collect()}
    shown = {f for f in families if any(name == f or name.startswith(f + "_") for name in used)}
    assert shown == families


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (status) (rate(messages_consumed_count_total{volley_app=~"$app"}[$__rate_interval]))',
         {"messages_consumed_count_total"}),
        ("histogram_quantile(0.99, sum by (le) (rate(volley_commit_seconds_bucket[5m])))",
         {"volley_commit_seconds_bucket"}),
        ("count(rate(heartbeats_total[1m]) == 0) or vector(0)", {"heartbeats_total"}),
        ("rate(a_sum[1m]) / rate(a_count[1m])", {"a_sum", "a_count"}),
        ("label_values(messages_consumed_count_total, volley_app)", {"messages_consumed_count_total"}),
    ],
)
def test_metric_name_extraction(expr: str, names: set[str]) -> None:
    assert metric_names(expr) == names


def test_a_wrong_name_would_be_caught(metrics: VolleyMetrics) -> None:
    series = exported(metrics)
    # py-volley's family name without prometheus-client's _total suffix is not a series Prometheus stores.
    assert "messages_consumed_count" not in series
    assert "messages_consumed_count_total" in series
    assert metric_names("rate(messages_consumed_count[5m])") - set(series) == {"messages_consumed_count"}
