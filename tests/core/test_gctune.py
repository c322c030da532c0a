"""Engine(tune_gc=True): the collector's threshold is raised while apps run and restored after, and left alone
when the collector is disabled or tune_gc=False."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from volley import Engine, MemoryBroker, gctune


@pytest.fixture(autouse=True)
def _restore_thresholds() -> Iterator[None]:
    saved, enabled = gc.get_threshold(), gc.isenabled()
    yield
    gc.set_threshold(*saved)
    if enabled:
        gc.enable()


def app(tune_gc: bool, seen: list[tuple[int, int, int]]) -> Engine:
    broker = MemoryBroker()
    broker.publish("in", b"{}")
    config = {"in": {"value": "in", "profile": "memory", "config": {"broker": broker}}}
    engine = Engine(app_name="gc", input_queue="in", queue_config=config, metrics_port=None,
                    poll_interval_seconds=0.01, tune_gc=tune_gc)

    @engine.stream_app
    def handler(message: object) -> bool:
        seen.append(gc.get_threshold())
        return True

    handler.run_until_drained(timeout=10, drain_idle_seconds=0.0)
    return engine


def test_threshold_is_raised_while_running_and_restored_after() -> None:
    gc.set_threshold(700, 10, 10)
    seen: list[tuple[int, int, int]] = []
    app(True, seen)
    assert seen == [(gctune.GEN0_THRESHOLD, 10, 10)]
    assert gc.get_threshold() == (700, 10, 10)


def test_tune_gc_false_leaves_the_collector_alone() -> None:
    gc.set_threshold(700, 10, 10)
    seen: list[tuple[int, int, int]] = []
    app(False, seen)
    assert seen == [(700, 10, 10)]


def test_nested_users_restore_only_when_the_last_stops() -> None:
    gc.set_threshold(500, 7, 9)
    gctune.acquire()
    gctune.acquire()
    gctune.release()
    assert gc.get_threshold() == (gctune.GEN0_THRESHOLD, 7, 9)
    gctune.release()
    assert gc.get_threshold() == (500, 7, 9)


def test_a_higher_threshold_or_a_change_made_meanwhile_is_respected() -> None:
    gc.set_threshold(50_000, 10, 10)
    gctune.acquire()
    assert gc.get_threshold() == (50_000, 10, 10)
    gctune.release()
    assert gc.get_threshold() == (50_000, 10, 10)
    gc.set_threshold(700, 10, 10)
    gctune.acquire()
    gc.set_threshold(2_000, 10, 10)  # the application changed it while the app ran: its choice stands
    gctune.release()
    assert gc.get_threshold() == (2_000, 10, 10)
