"""Every developer task. ``python3 dev.py`` bootstraps nox and uv and calls these sessions."""

from __future__ import annotations

import os
from pathlib import Path

import nox

ROOT = Path(__file__).parent
PACKAGES = ROOT / "packages"
nox.options.default_venv_backend = "uv"
nox.options.reuse_existing_virtualenvs = True
nox.options.sessions = ["core_only", "tests", "lint", "typecheck"]

TEST_TOOLS = ["pytest>=8", "pytest-asyncio>=0.24", "hypothesis>=6.100", "pytest-timeout>=2.3"]
# Extras to install per distribution, when the distribution exists in this checkout.
EXTRAS = {
    "volley-core": "yaml,testing",
    "volley-serializers": "orjson,msgpack,pydantic",
    "volley-kafka": "",
    "volley-rsmq": "",
    "volley-prometheus": "",
    "volley-sqlite": "pydantic",
}


def _editables() -> list[str]:
    args: list[str] = []
    for dist, extras in EXTRAS.items():
        path = PACKAGES / dist
        if (path / "pyproject.toml").exists():
            args += ["-e", f"{path}[{extras}]" if extras else str(path)]
    return args


def _sources() -> list[str]:
    return [str(p / "src") for p in sorted(PACKAGES.iterdir()) if (p / "src").is_dir()]


@nox.session(python="3.11")
def tests(session: nox.Session) -> None:
    """The whole suite, every distribution installed, Kafka and Redis started by the test tooling."""
    session.install(*_editables(), *TEST_TOOLS)
    args = session.posargs or []
    session.run("python", "-m", "pytest", *args, env={"PYTHONFAULTHANDLER": "1"})


@nox.session(python="3.11")
def core_only(session: nox.Session) -> None:
    """volley-core installed alone (built as a wheel): its tests prove it needs nothing undeclared."""
    session.install(f"{PACKAGES / 'volley-core'}[testing,yaml]", "pytest>=8", "pytest-asyncio>=0.24",
                    "pytest-timeout>=2.3")
    session.run("python", "-c", "import importlib.util as u, sys; bad=[m for m in ('pydantic','orjson','msgpack',"
                "'confluent_kafka','rsmq','redis','prometheus_client') if u.find_spec(m)]; "
                "sys.exit(f'unexpected packages in the core-only env: {bad}' if bad else 0)")
    session.run("python", "-m", "pytest", "tests/core", "tests/contract", "-p", "no:cacheprovider",
                *session.posargs)


@nox.session(python="3.11")
def demo(session: nox.Session) -> None:
    """The two-node demo on the embedded in-memory broker, with volley-core alone."""
    session.install(str(PACKAGES / "volley-core"))
    session.run("volley", "demo")


@nox.session(python="3.11")
def lint(session: nox.Session) -> None:
    session.install("ruff>=0.8")
    session.run("ruff", "check", ".")


@nox.session(python="3.11")
def typecheck(session: nox.Session) -> None:
    """mypy --strict on every distribution's src."""
    session.install(*_editables(), "mypy>=1.13", "types-PyYAML", "pytest>=8", "hypothesis>=6.100")
    for src in _sources():
        session.run("mypy", "--strict", src, env={"MYPYPATH": os.pathsep.join(_sources())})
    # The adapters satisfy the ports: proven structurally by the type checker.
    session.run("mypy", "--strict", "tests/typing", env={"MYPYPATH": os.pathsep.join(_sources())})


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks: each benchmarks/bench_*.py prints `name: value` lines."""
    session.install(*_editables(), "orjson", "pydantic>=2")
    only = session.posargs
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        area = script.stem.removeprefix("bench_")
        if only and area not in only:
            continue
        session.run("python", str(script), env={"PYTHONPATH": str(ROOT / "tools")})


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The documentation site, built with --strict."""
    if not (ROOT / "mkdocs.yml").exists():
        session.skip("no mkdocs.yml yet")
    session.install("mkdocs-material>=9", "mkdocs>=1.6")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))
