"""Install each built wheel alone into a clean virtualenv and import it: a wheel that needs an undeclared
dependency, lacks a module, ``py.typed`` or its ``volley`` entry point fails here, not on a user's machine.

    python tools/release/check_wheels.py [dist]

Each wheel gets a fresh virtualenv (``uv venv``) and ``uv pip install WHEEL --find-links dist``: its declared
dependencies come from the index, except the suite's own (volley-core, volley-serializers, ...), which exist
only in dist/ until they are published. Every suite distribution in that virtualenv must then be the one built
here (the version in VERSION), and the wheel's plugin must register itself through its entry point.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

# Run inside each virtualenv: what the wheel brought, as JSON, or an exception that names what is missing.
PROBE = r"""
import importlib, json, sys
from importlib import metadata
dist_name, tops = sys.argv[1], sys.argv[2:]
for top in tops:
    importlib.import_module(top)
dist = metadata.distribution(dist_name)
files = [str(f) for f in dist.files or []]
points = [ep.value for ep in dist.entry_points if ep.group == "volley"]
for ep in dist.entry_points:
    if ep.group == "volley":
        ep.load()
from volley.plugins import build_registry
registry = build_registry()
suite = {d.metadata["Name"]: d.version for d in metadata.distributions()
         if d.metadata["Name"].startswith("volley-")}
print(json.dumps({"files": files, "entry_points": points, "registered": sorted(registry.distributions()),
                  "suite": suite}))
"""


def wheel_name_and_tops(wheel: Path) -> tuple[str, list[str]]:
    """The distribution's name (from METADATA) and its top-level import packages (from the wheel's files)."""
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        metadata_file = next(n for n in names if n.endswith(".dist-info/METADATA"))
        text = archive.read(metadata_file).decode()
    name = next(line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("Name:"))
    tops = sorted({n.split("/", 1)[0] for n in names if "/" in n and n.split("/", 1)[1].endswith("__init__.py")
                   and n.split("/", 1)[1].count("/") == 0})
    return name, tops


def check(wheel: Path, dist: Path, version: str, uv: str, suite: list[str]) -> list[str]:
    """Problems found with one wheel (empty when it is fine)."""
    name, tops = wheel_name_and_tops(wheel)
    if not tops:
        return [f"{wheel.name}: no importable package in the wheel"]
    with tempfile.TemporaryDirectory(prefix="volley-wheel-") as tmp:
        venv = Path(tmp) / "venv"
        subprocess.run([uv, "venv", "--quiet", "--python", sys.executable, str(venv)], check=True)
        python = venv / "bin" / "python"
        # --refresh-package: uv caches wheels by name and version, and a rebuilt wheel keeps both; without it a
        # stale volley-core from an earlier build could be installed beside this one.
        refresh = [arg for name in suite for arg in ("--refresh-package", name)]
        installed = subprocess.run([uv, "pip", "install", "--quiet", "--python", str(python), *refresh,
                                    "--find-links", str(dist), str(wheel)], check=False, capture_output=True,
                                   text=True)
        if installed.returncode:
            return [f"{wheel.name}: does not install alone:\n{installed.stderr.strip()}"]
        probe = subprocess.run([str(python), "-I", "-c", PROBE, name, *tops], check=False, capture_output=True,
                               text=True, cwd=tmp)  # -I and a neutral cwd: nothing of the source tree can be imported
        if probe.returncode:
            return [f"{wheel.name}: does not import with only its declared dependencies:\n{probe.stderr.strip()}"]
    found = json.loads(probe.stdout)
    problems = [f"{wheel.name}: {top}/py.typed is missing (type checkers would ignore the package)"
                for top in tops if f"{top}/py.typed" not in found["files"]]
    if not found["entry_points"]:
        problems.append(f"{wheel.name}: no [project.entry-points.volley] entry: Volley would never load it")
    elif name not in found["registered"]:
        problems.append(f"{wheel.name}: its plugin registered nothing (registered: {found['registered']})")
    for other, other_version in found["suite"].items():
        if other_version != version:
            problems.append(f"{wheel.name}: pulled in {other} {other_version}, not the {version} built in dist/")
    return problems


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dist", nargs="?", type=Path, default=ROOT / "dist")
    args = parser.parse_args(argv)
    dist = args.dist.resolve()
    version = (ROOT / "VERSION").read_text().strip()
    uv = shutil.which("uv")
    if uv is None:
        print("check_wheels: uv is not on PATH (python3 dev.py build provides it)", file=sys.stderr)
        return 2
    wheels = sorted(dist.glob(f"*-{version}-*.whl"))
    packages = sorted(p.parent.name for p in (ROOT / "packages").glob("*/pyproject.toml"))
    built = {wheel_name_and_tops(w)[0] for w in wheels}
    problems = [f"no wheel of {p} {version} in {dist}" for p in packages if p not in built]
    with ThreadPoolExecutor(max_workers=2) as pool:
        checked = pool.map(lambda w: check(w, dist, version, uv, packages), wheels)
        for wheel, found in zip(wheels, checked, strict=True):
            print(f"{'FAIL' if found else 'ok  '} {wheel.name}", flush=True)
            problems += found
    for problem in problems:
        print(f"check_wheels: {problem}", file=sys.stderr)
    print(f"check_wheels: {len(wheels)} wheels, {len(problems)} problems")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
