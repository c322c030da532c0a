"""Virtualenvs of their own for the programs the benchmarks compare Volley with.

A peer (py-volley, whose import name is ``volley`` too; Quix Streams; FastStream; faust-streaming) can never
share Volley's environment: each gets a venv, made once on demand under the Volley cache directory
(``$VOLLEY_CACHE_DIR``, else ``$XDG_CACHE_HOME/volley``, else ``~/.cache/volley``), with uv when it is on
PATH and with ``venv`` + pip otherwise, and the benchmarks run it as a subprocess with that venv's python.
A marker file holds the requirements the venv was made with: changing them makes it anew.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path


def cache_root() -> Path:
    override = os.environ.get("VOLLEY_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "volley"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(name: str, requirements: Sequence[str], python_version: str = "3.11") -> Path:
    """The venv ``name`` holding ``requirements`` (created on first use); run ``venv_python(path)`` in it.

    Raises ``subprocess.CalledProcessError`` when the install fails (the caller says what it skips).
    """
    venv = cache_root() / name
    marker = venv / ".volley-bench-requirement"
    wanted = "\n".join(requirements)
    python = venv_python(venv)
    if python.exists() and marker.exists() and marker.read_text() == wanted:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"# creating {venv} with {' '.join(requirements)} (one time)", file=sys.stderr, flush=True)
    uv = shutil.which("uv")
    if uv is not None:
        subprocess.run([uv, "venv", "--quiet", "--allow-existing", "--python", python_version, str(venv)],
                       check=True)
        subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), *requirements], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *requirements], check=True)
    marker.write_text(wanted)
    return venv
