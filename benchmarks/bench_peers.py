"""Volley against the stream processors a user would pick instead, on the Kafka benchmark's broker and work.

Opt-in (``python3 dev.py bench peers``): it installs each peer in a virtualenv of its own (``_venvs.py``) and
takes several minutes. Each peer is a small program in ``benchmarks/peers/`` that does the same work per message
as Volley (``_orders.work``: Pydantic v2 validation of the JSON bytes into ``Order``, the handler, the dump of
``Enriched`` to JSON bytes, the fastest way Pydantic offers; one output per input) on the same 4-partition
topic, as a subprocess with its venv's python:

- ``quix``: Quix Streams, at-least-once (its default guarantee, a checkpoint every ``commit_interval`` = 5 s);
- ``quix_tuned``: the same with Volley's consumer default for ``fetch.queue.backoff.ms`` (50 ms; librdkafka's,
  which Quix keeps, is 1,000 ms and stalls a consumer that empties its prefetch queue before it is over): what
  ``vs_quix`` owes to that one setting;
- ``quix_eos``: Quix Streams with ``processing_guarantee="exactly-once"`` and ``commit_interval`` set to Volley's
  own transaction interval, measured in the exactly-once Volley run just before it: both make outputs visible to
  a ``read_committed`` reader as often, the fair comparison;
- ``quix_eos_defaults``: both at their defaults. Volley commits a transaction every 100 ms or 10,000 inputs
  (outputs visible within about 100 ms plus the commit, at the price of ten commits a second); Quix
  checkpoints every 5 s (fewer, larger transactions: more throughput, outputs visible up to 5 s late, and a
  failure re-processes up to 5 s of input);
- ``faststream``: FastStream's confluent broker, one message at a time, awaiting each publish, committing after
  each handler (``AckPolicy.ACK``; its default acknowledges on receipt, which is not at-least-once);
- ``faust``: faust-streaming (aiokafka) at its defaults: an agent sends each output; offsets of acknowledged
  events are committed, after a producer flush, every 10,000 events or 2.8 s.

Rounds alternate Volley (the same mode, the same topic) and each peer; medians of ``ROUNDS`` rounds are compared.
Every run is checked: every output written (exactly-once: a ``read_committed`` reader sees each once) and no lag
(the group's committed offsets are the input's end offsets). A peer that fails to install or to run, or fails a
check, prints ``kafka.<peer>: skipped (<why>)`` and the bench goes on. The slow peers (FastStream, faust) read
a smaller topic, ``SMALL_N`` messages, and Volley is measured on the same topic for them.

Prints ``kafka.<peer>_msgs_per_s`` and ``kafka.vs_<peer>`` (Volley / peer; targets: vs_quix >= 2.5,
vs_quix_eos >= 2.0) for quix, quix_eos, quix_eos_defaults, faststream and faust. Each round also runs the
pipelined hand-written ceiling of ``bench_kafka`` on the same topic first: ``kafka.peers_ceiling_pipelined_msgs_per_s``
(median) and ``kafka.ceiling_vs_quix`` (ceiling / Quix at-least-once), the most ``vs_quix`` can reach in that run
unless Volley outruns the hand loop (on a quiet machine it is about 2, under the 2.5 target). ``PEERS_ROUNDS`` and
``PEERS_SMALL_N`` in the environment change the rounds (3) and the slow peers' topic (20,000 messages).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import _kafka_ceilings
import bench_kafka
from _kafka import HERE, Cluster, N, kafka_address, write_model
from _venvs import ensure_venv, venv_python

ROUNDS = int(os.environ.get("PEERS_ROUNDS", "3"))
SMALL_N = int(os.environ.get("PEERS_SMALL_N", "20000"))  # for the peers two orders of magnitude slower than Volley
RUN_TIMEOUT_S = 600.0
CODEC = ["orjson", "pydantic>=2"]  # what every peer's venv has beside the peer itself


@dataclass
class Peer:
    label: str
    venv: str
    requirements: list[str]
    script: str
    messages: int = N
    exactly_once: bool = False
    rates: list[float] = field(default_factory=list)
    volley: list[float] = field(default_factory=list)  # Volley's runs alternating with this peer's
    skipped: str = ""
    version: str = ""
    log: Path = Path(os.devnull)  # the current run's stderr

    def options(self, volley_transaction_s: float) -> list[str]:
        if self.label == "quix_eos":
            return [json.dumps({"processing_guarantee": "exactly-once", "commit_interval": volley_transaction_s})]
        if self.label == "quix_eos_defaults":
            return [json.dumps({"processing_guarantee": "exactly-once"})]
        if self.label == "quix_tuned":
            return [json.dumps({"consumer_extra_config": _kafka_ceilings.FETCH})]
        return []


class PeerError(Exception):
    """The peer did not run to the end, or left work undone: it is skipped with this reason."""


QUIX = ["quixstreams==3.28.1", *CODEC]
PEERS = [
    Peer("quix", "bench-quix", QUIX, "quix.py"),
    Peer("quix_tuned", "bench-quix", QUIX, "quix.py"),
    Peer("quix_eos", "bench-quix", QUIX, "quix.py", exactly_once=True),
    Peer("quix_eos_defaults", "bench-quix", QUIX, "quix.py", exactly_once=True),
    Peer("faststream", "bench-faststream", ["faststream[confluent]==0.7.8", *CODEC], "faststream_peer.py",
         messages=SMALL_N),
    Peer("faust", "bench-faust", ["faust-streaming==0.15.3", *CODEC], "faust_peer.py", messages=SMALL_N),
]


def wait_done(cluster: Cluster, process: subprocess.Popen[str], peer: Peer, group: str, source: str,
              output: str, deadline: float) -> float:
    """Wait until ``output`` holds every output and ``group`` committed all of ``source``; the wall time then."""
    from confluent_kafka import Consumer, TopicPartition

    watcher = Consumer({"bootstrap.servers": cluster.brokers, "group.id": group, "enable.auto.commit": False})
    try:
        ends = cluster.end_offsets(source)
        partitions = [TopicPartition(source, p) for p in range(len(ends))]
        while time.monotonic() < deadline:
            if cluster.count(output) >= peer.messages and ends == [
                    tp.offset for tp in watcher.committed(partitions, timeout=10)]:
                return time.time()
            if process.poll() is not None:
                raise PeerError(f"exited with {process.returncode} before finishing: {tail(peer)}")
            time.sleep(0.05)
        raise PeerError(f"not done in {RUN_TIMEOUT_S:.0f} s: {cluster.count(output)} of {peer.messages} "
                         f"outputs, {cluster.lag(group, source)} input(s) uncommitted")
    finally:
        watcher.close()


def tail(peer: Peer) -> str:
    """The last lines the peer wrote to stderr."""
    lines = [line for line in peer.log.read_text(errors="replace").splitlines() if line.strip()]
    return " | ".join(lines[-3:])[-400:] or "no output"


def result_line(process: subprocess.Popen[str], peer: Peer, deadline: float) -> dict[str, Any]:
    """The peer's first JSON line on stdout (a peer may print a banner before it), by ``deadline``."""
    lines: queue.Queue[str] = queue.Queue()

    def read() -> None:  # a thread: select() on a buffered pipe misses lines already buffered
        assert process.stdout is not None
        for line in process.stdout:
            lines.put(line)
        lines.put("")

    threading.Thread(target=read, name=f"{peer.label}-stdout", daemon=True).start()
    while True:
        try:
            line = lines.get(timeout=max(deadline - time.monotonic(), 0.001))
        except queue.Empty:
            raise PeerError(f"said nothing in {RUN_TIMEOUT_S:.0f} s: {tail(peer)}") from None
        if not line:
            process.wait(30)
            raise PeerError(f"exited with {process.returncode}: {tail(peer)}")
        if "{" in line:  # after whatever terminal codes the peer wrote before it
            result: dict[str, Any] = json.loads(line[line.index("{"):])
            return result


def run_peer(peer: Peer, cluster: Cluster, source: str, workdir: Path, volley_transaction_s: float) -> float:
    """One run of ``peer`` over ``source`` (``peer.messages`` records), checked; its messages per second."""
    python = venv_python(ensure_venv(peer.venv, peer.requirements))
    output = cluster.topic(f"{peer.label.replace('_', '-')}-out")
    group = f"{peer.label.replace('_', '-')}-{uuid.uuid4().hex[:6]}"
    env = {**os.environ, "PYTHONPATH": str(workdir)}
    for name in ("KAFKA_BROKERS", "KAFKA_CONSUMER_GROUP"):
        env.pop(name, None)
    command = [str(python), str(HERE / "peers" / peer.script), cluster.brokers, source, output, group,
               str(peer.messages), *peer.options(volley_transaction_s)]
    peer.log = workdir / f"{peer.label}.stderr"
    with peer.log.open("w") as log:  # a file, not a pipe: a chatty peer never blocks on a full pipe
        process = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=log, text=True)
    deadline = time.monotonic() + RUN_TIMEOUT_S
    try:
        result = result_line(process, peer, deadline)
        peer.version = result.get("version", "")
        if "elapsed" in result:  # the peer stopped by itself after the count-th message, its work committed
            elapsed = float(result["elapsed"])
            if process.wait(60) != 0:
                raise PeerError(f"exited with {process.returncode}: {tail(peer)}")
        else:  # the peer runs on: done when its outputs are out and its inputs committed
            elapsed = wait_done(cluster, process, peer, group, source, output, deadline) - result["first"]
    finally:
        if process.poll() is None:
            process.terminate()
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
    check(peer, cluster, group, source, output)
    return peer.messages / elapsed


def check(peer: Peer, cluster: Cluster, group: str, source: str, output: str) -> None:
    lag = cluster.lag(group, source)
    if lag:
        raise PeerError(f"left {lag} input(s) uncommitted")
    if peer.exactly_once:
        distinct, duplicates = cluster.committed_outputs(output, peer.messages)
        if distinct != peer.messages or duplicates:
            raise PeerError(f"read_committed saw {distinct} of {peer.messages} outputs, {duplicates} duplicate(s)")
    elif (written := cluster.count(output)) < peer.messages:
        raise PeerError(f"wrote {written} of {peer.messages} outputs")


def main() -> None:
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger("volley").setLevel(logging.ERROR)
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="bench-peers-") as tmp, kafka_address() as brokers:
        workdir = Path(tmp)
        write_model(workdir)
        sys.path.insert(0, str(workdir))
        cluster = Cluster(brokers)
        sources = {count: cluster.topic(f"peers-in-{count}") for count in {peer.messages for peer in PEERS}}
        for count, topic in sources.items():
            cluster.seed(topic, count)
        for peer in PEERS:  # install first: an install failure skips the peer, not the round
            try:
                ensure_venv(peer.venv, peer.requirements)
            except (OSError, subprocess.CalledProcessError) as exc:
                peer.skipped = f"install failed: {exc}"
        volley_eos: list[bench_kafka.EosResult] = []
        ceiling: list[float] = []  # the pipelined hand loop on the same topic, once a round, before the peers
        for _ in range(ROUNDS):
            ceiling.append(_kafka_ceilings.pipelined(cluster, sources[N], N))
            volley_cache: dict[tuple[int, bool], float] = {}
            for peer in PEERS:
                if peer.skipped:
                    continue
                source = sources[peer.messages]
                key = (peer.messages, peer.exactly_once)
                if key not in volley_cache:  # one Volley run per mode and topic per round, just before its peers
                    result = bench_kafka.volley_run(cluster, source, peer.messages, exactly_once=peer.exactly_once)
                    if isinstance(result, bench_kafka.EosResult):
                        volley_eos.append(result)
                        if result.duplicates:
                            raise SystemExit(f"Volley exactly-once: {result.duplicates} duplicate(s)")
                        volley_cache[key] = result.rate
                    else:
                        volley_cache[key] = result
                peer.volley.append(volley_cache[key])
                transaction_s = volley_eos[-1].transaction_ms / 1000.0 if volley_eos else 5.0
                try:
                    peer.rates.append(run_peer(peer, cluster, source, workdir, transaction_s))
                    print(f"# {peer.label}: {peer.rates[-1]:.0f} msg/s, Volley {peer.volley[-1]:.0f}", file=sys.stderr,
                          flush=True)
                except (PeerError, OSError, subprocess.SubprocessError, json.JSONDecodeError) as exc:
                    peer.skipped = str(exc) if isinstance(exc, PeerError) else f"{type(exc).__name__}: {exc}"
        print(f"kafka.peers_messages: {N}")
        print(f"kafka.peers_small_messages: {SMALL_N}")
        print(f"kafka.peers_rounds: {ROUNDS}")
        if volley_eos:
            print(f"kafka.peers_volley_eos_transaction_ms: "
                  f"{statistics.median(result.transaction_ms for result in volley_eos):.1f}")
        ceiling_rate = statistics.median(ceiling)
        print(f"kafka.peers_ceiling_pipelined_msgs_per_s: {ceiling_rate:.0f}")
        for peer in PEERS:
            if peer.skipped:
                print(f"kafka.{peer.label}: skipped ({peer.skipped})")
                continue
            if peer.version:
                print(f"kafka.{peer.label}_version: {peer.version}")
            peer_rate, volley_rate = statistics.median(peer.rates), statistics.median(peer.volley)
            print(f"kafka.{peer.label}_messages: {peer.messages}")
            print(f"kafka.{peer.label}_msgs_per_s: {peer_rate:.0f}")
            print(f"kafka.{peer.label}_volley_msgs_per_s: {volley_rate:.0f}")
            print(f"kafka.vs_{peer.label}: {volley_rate / peer_rate:.2f}")
            if peer.messages == N and not peer.exactly_once:
                # How far above this peer any client-side program got in this run: the most vs_<peer> can be
                # without Volley outrunning the hand-written loop.
                print(f"kafka.ceiling_vs_{peer.label}: {ceiling_rate / peer_rate:.2f}")
        print(f"kafka.peers_seconds: {time.monotonic() - started:.0f}")
        cluster.close()  # before the broker stops


if __name__ == "__main__":
    main()
