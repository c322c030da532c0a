"""One version for the suite: VERSION at the root, read by every distribution, and volley-core ranges that hold it.

A distribution added later (packages/volley-otel, ...) is covered as soon as it has a pyproject.toml.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from importlib import metadata
from pathlib import Path
from typing import Any

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

ROOT = Path(__file__).resolve().parents[2]
VERSION = (ROOT / "VERSION").read_text().strip()
PACKAGES = sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))
SUITE = {p.name for p in PACKAGES}


def pyproject(package: Path) -> dict[str, Any]:
    return tomllib.loads((package / "pyproject.toml").read_text())


def next_minor(version: str) -> Version:
    v = Version(version)
    return Version(f"{v.major}.{v.minor + 1}")


def test_the_version_file_holds_one_release_version() -> None:
    assert re.fullmatch(r"\d+\.\d+\.\d+((a|b|rc)\d+)?", VERSION), VERSION
    assert str(Version(VERSION)) == VERSION


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_each_distribution_reads_its_version_from_the_version_file(package: Path) -> None:
    data = pyproject(package)
    assert "version" not in data["project"], "a static version would drift from VERSION"
    assert "version" in data["project"].get("dynamic", [])
    assert data["build-system"]["build-backend"] == "hatchling.build"
    source = data["tool"]["hatch"]["version"]
    assert (package / source["path"]).resolve() == ROOT / "VERSION"
    assert re.search(source["pattern"], f"{VERSION}\n", flags=re.MULTILINE)["version"] == VERSION
    # uv reuses an editable build until a cache key changes: VERSION must be one, or a bump goes unseen.
    keys = [key.get("file") for key in data["tool"]["uv"]["cache-keys"]]
    assert "pyproject.toml" in keys and source["path"] in keys


def _suite_requirements(package: Path) -> list[Requirement]:
    project = pyproject(package)["project"]
    texts = list(project.get("dependencies", []))
    for extra in project.get("optional-dependencies", {}).values():
        texts += extra
    return [r for r in map(Requirement, texts) if r.name in SUITE]


@pytest.mark.parametrize("package", [p for p in PACKAGES if p.name != "volley-core"], ids=lambda p: p.name)
def test_each_adapter_declares_the_volley_core_range_it_supports(package: Path) -> None:
    requirements = _suite_requirements(package)
    assert "volley-core" in {r.name for r in requirements}, f"{package.name} must depend on volley-core"
    for requirement in requirements:
        assert requirement.specifier, f"{package.name}: {requirement} has no version range"
        assert requirement.specifier.contains(VERSION), f"{package.name}: {requirement} excludes {VERSION}"
        assert not requirement.specifier.contains(next_minor(VERSION)), (
            f"{package.name}: {requirement} admits the next minor release, whose API it was not built against"
        )


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_the_installed_metadata_agrees_with_the_version_file(package: Path) -> None:
    try:
        installed = metadata.version(package.name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{package.name} is not installed in this environment")
    assert installed == VERSION, f"{package.name} installed as {installed}: reinstall it (VERSION says {VERSION})"


def test_volley_version_prints_the_core_version() -> None:
    done = subprocess.run([sys.executable, "-m", "volley.cli", "--version"], capture_output=True, text=True,
                          timeout=60, check=True)
    assert done.stdout.startswith(f"volley-core {VERSION} "), done.stdout
    import volley

    assert volley.__version__ == VERSION


def test_volley_plugins_shows_each_distribution_with_its_version_and_core_range() -> None:
    done = subprocess.run([sys.executable, "-m", "volley.cli", "plugins"], capture_output=True, text=True,
                          timeout=60, check=True)
    lines = done.stdout.splitlines()
    section = lines[lines.index("distributions:") + 1:lines.index("connectors:")]
    rows = {line.split()[0]: line.split()[1:] for line in section}
    assert rows["volley-core"] == [VERSION], done.stdout
    for name, rest in rows.items():
        if name in SUITE and name != "volley-core":
            assert rest[0] == VERSION and rest[1] == "needs", done.stdout
            assert Requirement(rest[2]).specifier.contains(VERSION), done.stdout


def test_the_changelog_has_a_section_for_this_version() -> None:
    changelog = (ROOT / "CHANGELOG.md").read_text()
    assert re.search(rf"^## \[?{re.escape(VERSION)}\]?", changelog, flags=re.MULTILINE), (
        f"CHANGELOG.md has no '## {VERSION}' section"
    )
