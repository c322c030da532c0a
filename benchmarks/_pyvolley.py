"""py-volley 1.3.1 in a virtualenv of its own (``_venvs.py``), for the benchmarks that compare Volley with it.

py-volley's import name is ``volley`` too, so it can never share an environment with Volley: the benchmarks
run it as a subprocess with this venv's python. Both the Kafka and the RSMQ extras are installed so that every
benchmark shares the one venv, ``bench-pyvolley``.
"""

from __future__ import annotations

from pathlib import Path

from _venvs import cache_root, ensure_venv, venv_python

PYVOLLEY_REQUIREMENT = "py-volley[kafka,rsmq]==1.3.1"
VENV_NAME = "bench-pyvolley"
__all__ = ["PYVOLLEY_REQUIREMENT", "VENV_NAME", "cache_root", "ensure_pyvolley_venv", "venv_python"]


def ensure_pyvolley_venv() -> Path:
    """The venv holding py-volley 1.3.1 (created on first use); run ``venv_python(path)`` in it."""
    return ensure_venv(VENV_NAME, [PYVOLLEY_REQUIREMENT])


if __name__ == "__main__":
    print(ensure_pyvolley_venv())
