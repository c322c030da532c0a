"""``volley dlq`` on a real Kafka broker: letters from three stages, a filtered replay the app then processes, the
loop guard, a replay killed with SIGKILL after its third confirmed letter and run again (in a subprocess), what
the replay group commits, and purge: refused by filter, ``--before`` deletes records."""

from __future__ import annotations

import asyncio
import json
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from volley import cli
from volley.dlq import (
    CannotPurgeSingleLettersError,
    DeadLetterQueue,
    Journal,
    LetterFilter,
    ReplayOptions,
    inspect,
    purge,
    purge_before,
    replay,
)
from volley.testing.deadletters import DLQ, INPUT, OUTPUT, SCENARIO_ENV, DeadLetterScenarioTests, Fix, browse_queue

pytestmark = pytest.mark.kafka

ORDER = "volley.testing.deadletters.Order"


class TestKafkaDeadLetters(DeadLetterScenarioTests):
    timeout = 60.0

    @pytest.fixture(autouse=True)
    def _broker(self, kafka_bootstrap: str) -> None:
        self.bootstrap = kafka_bootstrap
        self.prefix = f"dlq-{uuid.uuid4().hex[:10]}"
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        topics = [NewTopic(f"{self.prefix}-{name}", num_partitions=2, replication_factor=1)
                  for name in ("orders", "shipped", "dlq")]
        for future in admin.create_topics(topics).values():
            future.result(30)

    def queue_config(self) -> dict[str, Any]:
        model = {"serializer": "json", "model_handler": "dataclass", "data_model": ORDER}
        where = {"bootstrap.servers": self.bootstrap}
        return {INPUT: {"value": f"{self.prefix}-orders", "connector": "confluent", **model,
                        "config": {**where, "group.id": f"{self.prefix}-app", "auto.offset.reset": "earliest"}},
                OUTPUT: {"value": f"{self.prefix}-shipped", "connector": "confluent", **model, "config": where},
                DLQ: {"value": f"{self.prefix}-dlq", "profile": "confluent-dlq", "config": where}}

    async def test_purge_by_filter_is_refused_and_before_deletes_records(self) -> None:
        app = await self.scenario(Fix())
        dlq = DeadLetterQueue(app)
        with pytest.raises(CannotPurgeSingleLettersError, match="--before"):
            await purge(dlq, LetterFilter(stages=("deserialize",)))
        dropped = await purge_before(dlq, offset=2)
        assert sum(dropped.values()) == 4  # two partitions, offsets 0 and 1 of each
        left = await browse_queue(app, DLQ)
        assert len(left) == 12 - 4 and min(e.position for e in left) == 2

    async def test_replay_commits_only_past_letters_dealt_with(self, tmp_path: Path) -> None:
        """Reading commits nothing; a full replay commits each partition's end under the replay group."""
        app = await self.scenario(Fix())
        dlq = DeadLetterQueue(app)
        group = f"volley-dlq.{app.engine.app_name}.{dlq.name}"
        await inspect(dlq, LetterFilter())
        assert await committed(self.bootstrap, group, dlq.name) == {0: -1001, 1: -1001}
        summary = await replay(dlq, Journal(tmp_path / "j"), ReplayOptions(to="elsewhere"))
        assert summary.moved == 12
        assert await browse_queue(app, DLQ) == []  # a fresh browser starts at the commit: nothing left
        assert sum((await committed(self.bootstrap, group, dlq.name)).values()) == 12

    async def test_cli_purge_explains_and_before_a_time_deletes(
        self, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
    ) -> None:
        """The command line, in process, on the scenario app named by $VOLLEY_DLQ_SCENARIO."""
        app = await self.scenario(Fix())
        monkeypatch.setenv(SCENARIO_ENV, json.dumps(self.queue_config()))
        target = "volley.testing.deadletters:app"
        purge_one_stage = ["dlq", "purge", target, "--stage", "deserialize", "--yes"]
        assert await asyncio.to_thread(cli.main, purge_one_stage) == 2
        assert "cannot drop single records" in capsys.readouterr().err
        later = (datetime.now(UTC) + timedelta(hours=1)).isoformat()
        assert await asyncio.to_thread(cli.main, ["dlq", "purge", target, "--before", later, "--yes"]) == 0
        assert "deleted 12 letter(s)" in capsys.readouterr().out
        assert await browse_queue(app, DLQ) == []



async def committed(bootstrap: str, group: str, topic: str) -> dict[int, int]:
    def read() -> dict[int, int]:
        consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
        try:
            found = consumer.committed([TopicPartition(topic, 0), TopicPartition(topic, 1)], timeout=30)
            return {tp.partition: tp.offset for tp in found}
        finally:
            consumer.close()

    return await asyncio.to_thread(read)

