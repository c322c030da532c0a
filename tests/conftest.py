"""Shared test set-up: real Kafka and Redis come from the project's own service tooling (tools/services)."""

from __future__ import annotations

from pathlib import Path

# The service plugin starts brokers lazily, only for tests that ask for them.
_PLUGIN = Path(__file__).resolve().parent.parent / "tools" / "services" / "pytest_plugin.py"
pytest_plugins = ["services.pytest_plugin"] if _PLUGIN.exists() else []
