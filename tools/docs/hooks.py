"""mkdocs hooks (mkdocs.yml ``hooks:``): the suite's version in the footer, and the diagrams drawn at build time.

The diagrams become generated files of the site (``diagrams/*.svg``), so pages link them like any image and
``mkdocs build --strict`` checks those links; nothing is fetched and nothing is written into docs/.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diagrams import DIAGRAMS  # tools/docs/diagrams.py: mkdocs puts a hook's folder on sys.path while loading it

ROOT = Path(__file__).resolve().parents[2]


def on_config(config: Any) -> Any:
    version = (ROOT / "VERSION").read_text().strip()
    config.extra["version"] = version
    config.copyright = f"Volley {version} · MIT licence"
    return config


def on_files(files: Any, config: Any) -> Any:
    from mkdocs.structure.files import File

    for name, draw in DIAGRAMS.items():
        files.append(File.generated(config, name, content=draw()))
    return files
