"""Instructions per message, counted by valgrind (cachegrind): what ``bench_core`` and ``bench_kafka_instructions``
share. A script counted this way runs its work when called as ``script --count MODE N [EXTRA...]``."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def per_message(valgrind: str, script: str, modes: Sequence[str], low: int, high: int,
                extra: Sequence[str] = ()) -> dict[str, float]:
    """For each mode, the instructions of a process handling ``high`` messages less those of one handling ``low``,
    per message: start-up, imports and warm-up cancel out. The two processes of a mode run side by side."""

    def launch(mode: str, count: int) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [valgrind, "--tool=cachegrind", "--cache-sim=no", "--cachegrind-out-file=/dev/null", sys.executable,
             script, "--count", mode, str(count), *extra],
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)

    def refs(process: subprocess.Popen[str]) -> int:
        _, err = process.communicate(timeout=1800)
        found = re.search(r"I\s+refs:\s+([\d,]+)", err)
        if process.returncode != 0 or found is None:
            raise SystemExit(f"{Path(script).stem}: counting instructions failed ({process.returncode}):\n"
                             f"{err[-3000:]}")
        return int(found.group(1).replace(",", ""))

    per: dict[str, float] = {}
    for mode in modes:
        lower, higher = launch(mode, low), launch(mode, high)
        per[mode] = (refs(higher) - refs(lower)) / (high - low)
    return per
