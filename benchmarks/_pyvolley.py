"""py-volley 1.3.1 in a virtualenv of its own, for the benchmarks that compare Volley with it.

py-volley's import name is ``volley`` too, so it can never share an environment
with Volley: the benchmarks run it as a subprocess with this venv's python.
The venv is made once, on demand, under the Volley cache directory
(``$VOLLEY_CACHE_DIR``, else ``$XDG_CACHE_HOME/volley``, else
``~/.cache/volley``) as ``bench-pyvolley``, with uv when it is on PATH and
with ``venv`` + pip otherwise. Both the Kafka and the RSMQ extras are
installed so that every benchmark shares the one venv.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

PYVOLLEY_REQUIREMENT = "py-volley[kafka,rsmq]==1.3.1"
VENV_NAME = "bench-pyvolley"


def cache_root() -> Path:
    override = os.environ.get("VOLLEY_CACHE_DIR")
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "volley"


def venv_python(venv: Path) -> Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_pyvolley_venv() -> Path:
    """The venv holding py-volley 1.3.1 (created on first use); run ``venv_python(path)`` in it."""
    venv = cache_root() / VENV_NAME
    marker = venv / ".volley-bench-requirement"
    python = venv_python(venv)
    if python.exists() and marker.exists() and marker.read_text() == PYVOLLEY_REQUIREMENT:
        return venv
    venv.parent.mkdir(parents=True, exist_ok=True)
    print(f"# creating {venv} with {PYVOLLEY_REQUIREMENT} (one time)", file=sys.stderr, flush=True)
    uv = shutil.which("uv")
    if uv is not None:
        subprocess.run([uv, "venv", "--quiet", "--allow-existing", "--python", "3.11", str(venv)], check=True)
        subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), PYVOLLEY_REQUIREMENT], check=True)
    else:
        subprocess.run([sys.executable, "-m", "venv", "--clear", str(venv)], check=True)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        PYVOLLEY_REQUIREMENT], check=True)
    marker.write_text(PYVOLLEY_REQUIREMENT)
    return venv


if __name__ == "__main__":
    print(ensure_pyvolley_venv())
