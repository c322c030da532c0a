#!/usr/bin/env python3
"""One entry point for developers and CI: ``python3 dev.py demo`` and ``python3 dev.py test``.

It needs nothing but Python 3.11: it makes a private virtualenv (.venv-dev)
with nox and uv, then runs the nox sessions that install everything else
(packages, test tools, the Kafka broker's jars, redis-server) by themselves.

    python3 dev.py demo        # the two-node demo on the embedded in-memory broker
    python3 dev.py test        # the whole test suite (core alone, then everything on real servers)
    python3 dev.py check       # ruff + mypy --strict
    python3 dev.py bench       # the benchmarks (name: value lines)
    python3 dev.py build       # sdists and wheels of every distribution into dist/, checked
    python3 dev.py docs        # the documentation site into site/
    python3 dev.py nox -s ...  # any nox session
"""

from __future__ import annotations

import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
TOOLS = ROOT / ".venv-dev"
BIN = TOOLS / ("Scripts" if os.name == "nt" else "bin")
REQUIREMENTS = ["nox==2026.10.20", "uv==0.13.9"]
SHORTCUTS = {
    "demo": ["-s", "demo"],
    "test": ["-s", "core_only", "tests"],
    "check": ["-s", "lint", "typecheck"],
    "bench": ["-s", "bench"],
    "docs": ["-s", "docs"],
    "build": ["-s", "build"],
}


def ensure_tools() -> None:
    marker = TOOLS / ".requirements"
    wanted = "\n".join(REQUIREMENTS)
    if marker.exists() and marker.read_text() == wanted:
        return
    if not (BIN / "python").exists():
        print("dev.py: creating .venv-dev with nox and uv (one time)", flush=True)
        venv.create(TOOLS, with_pip=True)
    subprocess.run([str(BIN / "python"), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                    *REQUIREMENTS], check=True)
    marker.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help"}:
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    if command == "nox":
        nox_args = rest
    elif command in SHORTCUTS:
        nox_args = [*SHORTCUTS[command], *(["--", *rest] if rest else [])]
    else:
        print(f"dev.py: unknown command {command!r}; use one of {', '.join([*SHORTCUTS, 'nox'])}", file=sys.stderr)
        return 2
    ensure_tools()
    env = dict(os.environ)
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"
    return subprocess.call([str(BIN / "nox"), "--default-venv-backend", "uv", *nox_args], cwd=ROOT, env=env)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
