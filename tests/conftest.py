"""Shared test set-up: real Kafka and Redis come from the project's own service tooling."""

from __future__ import annotations

import importlib.util

# The service plugin starts brokers lazily, only for tests that ask for them.
pytest_plugins = ["services.pytest_plugin"] if importlib.util.find_spec("services") else []
