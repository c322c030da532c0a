"""``volley run --workers N``'s restart delay (volley.workers.Supervisor), on fake processes and a fake clock."""

from __future__ import annotations

from typing import Any

import pytest

from volley import workers


class FakeProcess:
    started: list[FakeProcess] = []

    def __init__(self, command: list[str], **_: Any) -> None:
        self.pid = 1000 + len(FakeProcess.started)
        self.code: int | None = None
        FakeProcess.started.append(self)

    def poll(self) -> int | None:
        return self.code


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def supervisor(monkeypatch: pytest.MonkeyPatch) -> tuple[workers.Supervisor, Clock]:
    FakeProcess.started = []
    clock = Clock()
    monkeypatch.setattr(workers.subprocess, "Popen", FakeProcess)
    monkeypatch.setattr(workers.time, "monotonic", clock)
    sup = workers.Supervisor(["app:app"], 1)
    sup._spawn(0)
    return sup, clock


def crash_and_restart(sup: workers.Supervisor, clock: Clock) -> float:
    """The worker exits with 1; the delay the supervisor waits before starting it again."""
    FakeProcess.started[-1].code = 1
    count = len(FakeProcess.started)
    sup._watch()
    delay = sup.next_start[0] - clock.now
    clock.now += delay
    sup._watch()
    assert len(FakeProcess.started) == count + 1
    return delay


def test_the_restart_delay_grows_while_a_worker_keeps_failing(supervisor: tuple[workers.Supervisor, Clock]) -> None:
    sup, clock = supervisor
    delays = [crash_and_restart(sup, clock) for _ in range(8)]
    assert delays == [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]


def test_a_worker_that_ran_well_before_it_died_is_restarted_soon(
        supervisor: tuple[workers.Supervisor, Clock]) -> None:
    """Found in review: the delay never went back down, so a worker that crashed a few times at a deploy and then
    ran for days waited 30 s after its next crash."""
    sup, clock = supervisor
    for _ in range(8):
        crash_and_restart(sup, clock)
    clock.now += workers.STABLE_SECONDS + 1  # runs well for a while
    assert crash_and_restart(sup, clock) == 0.5
    assert crash_and_restart(sup, clock) == 1.0  # and grows again if it keeps failing
