"""The runnable examples the pages show print what the pages say they print."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

EXAMPLES = Path(__file__).resolve().parents[2] / "docs" / "examples"


def run(name: str) -> str:
    done = subprocess.run([sys.executable, str(EXAMPLES / name)], capture_output=True, text=True, timeout=60,
                          check=True, cwd=EXAMPLES)
    return done.stdout


def test_the_home_page_example_doubles_its_number() -> None:
    assert run("hello.py").splitlines() == ["[b'{\"value\":42}']"]


def test_the_first_app_invoices_two_orders_and_dead_letters_the_third() -> None:
    lines = run("first_app.py").splitlines()
    assert lines[0].startswith("RunReport(consumed=3, acked=2, nacked=0, dead_lettered=1, failed=0, abandoned=0, "
                               "retries=0, produced=3,")
    assert lines[1] == "[b'{\"order_id\":1,\"cents\":250}', b'{\"order_id\":2,\"cents\":99}']"


def test_the_testing_page_example_passes_its_own_tests() -> None:
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "testing"],
                          capture_output=True, text=True, timeout=120, check=False, cwd=EXAMPLES,
                          env={**os.environ, "PYTHONPATH": str(EXAMPLES / "testing")})
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout


def test_the_plugin_page_connector_example_passes_the_contract_suite() -> None:
    """The tutorial volley-sqlite of docs/plugins.md, imported ahead of the real one (same import name)."""
    project = EXAMPLES / "volley-sqlite"
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-x"],
                          capture_output=True, text=True, timeout=300, check=False, cwd=project,
                          env={**os.environ, "PYTHONPATH": str(project / "src")})
    assert done.returncode == 0, done.stdout[-3000:]
    assert " passed" in done.stdout
