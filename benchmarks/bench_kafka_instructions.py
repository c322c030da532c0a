"""The Python work per message of Volley's Kafka path and of the pipelined ceiling, counted in instructions.

``kafka.efficiency`` compares rates on a real broker, and on this 2-core machine the broker, librdkafka's
threads and the machine's other load move those rates by tens of percent between runs (the ceilings more than
Volley). This area counts instead, with valgrind (cachegrind), the instructions each program executes per
message when librdkafka is replaced by an in-process fake (``_kafka_fake.py``): the same two programs as
``bench_kafka.py`` (``volley_run``, Volley with its ``confluent`` profile and defaults, and
``_kafka_ceilings.pipelined``), the same records, model and per-message work. Each count is the difference
between a process handling COUNT_HIGH and one handling COUNT_LOW messages (start-up, imports and warm-up cancel
out), less the same difference for a process that only builds the records (``data``).

Prints ``kafka.instructions_per_msg_volley``, ``kafka.instructions_per_msg_pipelined`` and
``kafka.efficiency_instructions`` (pipelined / Volley: what ``kafka.efficiency`` would be if the Python work
alone decided it; the target of ``kafka.efficiency`` is >= 0.85). Without valgrind it prints why and ends.
The counts still move by a few hundred instructions per message between runs (thread scheduling changes how
many messages share a batch).
"""

from __future__ import annotations

import logging
import shutil
import sys
import tempfile
from pathlib import Path

import _instructions

COUNT_LOW = 4_000
COUNT_HIGH = 16_000
POOL = 1_000  # distinct payloads, repeated: building the records costs the same in every mode


def counted(mode: str, n: int) -> None:
    """One process's work: build the records, then run ``mode`` over them (``data``: nothing more)."""
    import _kafka_fake

    _kafka_fake.install()
    import _kafka_ceilings
    import bench_kafka
    from _kafka import write_model
    from _orders import payloads

    logging.basicConfig(level=logging.ERROR)
    logging.getLogger("volley").setLevel(logging.ERROR)
    with tempfile.TemporaryDirectory(prefix="bench-kafka-instr-") as tmp:
        write_model(Path(tmp))
        sys.path.insert(0, tmp)
        cluster = _kafka_fake.FakeCluster()
        source = cluster.topic("in")
        pool = payloads(POOL)
        cluster.seed(source, [pool[i % POOL] for i in range(n)])
        if mode == "volley":
            bench_kafka.volley_run(cluster, source, n)  # type: ignore[arg-type]
        elif mode == "pipelined":
            _kafka_ceilings.pipelined(cluster, source, n)  # type: ignore[arg-type]
        elif mode != "data":
            raise SystemExit(f"unknown mode {mode!r}")


def main() -> None:
    if sys.argv[1:2] == ["--count"]:
        counted(sys.argv[2], int(sys.argv[3]))
        return
    valgrind = shutil.which("valgrind")
    if valgrind is None:
        print("kafka.instructions_skipped: valgrind is not installed (apt-get install valgrind)")
        return
    per = _instructions.per_message(valgrind, __file__, ("data", "volley", "pipelined"), COUNT_LOW, COUNT_HIGH)
    volley, pipelined = per["volley"] - per["data"], per["pipelined"] - per["data"]
    print(f"kafka.instructions_messages: {COUNT_HIGH - COUNT_LOW}")
    print(f"kafka.instructions_per_msg_volley: {volley:.0f}")
    print(f"kafka.instructions_per_msg_pipelined: {pipelined:.0f}")
    print(f"kafka.efficiency_instructions: {pipelined / volley:.3f}")


if __name__ == "__main__":
    main()
