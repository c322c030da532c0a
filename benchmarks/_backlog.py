"""Memory under overload: the peak RSS of one Volley worker process facing a backlog of 100,000 and of 1,000,000.

The backlog lives in a SQLite queue file (``volley_sqlite``), not in the measured process: the bench writes it in
bulk, then starts ``volley run _backlog_app:app`` as a subprocess with a slow handler (1 ms per message, on the
handler thread), lets it work for ``BACKLOG_SECONDS`` after its first output (its fetch-ahead buffer is full
within the first moments), stops it with SIGTERM and checks that nothing was lost: every input is either still
in the queue or has its output, and the worker holds nothing. The RSS is read from ``/proc/<pid>/status``
(``VmHWM``: the peak; ``VmRSS`` sampled every 0.2 s) just before the stop.

Bounded memory means the same peak for both backlogs: ``core.peak_rss_backlog_ratio`` (1,000,000 / 100,000)
within 10% of 1. ``core.rss_growth_mb_backlog``: VmRSS at the end minus VmRSS a third into the window (the
1,000,000 run): what keeps growing with the traffic handled. ``bench_core.py`` prints these; run alone:
``python benchmarks/_backlog.py`` (about 1.5 minutes).
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SECONDS = float(os.environ.get("BACKLOG_SECONDS", "20"))
HANDLER_SECONDS = 0.001
CHUNK = 100_000


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS and VmHWM (peak) of a live process, in kB."""
    found: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if name in ("VmRSS", "VmHWM"):
            found[name] = int(value.split()[0])
    return found


def fill(path: Path, count: int) -> None:
    """``count`` orders into the queue ``orders`` of ``path``, in transactions of CHUNK rows."""
    from _orders import payloads

    from volley_sqlite import admin

    bodies = payloads(min(count, CHUNK))
    for start in range(0, count, CHUNK):
        admin.publish(path, "orders", bodies[:min(CHUNK, count - start)])


class Measured:
    def __init__(self, backlog: int, peak_mb: float, growth_mb: float, handled: int, fill_seconds: float) -> None:
        self.backlog, self.peak_mb, self.growth_mb, self.handled = backlog, peak_mb, growth_mb, handled
        self.fill_seconds = fill_seconds


def measure(backlog: int, directory: Path) -> Measured:
    from volley_sqlite import admin

    path = directory / f"backlog-{backlog}.sqlite3"
    started = time.perf_counter()
    fill(path, backlog)
    filled = time.perf_counter() - started
    log = directory / f"worker-{backlog}.log"
    env = {**os.environ, "BACKLOG_DB": str(path), "BACKLOG_HANDLER_SECONDS": str(HANDLER_SECONDS),
           "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")])}
    with log.open("wb") as out:
        worker = subprocess.Popen([sys.executable, "-m", "volley.cli", "--log-level", "WARNING", "run",
                                   "_backlog_app:app"], cwd=HERE, env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + 120
        while not admin.stats(path).get("enriched", {}).get("ready"):
            if worker.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"backlog worker produced nothing:\n{log.read_text()[-3000:]}")
            time.sleep(0.1)
        window_start = time.monotonic()
        samples: list[tuple[float, int]] = []
        while (now := time.monotonic()) < window_start + SECONDS:
            if worker.poll() is not None:
                raise SystemExit(f"backlog worker exited:\n{log.read_text()[-3000:]}")
            samples.append((now - window_start, memory_kb(worker.pid)["VmRSS"]))
            time.sleep(0.2)
        peak = memory_kb(worker.pid)["VmHWM"]
        worker.send_signal(signal.SIGTERM)
        if worker.wait(60) != 0:
            raise SystemExit(f"backlog worker exited with {worker.returncode}:\n{log.read_text()[-3000:]}")
    finally:
        if worker.poll() is None:
            worker.kill()
            worker.wait()
    stats = admin.stats(path)
    inputs, outputs = stats["orders"], stats["enriched"]
    if inputs["held"] or inputs["delayed"] or inputs["ready"] + outputs["ready"] != backlog:
        raise SystemExit(f"backlog run of {backlog} lost or kept messages: {stats}")
    early = next(rss for at, rss in samples if at >= SECONDS / 3)
    path.unlink()
    return Measured(backlog, peak / 1024, (samples[-1][1] - early) / 1024, outputs["ready"], filled)


def backlog_figures() -> list[str]:
    """The ``name: value`` lines, the small backlog measured first."""
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        small, large = (measure(count, Path(tmp)) for count in (100_000, 1_000_000))
    return [
        f"core.backlog_seconds: {SECONDS:.0f}",
        f"core.backlog_handled: {large.handled}",
        f"core.backlog_fill_seconds: {large.fill_seconds:.1f}",
        f"core.peak_rss_mb_backlog_100k: {small.peak_mb:.1f}",
        f"core.peak_rss_mb_backlog: {large.peak_mb:.1f}",
        f"core.peak_rss_backlog_ratio: {large.peak_mb / small.peak_mb:.3f}",
        f"core.peak_rss_backlog_bounded: {abs(large.peak_mb / small.peak_mb - 1) <= 0.10}",
        f"core.rss_growth_mb_backlog: {large.growth_mb:.1f}",
    ]


if __name__ == "__main__":
    sys.path.insert(0, str(HERE))
    for line in backlog_figures():
        print(line, flush=True)
