"""Every developer task. ``python3 dev.py`` bootstraps nox and uv and calls these sessions."""

from __future__ import annotations

import os
import shutil
import time
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
    "volley-otel": "sdk",
    "volley-sqlite": "pydantic",
}


def _editables() -> list[str]:
    args: list[str] = []
    for dist, extras in EXTRAS.items():
        path = PACKAGES / dist
        if (path / "pyproject.toml").exists():
            args += ["-e", f"{path}[{extras}]" if extras else str(path)]
    return args


def _distributions() -> list[Path]:
    return sorted(p.parent for p in PACKAGES.glob("*/pyproject.toml"))


def _version() -> str:
    return (ROOT / "VERSION").read_text().strip()


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
                "'confluent_kafka','rsmq','redis','prometheus_client','opentelemetry') if u.find_spec(m)]; "
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


OPT_IN_BENCHMARKS = {"peers"}  # minutes long, and they install third-party frameworks: run when named


@nox.session(python="3.11")
def bench(session: nox.Session) -> None:
    """Benchmarks: each benchmarks/bench_*.py prints `name: value` lines.

    `-- AREA...` runs only those; the opt-in areas (peers: Volley against Quix Streams, FastStream and
    faust-streaming, each installed in a venv of its own) run only when named: `python3 dev.py bench peers`.
    """
    session.install(*_editables(), "orjson", "pydantic>=2")
    only = session.posargs
    for script in sorted((ROOT / "benchmarks").glob("bench_*.py")):
        area = script.stem.removeprefix("bench_")
        if (only and area not in only) or (not only and area in OPT_IN_BENCHMARKS):
            continue
        started = time.monotonic()
        session.run("python", str(script), env={"PYTHONPATH": str(ROOT / "tools")})
        print(f"bench.{area}_seconds: {time.monotonic() - started:.0f}", flush=True)  # the 25-minute budget


@nox.session(python="3.11")
def docs(session: nox.Session) -> None:
    """The documentation site, built with --strict."""
    if not (ROOT / "mkdocs.yml").exists():
        session.skip("no mkdocs.yml yet")
    session.install("mkdocs-material>=9", "mkdocs>=1.6")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))
    # What --strict does not check: code lines within the column, links into the repository, the sitemap, the
    # 404 page under a sub-path, the diagrams drawn at build time.
    session.run("python", str(ROOT / "tools" / "docs" / "check_site.py"), str(ROOT / "site"))


@nox.session(python="3.11")
def build(session: nox.Session) -> None:
    """An sdist and a wheel of every distribution into dist/ (each wheel built from its sdist), their metadata
    checked with twine, and each wheel installed alone into a clean virtualenv and imported."""
    dist = ROOT / "dist"
    shutil.rmtree(dist, ignore_errors=True)
    session.install("twine>=5")
    for package in _distributions():
        session.run("uv", "build", "--quiet", "--out-dir", str(dist), str(package), external=True)
    session.run("twine", "check", "--strict", *sorted(str(p) for p in [*dist.glob("*.whl"), *dist.glob("*.tar.gz")]))
    session.run("python", str(ROOT / "tools" / "release" / "check_wheels.py"), str(dist))


# What the wheel_tests session runs against the installed wheels: the tests that notice a file missing from a
# wheel (entry points and plugin discovery, py.typed, the RSMQ Lua scripts on a real redis-server, the Grafana
# dashboard as package data), kept to well under a minute.
WHEEL_TESTS = [
    "tests/release",
    "tests/core/test_plugins.py",
    "tests/prometheus/test_dashboard.py",
    "tests/rsmq/test_adapter.py::test_produce_consume_ack_round_trip",
    "tests/rsmq/test_adapter.py::test_nack_with_reason_comes_back_as_last_error_header",
]


@nox.session(python="3.11")
def wheel_tests(session: nox.Session) -> None:
    """Tests against the wheels in dist/ (python3 dev.py build), installed like a user would, not the source tree."""
    dist = ROOT / "dist"
    version = _version()
    names = [p.name for p in _distributions()]
    missing = [n for n in names if not list(dist.glob(f"{n.replace('-', '_')}-{version}-*.whl"))]
    if missing:
        session.error(f"no {version} wheel in dist/ for {', '.join(missing)}: run python3 dev.py build first")
    requirements = [f"{n}[{EXTRAS[n]}]=={version}" if EXTRAS.get(n) else f"{n}=={version}" for n in names]
    # --reinstall-package: a reused virtualenv must not keep an earlier build of the same version; and
    # --refresh-package: nor may uv's cache, which knows wheels by name and version.
    reinstall = [arg for n in names for opt in ("--reinstall-package", "--refresh-package") for arg in (opt, n)]
    session.install("--find-links", str(dist), *reinstall, *requirements, *TEST_TOOLS)
    tests = [t for t in WHEEL_TESTS if (ROOT / t.split("::", 1)[0]).exists()]
    session.run("python", "-m", "pytest", *(session.posargs or tests), "-q", "-p", "no:cacheprovider",
                env={"VOLLEY_FROM_WHEELS": str(dist)})


@nox.session(python="3.11")
def docs_browser(session: nox.Session) -> None:
    """The built site in headless Chromium at phone to desktop widths (tools/docs/browser_check.py). Needs a
    Chromium on the machine (Debian: apt-get install chromium); not part of CI."""
    session.install("mkdocs-material>=9", "mkdocs>=1.6", "playwright>=1.40")
    session.run("mkdocs", "build", "--strict", "--site-dir", str(ROOT / "site"))
    session.run("python", str(ROOT / "tools" / "docs" / "check_site.py"), str(ROOT / "site"))
    session.run("python", str(ROOT / "tools" / "docs" / "browser_check.py"), str(ROOT / "site"))
