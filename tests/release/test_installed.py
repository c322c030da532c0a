"""What the installed distributions carry: entry points, py.typed, their plugins registering.

Under the tests session these are the editable installs; under ``wheel_tests`` (VOLLEY_FROM_WHEELS set) they are
the wheels in dist/, and the test also checks that nothing comes from the source tree.
"""

from __future__ import annotations

import importlib
import os
from importlib import metadata
from pathlib import Path

import pytest

from volley.plugins import build_registry

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = sorted(p.parent for p in (ROOT / "packages").glob("*/pyproject.toml"))


def installed(package: Path) -> metadata.Distribution:
    try:
        return metadata.distribution(package.name)
    except metadata.PackageNotFoundError:
        pytest.skip(f"{package.name} is not installed in this environment")


def import_names(package: Path) -> list[str]:
    return sorted(p.name for p in (package / "src").iterdir() if (p / "__init__.py").exists())


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_each_distribution_declares_a_volley_entry_point_that_registers_it(package: Path) -> None:
    dist = installed(package)
    points = [ep for ep in dist.entry_points if ep.group == "volley"]
    assert len(points) == 1, f"{package.name}: volley entry points {points}"
    assert points[0].load().__name__ == points[0].value
    assert package.name in build_registry().distributions()


@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_each_package_is_marked_typed(package: Path) -> None:
    installed(package)
    for name in import_names(package):
        module = importlib.import_module(name)
        assert module.__file__ is not None
        assert (Path(module.__file__).parent / "py.typed").is_file(), f"{name} lacks py.typed"


@pytest.mark.skipif(not os.environ.get("VOLLEY_FROM_WHEELS"), reason="only against installed wheels")
@pytest.mark.parametrize("package", PACKAGES, ids=lambda p: p.name)
def test_the_wheels_not_the_source_tree_are_under_test(package: Path) -> None:
    dist = installed(package)
    assert dist.version == (ROOT / "VERSION").read_text().strip()
    for name in import_names(package):
        module = importlib.import_module(name)
        assert module.__file__ is not None
        source = ROOT / "packages"
        assert not Path(module.__file__).resolve().is_relative_to(source), f"{name} imported from {module.__file__}"
    # A wheel install records the file it came from; an editable or source-tree install would not be a file in dist.
    direct = dist.read_text("direct_url.json")
    if direct is not None:
        assert "dist" in direct and '"editable": true' not in direct, direct
