"""``volley dlq`` on a real SQLite file: letters from three stages, a filtered replay the app then processes, the
loop guard, and a replay killed with SIGKILL after its third confirmed letter and run again (in a subprocess)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from volley.testing.deadletters import DLQ, INPUT, OUTPUT, DeadLetterScenarioTests

ORDER = "volley.testing.deadletters.Order"


class TestSqliteDeadLetters(DeadLetterScenarioTests):
    timeout = 30.0

    @pytest.fixture(autouse=True)
    def _database(self, tmp_path: Path) -> None:
        self.path = str(tmp_path / "queues.sqlite3")

    def queue_config(self) -> dict[str, Any]:
        config = {"path": self.path, "partitions": 2}
        return {INPUT: {"value": "orders", "connector": "sqlite", "serializer": "json", "model_handler": "dataclass",
                        "data_model": ORDER, "config": config},
                OUTPUT: {"value": "shipped", "connector": "sqlite", "serializer": "json", "model_handler": "dataclass",
                         "data_model": ORDER, "config": config},
                DLQ: {"value": "orders.dlq", "profile": "sqlite-dlq", "config": config}}
