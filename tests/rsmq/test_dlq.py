"""``volley dlq`` on a real redis-server: letters from three stages, a filtered replay the app then processes, the
loop guard, and a replay killed with SIGKILL after its third confirmed letter and run again (in a subprocess)."""

from __future__ import annotations

import uuid
from typing import Any

import pytest

from volley.testing.deadletters import DLQ, INPUT, OUTPUT, DeadLetterScenarioTests

pytestmark = pytest.mark.redis

ORDER = "volley.testing.deadletters.Order"


class TestRsmqDeadLetters(DeadLetterScenarioTests):
    timeout = 30.0

    @pytest.fixture(autouse=True)
    def _server(self, redis_server: Any) -> None:
        self.where = {"host": redis_server.host, "port": redis_server.port}
        self.prefix = f"dlq-{uuid.uuid4().hex[:10]}"

    def queue_config(self) -> dict[str, Any]:
        # The input keeps keys and headers (an envelope), so that a replayed message can show them.
        model = {"serializer": "json", "model_handler": "dataclass", "data_model": ORDER}
        return {INPUT: {"value": f"{self.prefix}-orders", "connector": "rsmq", **model,
                        "config": {**self.where, "headers": "envelope", "vt": 30}},
                OUTPUT: {"value": f"{self.prefix}-shipped", "connector": "rsmq", **model,
                         "config": {**self.where, "vt": 30}},
                DLQ: {"value": f"{self.prefix}-dlq", "profile": "rsmq-dlq", "config": {**self.where, "vt": 30}}}


class TestRsmqPlainInputLoopGuard(TestRsmqDeadLetters):
    """An input with ``headers: drop`` (RSMQ's default) stores the payload alone: a replayed message loses its key
    and ``volley-replay-count``, so its next dead letter cannot say it was replayed. The journal's count of the
    letter's content keeps the loop guard working."""

    test_filtered_replay_moves_the_matching_letters_and_the_app_processes_them = None  # type: ignore[assignment]
    test_a_replay_killed_mid_way_and_run_again_moves_each_letter_once = None  # type: ignore[assignment]

    def queue_config(self) -> dict[str, Any]:
        config = super().queue_config()
        config[INPUT]["config"] = {**config[INPUT]["config"], "headers": "drop"}
        return config
