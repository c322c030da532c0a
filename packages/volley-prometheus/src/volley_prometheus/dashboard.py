"""The Grafana dashboard for Volley's metrics, shipped inside this distribution as package data.

    python -m volley_prometheus.dashboard > volley.json    # then import it in Grafana

It ships in the wheel (not only in the repository) so that the dashboard that matches the installed metrics is
always at hand, whatever version is deployed.
"""

from __future__ import annotations

import json
import sys
from importlib import resources
from importlib.resources.abc import Traversable
from typing import Any

__all__ = ["dashboard_file", "grafana_dashboard"]


def dashboard_file() -> Traversable:
    """The dashboard's JSON file within the installed package."""
    return resources.files("volley_prometheus").joinpath("dashboards", "volley.json")


def grafana_dashboard() -> dict[str, Any]:
    """The dashboard, parsed: a Grafana dashboard model ready to import or to provision."""
    loaded: dict[str, Any] = json.loads(dashboard_file().read_text(encoding="utf-8"))
    return loaded


def main() -> int:
    sys.stdout.write(dashboard_file().read_text(encoding="utf-8"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
