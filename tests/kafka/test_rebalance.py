"""Rebalances on the real broker, under both group protocols: what the group does to a worker in the middle of
its work (a pause held across a rebalance, a redelivery delay, a revoke past its deadline, members of the group
that come and go during exactly-once, a fenced transactional producer, a member stalled until it is thrown out).

Members run in this process, each on a thread with its own event loop (``members``), except where the process
itself must freeze. What is checked is what Kafka holds: the output topic, the group's committed offsets, and
every commit the broker accepted, in order (``ledger``, read from ``__consumer_offsets``).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import pytest
from confluent_kafka.admin import AdminClient, AlterConfigOpType, ConfigEntry, ConfigResource, ResourceType

from services.processes import WorkerProcess, wait_for
from volley import Engine
from volley_kafka import rebalance as rebalance_module

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

PARTITIONS = 2
JSON_DICT = {"serializer": "json", "model_handler": "dataclass", "data_model": dict}
CLASSIC_FAST = {"session.timeout.ms": 6000, "heartbeat.interval.ms": 500}
"""Classic members notice a rebalance at their next heartbeat (3 s by default) and are expelled after their
session (45 s by default): the broker's minimum session, and a short heartbeat."""


def fast_group(kit: Any, group: str, protocol: str) -> None:
    """Under the consumer protocol the session and heartbeat are the group's (the broker's defaults: 10 s,
    500 ms): the broker's minimum session for this group."""
    if protocol != "consumer":
        return
    admin = AdminClient({"bootstrap.servers": kit.bootstrap})
    entries = [ConfigEntry("consumer.session.timeout.ms", "6000", incremental_operation=AlterConfigOpType.SET),
               ConfigEntry("consumer.heartbeat.interval.ms", "250", incremental_operation=AlterConfigOpType.SET)]
    for future in admin.incremental_alter_configs([ConfigResource(ResourceType.GROUP, group,
                                                                  incremental_configs=entries)]).values():
        future.result(30)


def make_app(kit: Any, name: str, group: str, source: str, sink: str, handler: Callable[..., Any], *,
             protocol: str, eos: bool = False, consumer_config: dict[str, Any] | None = None,
             **engine_kwargs: Any) -> Any:
    config: dict[str, Any] = {"bootstrap.servers": kit.bootstrap, "group.id": group, "group.protocol": protocol,
                              "volley.commit.interval.seconds": 0.1,
                              **(CLASSIC_FAST if protocol == "classic" else {}), **(consumer_config or {})}
    queue_config = {
        "input": {"value": source, "profile": "confluent-eos" if eos else "confluent", **JSON_DICT,
                  "config": config},
        "out": {"value": sink, "profile": "confluent", **JSON_DICT, "config": {"bootstrap.servers": kit.bootstrap}},
    }
    engine = Engine(app_name=kit.unique(name), input_queue="input", output_queues=["out"],
                    queue_config=queue_config, metrics_port=None, poll_interval_seconds=0.1,
                    shutdown_timeout_seconds=20.0, **engine_kwargs)
    return engine.stream_app(handler)


def output(message: dict[str, Any], msg_ctx: Any, by: str) -> list[tuple[str, dict[str, Any]]]:
    return [("out", {"id": message["id"], "by": by, "p": msg_ctx.partition, "o": msg_ctx.position})]


def passing(by: str) -> Callable[..., Any]:
    def handler(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        return output(message, msg_ctx, by)
    return handler


def seed(kit: Any, topic: str, ids: Iterable[int], per_partition: int) -> None:
    """ids in blocks of ``per_partition`` per partition: id i lands in partition (i // per_partition) % PARTITIONS."""
    by_partition: dict[int, list[bytes]] = {}
    for i in ids:
        by_partition.setdefault((i // per_partition) % PARTITIONS, []).append(json.dumps({"id": i}).encode())
    for partition, values in by_partition.items():
        kit.produce(topic, values, partition=partition)


def all_partitions(source: str) -> frozenset[tuple[str, int]]:
    return frozenset((source, p) for p in range(PARTITIONS))


def committed_to_end(kit: Any, group: str, source: str) -> bool:
    return bool(kit.committed(group, source, PARTITIONS) == kit.end_offsets(source, PARTITIONS))


def outputs(kit: Any, sink: str, isolation: str = "read_committed") -> list[dict[str, Any]]:
    return [json.loads(m.value()) for m in kit.read_topic(sink, isolation=isolation, timeout=60)]


def alive(*running: Any) -> Callable[[], None]:
    def check() -> None:
        for member in running:
            member.ensure_running()
    return check


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """Opens a handler blocked on it; opened at teardown too, before the members are stopped (list it after
    ``members``), so that a failed test leaves no handler blocked."""
    event = threading.Event()
    yield event
    event.set()


def test_a_hard_pause_held_across_rebalances_ends_and_every_partition_flows_again(
        kit: Any, ledger: Any, members: Any, gate: threading.Event, group_protocol: str) -> None:
    """Worker A's buffer stays full (one input, blocked) long enough for a hard pause in librdkafka; member B
    joins and leaves while the pause holds, so A's partitions are revoked and assigned back paused. librdkafka
    keeps a pause across assignments: once A's input finishes, every partition (those it kept, those it got
    back) must be consumed again, including what arrived meanwhile."""
    source, sink, group = kit.topic("held-in", PARTITIONS), kit.topic("held-out", PARTITIONS), kit.unique("held")
    fast_group(kit, group, group_protocol)
    history = ledger(group)
    seed(kit, source, range(40), per_partition=20)
    blocked = threading.Event()

    def slow(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        if not blocked.is_set():
            blocked.set()
            gate.wait(90)
        return output(message, msg_ctx, "a")

    # One input buffered at most: the blocked one keeps the buffer full through every rebalance (a revoke
    # abandons queued inputs, not one in flight), so the pause holds until the gate opens.
    a = members(make_app(kit, "held-a", group, source, sink, slow, protocol=group_protocol, max_in_flight=1,
                         max_buffered=1, consume_batch_size=1, sync_handler_mode="thread",
                         consumer_config={"volley.revoke.timeout.seconds": 1}), "a")
    wait_for(blocked.is_set, 30, "A's first input", alive(a))
    wait_for(lambda: a.consumer._hard_paused, 10, "A's hard pause", alive(a))
    b = members(make_app(kit, "held-b", group, source, sink, passing("b"), protocol=group_protocol), "b")
    wait_for(lambda: bool(b.assignment()), 30, "B's partitions", alive(a, b))
    assert a.consumer._hard_paused, "the pause holds across B's arrival"
    b.stop()
    wait_for(lambda: a.assignment() == all_partitions(source), 30, "A owning every partition again", alive(a))
    assert a.consumer._hard_paused, "the pause holds across B's departure"
    seed(kit, source, range(40, 80), per_partition=20)  # arrives while A is paused: only A can consume it
    gate.set()
    wait_for(lambda: committed_to_end(kit, group, source), 60, "every input committed", alive(a))
    assert not a.consumer._hard_paused
    a.stop()

    ids = Counter(o["id"] for o in outputs(kit, sink))
    missing = sorted(set(range(80)) - set(ids))
    assert not missing, f"{len(missing)} inputs never handled, first {missing[:10]}"
    assert {o["by"] for o in outputs(kit, sink) if o["id"] >= 40} == {"a"}
    assert history.backwards() == []


def test_a_message_waiting_out_a_redelivery_delay_is_handled_by_the_partitions_next_owner(
        kit: Any, ledger: Any, members: Any, group_protocol: str) -> None:
    """A gives back one input of each partition with a delay far longer than the test (its partitions paused
    meanwhile); B joins, then A leaves. Each given-back input is handled once, by a member that owned its
    partition at that moment, long before A's delay would have ended: the delay went with the partition, and
    no offset was skipped."""
    source, sink, group = kit.topic("delay-in", PARTITIONS), kit.topic("delay-out", PARTITIONS), kit.unique("delay")
    fast_group(kit, group, group_protocol)
    history = ledger(group)
    seed(kit, source, range(30), per_partition=15)
    given_back = {5, 20}  # offset 5 of each partition
    lock = threading.Lock()
    nacked: set[int] = set()
    handled: list[tuple[int, str, bool]] = []  # (id, member, owned its partition at the time), given back or not
    apps: dict[str, Any] = {}

    def handler_of(by: str) -> Callable[..., Any]:
        def handler(message: dict[str, Any], msg_ctx: Any) -> Any:
            owned = (source, msg_ctx.partition) in apps[by]._run.consumer._fetcher.assigned
            with lock:
                if message["id"] in given_back and message["id"] not in nacked:
                    nacked.add(message["id"])
                    return False
                handled.append((message["id"], by, owned))
            return output(message, msg_ctx, by)
        return handler

    delay = 600.0
    for by in ("a", "b"):
        apps[by] = make_app(kit, f"delay-{by}", group, source, sink, handler_of(by), protocol=group_protocol,
                            redelivery_delay_seconds=delay)
    started = time.monotonic()
    a = members(apps["a"], "a")
    wait_for(lambda: nacked == given_back and history.latest(source) == {0: 5, 1: 5}
             and len({i for i, _, _ in handled}) == 28, 30, "A through both partitions but the given-back inputs",
             alive(a))
    b = members(apps["b"], "b")
    wait_for(lambda: bool(b.assignment()), 30, "B's partitions", alive(a, b))
    a.stop()
    wait_for(lambda: committed_to_end(kit, group, source), 60, "every input committed", alive(b))
    b.stop()
    assert time.monotonic() - started < delay / 4

    for i in given_back:
        handlings = [(by, owned) for n, by, owned in handled if n == i]
        assert len(handlings) == 1, f"input {i} handled {len(handlings)} times after it was given back: {handlings}"
        assert handlings[0][1], f"input {i} handled by {handlings[0][0]}, which no longer owned its partition"
    missing = sorted(set(range(30)) - {o["id"] for o in outputs(kit, sink)})
    assert not missing, f"inputs skipped: {missing}"
    assert history.backwards() == []


def test_a_member_joining_gets_its_partition_without_waiting_for_the_work_the_worker_keeps(
        kit: Any, ledger: Any, members: Any, group_protocol: str) -> None:
    """Incremental rebalances (the consumer protocol; cooperative-sticky under classic): worker A's handler thread
    is blocked in a call on one partition, with the other partition's inputs queued behind it. B joins and one
    partition moves to B. A's revoke must wait only for the moved partition's work under way (the call, if it is
    the moved partition's: the test then lets that partition's calls through), not for the partition A keeps,
    whose calls stay blocked: before, B waited for A's revoke deadline (30 s here)."""
    source, sink, group = kit.topic("scope-in", PARTITIONS), kit.topic("scope-out", PARTITIONS), kit.unique("scope")
    fast_group(kit, group, group_protocol)
    history = ledger(group)
    seed(kit, source, range(20), per_partition=10)
    gates = {p: threading.Event() for p in range(PARTITIONS)}
    in_call = threading.Event()

    def blocked(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        in_call.set()
        assert gates[msg_ctx.partition].wait(90), "the test never opened the gate"
        return output(message, msg_ctx, "a")

    cooperative = {"partition.assignment.strategy": "cooperative-sticky"} if group_protocol == "classic" else {}
    app_a = make_app(kit, "scope-a", group, source, sink, blocked, protocol=group_protocol, consume_batch_size=20,
                     sync_handler_mode="thread",
                     consumer_config={"volley.revoke.timeout.seconds": 30, **cooperative})
    try:
        a = members(app_a, "a")
        wait_for(lambda: in_call.is_set() and a.assignment() == all_partitions(source), 30, "A blocked in a call",
                 alive(a))
        b = members(make_app(kit, "scope-b", group, source, sink, passing("b"), protocol=group_protocol,
                             consumer_config=cooperative), "b")
        joined = time.monotonic()

        def b_assigned() -> bool:
            revoking = app_a._run.rebalance.revoked if app_a._run is not None else set()
            for _, partition in revoking:  # the moved partition's call may be the blocked one: let it through
                gates[partition].set()
            return bool(b.assignment())

        wait_for(b_assigned, 60, "B's partition", alive(a, b))
        took = time.monotonic() - joined
        moved = {p for _, p in b.assignment()}
        kept = set(range(PARTITIONS)) - moved
        assert kept and not any(gates[p].is_set() for p in kept), "A's kept partition's calls are still blocked"
        assert took < 15, f"B got its partition {took:.1f} s after joining: A's revoke waited for the kept work"
    finally:
        for gate in gates.values():
            gate.set()
    wait_for(lambda: committed_to_end(kit, group, source), 60, "every input committed", alive(a, b))
    a.stop()
    b.stop()
    missing = sorted(set(range(20)) - {o["id"] for o in outputs(kit, sink)})
    assert not missing, f"inputs never handled: {missing}"
    assert history.backwards() == []


@pytest.mark.parametrize("stuck", ["handler thread", "event loop"])
def test_a_revoke_past_its_deadline_commits_nothing_for_the_partition_afterwards_and_the_worker_drains(
        kit: Any, ledger: Any, members: Any, gate: threading.Event, group_protocol: str, stuck: str,
        monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    """A's handler blocks past the revoke deadline while B joins: on the handler thread the engine's wait for
    in-flight work times out; blocking the event loop (an async handler calling blocking code) the whole release
    does, and the fetch thread gives the partitions up by itself. Either way A never commits a partition it gave
    up (once B committed it to its end, a commit would move it back), and A, unblocked, finishes the partitions
    it owns (also one assigned back while its loop was blocked: the engine used to drop those messages as
    revoked), settles every input it consumed, and reports itself drained."""
    monkeypatch.setattr(rebalance_module, "REVOKE_GRACE", 0.5)
    source, sink, group = kit.topic("late-in", PARTITIONS), kit.topic("late-out", PARTITIONS), kit.unique("late")
    fast_group(kit, group, group_protocol)
    history = ledger(group)
    seed(kit, source, range(40), per_partition=20)
    blocked = threading.Event()

    def block_once(msg_ctx: Any) -> None:
        if msg_ctx.position == 3 and not blocked.is_set():
            blocked.set()
            gate.wait(90)

    def on_thread(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        block_once(msg_ctx)
        return output(message, msg_ctx, "a")

    async def on_loop(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        if msg_ctx.position == 3 and not blocked.is_set():
            blocked.set()
            # Wait (without blocking) until the engine is releasing the revoked partitions, then block the event
            # loop on purpose, so that the release cannot end: the fetch thread gives the partitions up by itself.
            revoking = a.app._run.rebalance.revoked
            deadline = time.monotonic() + 60
            while not revoking and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            gate.wait(90)
        return output(message, msg_ctx, "a")

    a = members(make_app(kit, "late-a", group, source, sink, on_thread if stuck == "handler thread" else on_loop,
                         protocol=group_protocol, max_in_flight=1, sync_handler_mode="thread",
                         consumer_config={"volley.revoke.timeout.seconds": 1}), "a")
    wait_for(blocked.is_set, 30, "A blocked in its handler", alive(a))
    b = members(make_app(kit, "late-b", group, source, sink, passing("b"), protocol=group_protocol), "b")
    if stuck == "event loop":
        # A's fetch thread polls librdkafka only when the loop asks it to, and under the consumer protocol the
        # group completes a revocation at the member's next poll: unblock A once its fetch thread gave up.
        wait_for(lambda: any("giving them up uncommitted" in r.getMessage() for r in caplog.records), 30,
                 "A's fetch thread giving the partitions up", alive(a, b))
        gate.set()
    wait_for(lambda: bool(b.assignment()), 30, "B's partitions", alive(a, b))
    ends = kit.end_offsets(source, PARTITIONS)
    taken = {p for _, p in b.assignment()}
    wait_for(lambda: all(history.latest(source).get(p) == ends[p] for p in taken), 30,
             "B committing its partitions to their end", alive(a, b))
    gate.set()
    wait_for(lambda: committed_to_end(kit, group, source), 60, "every input committed", alive(a, b))
    wait_for(a.is_drained, 30, "A drained", alive(a))
    wait_for(lambda: a.app.report.settled == a.app.report.consumed, 10, "A settling every input it consumed",
             alive(a))
    assert history.backwards() == [], "a partition's commit moved back: sent by A after it gave the partition up"
    a.stop()
    b.stop()
    missing = sorted(set(range(40)) - {o["id"] for o in outputs(kit, sink)})
    assert not missing, f"inputs lost: {missing}"


class Bystander:
    """A plain group member on a thread, subscribed to a topic of its own in the same group: it makes the group
    rebalance (new generation, new member epochs) without ever taking a partition of the workers' topic."""

    def __init__(self, kit: Any, group: str, topic: str, config: dict[str, Any]) -> None:
        from confluent_kafka import Consumer

        self.assigned: list[tuple[str, int]] = []
        self._leave = threading.Event()
        self._consumer = Consumer({"bootstrap.servers": kit.bootstrap, "group.id": group,
                                   "enable.auto.commit": False, **config})
        self._consumer.subscribe([topic], on_assign=lambda _c, parts: self.assigned.extend(
            (tp.topic, tp.partition) for tp in parts))
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        try:
            while not self._leave.is_set():
                self._consumer.poll(0.1)
        finally:
            self._consumer.close()  # leaves the group

    def leave(self) -> None:
        self._leave.set()
        self._thread.join(30)
        assert not self._thread.is_alive(), "the bystander did not leave"


def test_a_member_joining_and_leaving_during_exactly_once_leaves_the_workers_committing(
        kit: Any, ledger: Any, members: Any, group_protocol: str) -> None:
    """Two exactly-once workers share the input; a third member of the same group, on another topic, joins and
    leaves. The workers keep their partitions, but the group's generation (classic) or their member epochs
    (consumer protocol) change under them: the offsets sent with each transaction must carry the current ones,
    or every commit is refused and the batch retried forever. Commits advance while the third member is in the
    group and after it left, and read_committed readers see each output once."""
    source, sink, group = kit.topic("eos-in", PARTITIONS), kit.topic("eos-out", PARTITIONS), kit.unique("eos")
    other = kit.topic("eos-other")
    fast_group(kit, group, group_protocol)
    history = ledger(group)
    # Under the classic protocol only a cooperative assignor leaves the workers' partitions alone when a member
    # joins; under the consumer protocol the broker's assignor does.
    extra = {"partition.assignment.strategy": "cooperative-sticky"} if group_protocol == "classic" else {}
    a, b = (members(make_app(kit, f"eos-{by}", group, source, sink, passing(by), protocol=group_protocol, eos=True,
                             consumer_config=extra, consume_batch_size=20), by) for by in ("a", "b"))
    wait_for(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1, 30, "A and B sharing the input",
             alive(a, b))
    owned = (a.assignment(), b.assignment())

    def phase(ids: range, what: str) -> None:
        seed(kit, source, ids, per_partition=10)
        ends = kit.end_offsets(source, PARTITIONS)  # past each transaction's commit marker: reached once read
        wait_for(lambda: all(history.latest(source).get(p, -1) >= ends[p] - 1 for p in range(PARTITIONS))
                 and committed_to_end(kit, group, source), 60, what, alive(a, b))

    phase(range(100), "the first inputs committed")
    before = history.count(source)
    bystander = Bystander(kit, group, other, {"group.protocol": group_protocol, **extra,
                                              **(CLASSIC_FAST if group_protocol == "classic" else {})})
    try:
        wait_for(lambda: bool(bystander.assigned), 30, "the third member's assignment", alive(a, b))
        phase(range(100, 200), "inputs committed while the third member is in the group")
    finally:
        bystander.leave()
    phase(range(200, 300), "inputs committed after the third member left")
    assert history.count(source) > before
    assert (a.assignment(), b.assignment()) == owned, "the third member took nothing of the workers' input"
    a.stop()
    b.stop()

    ids = Counter(o["id"] for o in outputs(kit, sink))
    assert sorted(ids) == list(range(300)), "every input's output is visible to read_committed readers"
    assert max(ids.values()) == 1, f"duplicates: {[(i, n) for i, n in ids.items() if n > 1][:10]}"
    assert history.backwards() == []


def test_a_zombie_with_the_same_transactional_id_is_fenced_and_stops_and_the_new_worker_finishes_exactly_once(
        kit: Any, ledger: Any, members: Any, gate: threading.Event, group_protocol: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """Worker Z hangs in the middle of a transaction; its replacement W starts with the same
    ``volley.transactional.id`` (a restarted pod with a stable id) and joins the group. W's start fences Z: Z's
    open transaction is aborted by the broker, and when Z's handler returns, its producer is refused. Z stops
    with an error that says it was fenced (kafka.md: a fatal producer error stops the app), and logs it without
    tracebacks or failures to close its producer; W takes every
    partition and finishes; read_committed readers see each input's output once."""
    source, sink, group = kit.topic("zombie-in", PARTITIONS), kit.topic("zombie-out", PARTITIONS), kit.unique("zz")
    fast_group(kit, group, group_protocol)
    history = ledger(group)
    config = {"volley.transactional.id": kit.unique("zombie-txn"), "volley.revoke.timeout.seconds": 2}
    blocked = threading.Event()

    def hangs(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        if message["id"] >= 20 and not blocked.is_set():
            blocked.set()
            gate.wait(90)
        return output(message, msg_ctx, "z")

    z = members(make_app(kit, "zombie-z", group, source, sink, hangs, protocol=group_protocol, eos=True,
                         consumer_config=config, consume_batch_size=5, sync_handler_mode="thread"), "z")
    seed(kit, source, range(20), per_partition=10)
    wait_for(lambda: committed_to_end(kit, group, source), 30, "Z committing the first inputs", alive(z))
    seed(kit, source, range(20, 40), per_partition=10)
    wait_for(blocked.is_set, 30, "Z hanging in a transaction", alive(z))
    w = members(make_app(kit, "zombie-w", group, source, sink, passing("w"), protocol=group_protocol, eos=True,
                         consumer_config=config, consume_batch_size=5), "w")
    wait_for(lambda: bool(w.assignment()), 60, "W's partitions", alive(w))
    gate.set()
    error = z.ended(60)
    assert error is not None, "the fenced worker went on"
    assert "fenced" in str(error).lower(), f"the fenced worker stopped without saying why: {error!r}"
    unclear = [f"{r.name}: {r.getMessage()}" for r in caplog.records if r.name.startswith("volley")
               and (r.exc_info is not None or ("closing" in r.getMessage() and "failed" in r.getMessage()))]
    assert not unclear, f"the fenced worker's stop is logged with tracebacks or failures to close: {unclear}"
    wait_for(lambda: w.assignment() == all_partitions(source), 30, "W owning every partition", alive(w))
    wait_for(lambda: committed_to_end(kit, group, source), 60, "every input committed", alive(w))
    w.stop()

    ids = Counter(o["id"] for o in outputs(kit, sink))
    assert sorted(ids) == list(range(40)), "every input's output is visible to read_committed readers"
    assert max(ids.values()) == 1, f"duplicates: {[(i, n) for i, n in ids.items() if n > 1][:10]}"
    assert {o["by"] for o in outputs(kit, sink) if o["id"] >= 20} <= {"w", "z"}
    assert history.backwards() == []


def test_a_member_stalled_past_max_poll_interval_loses_its_partitions_and_nothing_is_lost(
        kit: Any, ledger: Any, members: Any, gate: threading.Event, group_protocol: str,
        caplog: pytest.LogCaptureFixture) -> None:
    """A's handler blocks its event loop (blocking code in an async handler) longer than ``max.poll.interval.ms``:
    librdkafka takes A out of the group and B gets A's partition. Unblocked, A learns that its partition was lost,
    commits nothing for it (B is further on: a commit would move it back), rejoins, and works on. Every input is
    handled; duplicates only from A's uncommitted work."""
    caplog.set_level(logging.INFO, logger="volley_kafka")  # "partitions ... lost" is an info line
    source, sink, group = kit.topic("lost-in", PARTITIONS), kit.topic("lost-out", PARTITIONS), kit.unique("lost")
    fast_group(kit, group, group_protocol)
    history = ledger(group)
    blocked = threading.Event()

    async def stalls(message: dict[str, Any], msg_ctx: Any) -> list[tuple[str, dict[str, Any]]]:
        if msg_ctx.position == 5 and not blocked.is_set():
            blocked.set()
            gate.wait(90)  # blocks the event loop on purpose: no fetch, no poll
        return output(message, msg_ctx, "a")

    a = members(make_app(kit, "lost-a", group, source, sink, stalls, protocol=group_protocol,
                         consumer_config={"max.poll.interval.ms": 6000}), "a")
    wait_for(lambda: a.assignment() == all_partitions(source), 30, "A's partitions", alive(a))
    b = members(make_app(kit, "lost-b", group, source, sink, passing("b"), protocol=group_protocol), "b")
    wait_for(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1, 30, "A and B sharing the input",
             alive(a, b))
    (_, mine), = a.assignment()
    seed(kit, source, range(40), per_partition=20)
    wait_for(blocked.is_set, 30, "A stalled", alive(a, b))
    ends = kit.end_offsets(source, PARTITIONS)
    wait_for(lambda: history.latest(source).get(mine) == ends[mine], 60,
             "B taking A's partition over and committing it to its end", alive(a, b))
    gate.set()
    wait_for(lambda: any(r.getMessage().endswith(" lost") for r in caplog.records), 30,
             "A learning that its partition was lost", alive(a, b))
    wait_for(lambda: len(a.assignment()) == 1 and len(b.assignment()) == 1, 60, "A back in the group",
             alive(a, b))
    seed(kit, source, range(40, 80), per_partition=20)
    wait_for(lambda: committed_to_end(kit, group, source), 60, "every input committed", alive(a, b))
    assert history.backwards() == [], "a commit moved a partition back: sent by A for its lost partition"
    a.stop()
    b.stop()
    copies = outputs(kit, sink)
    missing = sorted(set(range(80)) - {o["id"] for o in copies})
    assert not missing, f"inputs lost: {missing}"
    assert {o["by"] for o in copies if o["id"] >= 40} == {"a", "b"}, "both members work after A rejoined"


WORKER = Path(__file__).with_name("kafka_worker.py")


def test_a_member_frozen_past_its_session_loses_its_partition_and_commits_nothing_for_it_on_waking(
        kit: Any, ledger: Any, members: Any, worker_processes: list[WorkerProcess], tmp_path: Path,
        group_protocol: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Worker A, a process of its own, is frozen (SIGSTOP: a long GC pause, a suspended VM) past its session:
    the group gives its partition to B. Woken up, A learns that the partition was lost, commits nothing for it
    (B is further on: a commit would move it back), rejoins, and works on. Nothing is lost."""
    source, sink, group = kit.topic("frozen-in", PARTITIONS), kit.topic("frozen-out", PARTITIONS), kit.unique("fz")
    fast_group(kit, group, group_protocol)
    history = ledger(group)
    per_partition = 3000  # A (5 ms an input) is frozen long before it could finish its partition
    seed(kit, source, range(PARTITIONS * per_partition), per_partition=per_partition)
    if group_protocol == "classic":  # the session (and so the freeze) is the member's own
        monkeypatch.setenv("VOLLEY_TEST_CONSUMER_CONFIG", json.dumps(
            {**CLASSIC_FAST, "max.poll.interval.ms": 6000}))
    a = WorkerProcess([sys.executable, str(WORKER), kit.bootstrap, source, sink, group, "-", "0.005", group_protocol],
                      tmp_path / "a.log")
    worker_processes.append(a)
    a.start()

    def a_log() -> str:
        return a.log.read_text(errors="replace")

    wait_for(lambda: "handled its first message" in a_log(), 60, "A's first input", a.ensure_alive)
    b = members(make_app(kit, "frozen-b", group, source, sink, passing("b"), protocol=group_protocol), "b")
    wait_for(lambda: len(b.assignment()) == 1, 60, "A and B sharing the input",
             lambda: (a.ensure_alive(), b.ensure_running()))
    (_, theirs), = b.assignment()
    mine = 1 - theirs
    wait_for(lambda: history.latest(source).get(mine, 0) >= 100, 30, "A committing its first inputs",
             lambda: (a.ensure_alive(), b.ensure_running()))
    assert a.process is not None
    os.kill(a.process.pid, signal.SIGSTOP)
    try:
        frozen_at = history.latest(source)[mine]
        assert frozen_at < per_partition, "A finished its partition before it was frozen"
        wait_for(lambda: history.latest(source).get(mine) == per_partition, 60,
                 "B taking A's partition over and committing it to its end", b.ensure_running)
    finally:
        os.kill(a.process.pid, signal.SIGCONT)
    wait_for(lambda: a_log().rstrip().endswith(" lost") or " lost\n" in a_log(), 60,
             "A learning that its partition was lost", a.ensure_alive)
    wait_for(lambda: len(b.assignment()) == 1, 60, "A back in the group", lambda: (a.ensure_alive(),
                                                                                   b.ensure_running()))
    seed(kit, source, range(PARTITIONS * per_partition, PARTITIONS * per_partition + 100), per_partition=50)
    wait_for(lambda: committed_to_end(kit, group, source), 60, "every input committed",
             lambda: (a.ensure_alive(), b.ensure_running()))
    assert history.backwards() == [], "a commit moved a partition back: sent by A for its lost partition"
    assert a.terminate() == 0, a.tail()
    b.stop()
    missing = sorted(set(range(PARTITIONS * per_partition + 100)) - {o["id"] for o in outputs(kit, sink)})
    assert not missing, f"{len(missing)} inputs lost, first {missing[:10]}"
