"""A dead-letter scenario for proving ``volley dlq`` on a connector: an app whose input fails at three stages.

``scenario_app(queue_config)`` builds the app on queues ``orders`` (input, JSON ``Order`` records), ``shipped``
(output) and ``dead-letters``; ``seed()`` gives inputs that fail at ``deserialize`` (not JSON), ``validate`` (no
amount) and ``handler`` (a negative amount, until ``Fix.fixed`` is set: the "bug fix" a replay follows). A
command-line replay in a subprocess names ``volley.testing.deadletters:app``, built from the JSON queue
configuration in ``$VOLLEY_DLQ_SCENARIO``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from volley.dlq import DeadLetter, DeadLetterQueue, Journal, LetterFilter, ReplayOptions, inspect, replay
from volley.dlq.letter import ERROR_HEADERS, REPLAY_COUNT
from volley.dlq.replay import KILL_AFTER_ENV
from volley.engine import Engine, StreamApp
from volley.message import Envelope, Headers, OutgoingMessage
from volley.ports import BrowsableConnector

INPUT, OUTPUT, DLQ = "orders", "shipped", "dead-letters"
SCENARIO_ENV = "VOLLEY_DLQ_SCENARIO"
STAGES = {"deserialize": 4, "validate": 3, "handler": 5}
"""How many inputs of ``seed()`` fail at each stage."""


@dataclass
class Order:
    order_id: int
    amount: int


class Fix:
    """Whether the handler's bug (refusing negative amounts) is fixed yet."""

    fixed = False


def scenario_app(queue_config: Mapping[str, Any], fix: type[Fix] | Fix = Fix, app_name: str = "dlq-scenario",
                 **engine: Any) -> StreamApp:
    settings: dict[str, Any] = {"metrics_port": None, "max_retries": 0, "retry_backoff_seconds": 0.0,
                                "poll_interval_seconds": 0.05, "on_failure": "continue", **engine}
    app = Engine(app_name=app_name, input_queue=INPUT, output_queues=[OUTPUT], dead_letter_queue=DLQ,
                 queue_config=queue_config, **settings)

    def handle(order: Order) -> list[tuple[str, Order]]:
        if order.amount < 0 and not fix.fixed:
            raise ValueError(f"negative amount {order.amount} for order {order.order_id}")
        return [(OUTPUT, order)]

    return app.stream_app(handle)


def seed() -> list[tuple[bytes, bytes, Headers]]:
    """(value, key, headers) of every input: ``STAGES`` of them fail, keys ``d0``, ``v0``, ``h0``, ... by stage."""
    deserialize = [(b"not json " + str(n).encode(), f"d{n}".encode(), {"trace-id": f"t-d{n}".encode()})
                   for n in range(STAGES["deserialize"])]
    validate = [(json.dumps({"order_id": 100 + n}).encode(), f"v{n}".encode(), {"trace-id": f"t-v{n}".encode()})
                for n in range(STAGES["validate"])]
    handler = [(json.dumps({"order_id": 200 + n, "amount": -1 - n}).encode(), f"h{n}".encode(),
                {"trace-id": f"t-h{n}".encode()}) for n in range(STAGES["handler"])]
    return deserialize + validate + handler


def __getattr__(name: str) -> Any:
    if name == "app":
        config = os.environ.get(SCENARIO_ENV)
        if not config:
            raise AttributeError(f"volley.testing.deadletters:app needs ${SCENARIO_ENV} (a JSON queue configuration)")
        return scenario_app(json.loads(config))
    raise AttributeError(name)


# ---------------------------------------------------------------------------------------------- the scenario as tests


async def browse_queue(app: StreamApp, alias: str) -> list[Envelope]:
    """Every message in one of ``app``'s queues, read in place through its connector's browser."""
    queue = app.engine.queues[alias]
    connector = queue.connector
    assert isinstance(connector, BrowsableConnector), f"{type(connector).__name__} has no create_browser()"
    browser = connector.create_browser(queue.spec)
    await browser.start()
    try:
        seen: list[Envelope] = []
        while batch := await browser.browse(500):
            seen.extend(batch)
        return seen
    finally:
        await browser.close()


async def run_app_until(app: StreamApp, done: Callable[[], Awaitable[bool]], timeout: float = 60.0) -> None:
    """Run ``app`` on this loop until ``done()`` holds (checked every 50 ms), then stop it gracefully."""
    task = asyncio.ensure_future(app.run_async())
    deadline = time.monotonic() + timeout
    try:
        while not await done():
            if task.done():
                task.result()
                raise AssertionError("the app stopped before the condition held")
            if time.monotonic() > deadline:
                raise AssertionError(f"condition not reached within {timeout} s")
            await asyncio.sleep(0.05)
    finally:
        app.stop()
        await task


def stages(letters: Sequence[Envelope]) -> Counter[str]:
    return Counter(DeadLetter.read(e).stage for e in letters)


class DeadLetterScenarioTests:
    """``volley dlq`` end to end on a connector: letters from three stages, a filtered replay the app then processes,
    the loop guard, and a replay killed (SIGKILL) after its third confirmed letter and run again.

    A subclass provides ``queue_config(self) -> dict``: the JSON-serializable settings of queues ``orders``
    (``data_model`` ``volley.testing.deadletters.Order``, keys and headers kept), ``shipped`` and ``dead-letters``,
    on fresh broker queues for each test; and may override ``timeout``.
    """

    timeout: float = 60.0

    def queue_config(self) -> dict[str, Any]:
        raise NotImplementedError

    async def scenario(self, fix: Fix) -> StreamApp:
        """The app after one run over ``seed()`` plus one good order: every failing input is a dead letter."""
        app = scenario_app(self.queue_config(), fix)
        queue = app.engine.input
        spec = dataclasses.replace(queue.spec, role="output")
        producer = (queue.producer_factory or queue.connector.create_producer)(spec)
        await producer.start()
        records = [OutgoingMessage(queue.value, v, k, h) for v, k, h in seed()]
        records.append(OutgoingMessage(queue.value, json.dumps({"order_id": 1, "amount": 5}).encode(), b"ok"))
        delivered: list[OutgoingMessage] = []
        producer.produce(records, lambda ok, failed: delivered.extend(ok))
        await producer.close()
        assert len(delivered) == len(records)

        async def all_settled() -> bool:
            return len(await browse_queue(app, DLQ)) == sum(STAGES.values()) and \
                len(await browse_queue(app, OUTPUT)) == 1

        await run_app_until(app, all_settled, self.timeout)
        return app

    async def test_filtered_replay_moves_the_matching_letters_and_the_app_processes_them(self, tmp_path: Path) -> None:
        fix = Fix()
        app = await self.scenario(fix)
        dlq = DeadLetterQueue(app)
        seen = await inspect(dlq, LetterFilter())
        assert dict(seen.by_stage) == STAGES and seen.total == sum(STAGES.values())
        assert stages(await browse_queue(app, DLQ)) == STAGES, "inspect must consume nothing"
        fix.fixed = True
        summary = await replay(dlq, Journal(tmp_path / "journal"), ReplayOptions(filter=LetterFilter(
            stages=("handler",))))
        assert (summary.moved, summary.skipped_by_filter, summary.left_by_loop_guard) == (5, 7, 0)
        replayed = [e for e in await browse_queue(app, INPUT) if REPLAY_COUNT in (e.headers or {})]
        assert sorted(e.key or b"" for e in replayed) == [b"h0", b"h1", b"h2", b"h3", b"h4"]
        for envelope in replayed:
            headers = envelope.headers or {}
            assert headers["trace-id"] == b"t-" + (envelope.key or b"") and headers[REPLAY_COUNT] == b"1"
            assert not ERROR_HEADERS & headers.keys()
        assert await self.pending_letters(app, tmp_path / "journal") == {"deserialize": 4, "validate": 3}

        async def shipped() -> bool:
            return len(await browse_queue(app, OUTPUT)) >= 6

        await run_app_until(app, shipped, self.timeout)
        orders = sorted(json.loads(e.value)["order_id"] for e in await browse_queue(app, OUTPUT))
        assert orders == [1, 200, 201, 202, 203, 204]
        assert await self.pending_letters(app, tmp_path / "journal") == {"deserialize": 4, "validate": 3}

    async def pending_letters(self, app: StreamApp, journal: Path) -> Counter[str]:
        """The letters a replay would still see: in the queue, and not moved already by the journal's account
        (on Kafka, letters past the replay group's commit stay in the topic)."""
        return Counter((await inspect(DeadLetterQueue(app), LetterFilter(), Journal(journal))).by_stage)

    async def test_the_loop_guard_leaves_a_letter_that_keeps_failing(self, tmp_path: Path) -> None:
        app = await self.scenario(Fix())
        dlq = DeadLetterQueue(app)
        options = ReplayOptions(filter=LetterFilter(stages=("handler",)), max_replays=1)
        assert (await replay(dlq, Journal(tmp_path / "j"), options)).moved == 5

        async def back() -> bool:  # failed again: five new handler letters, the replayed ones being journaled
            return (await self.pending_letters(app, tmp_path / "j"))["handler"] == 5

        await run_app_until(app, back, self.timeout)
        summary = await replay(dlq, Journal(tmp_path / "j"), options)
        assert (summary.moved, summary.left_by_loop_guard) == (0, 5)
        assert sorted(json.loads(s["value"])["order_id"] for s in summary.looping) == [200, 201, 202, 203, 204]

    async def test_a_replay_killed_mid_way_and_run_again_moves_each_letter_once(self, tmp_path: Path) -> None:
        app = await self.scenario(Fix())
        journal = tmp_path / "journal.jsonl"
        command = [sys.executable, "-m", "volley.cli", "--log-level", "WARNING", "dlq", "replay",
                   "volley.testing.deadletters:app", "--stage", "validate", "--stage", "handler", "--batch-size", "1",
                   "--journal", str(journal), "--json"]
        env = {**os.environ, SCENARIO_ENV: json.dumps(self.queue_config())}
        killed = await asyncio.to_thread(subprocess.run, command, env={**env, KILL_AFTER_ENV: "3"},
                                         capture_output=True, timeout=120, check=False)
        assert killed.returncode == -signal.SIGKILL, killed.stderr.decode(errors="replace")[-3000:]
        assert journal.exists()
        rerun = await asyncio.to_thread(subprocess.run, command, env=env, capture_output=True, timeout=120,
                                        check=False)
        assert rerun.returncode == 0, rerun.stderr.decode(errors="replace")[-3000:]
        summary = json.loads(rerun.stdout)
        assert summary["possible_duplicates"] == 0
        assert summary["moved"] == 8 - 3, "the three the killed run had confirmed are not sent again"
        assert summary["finished_from_journal"] + summary["already_replayed"] >= 1
        replayed = Counter(e.key for e in await browse_queue(app, INPUT) if REPLAY_COUNT in (e.headers or {}))
        assert replayed == dict.fromkeys((b"v0", b"v1", b"v2", b"h0", b"h1", b"h2", b"h3", b"h4"), 1)
        assert await self.pending_letters(app, journal) == {"deserialize": 4}
