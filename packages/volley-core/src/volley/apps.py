"""Finding the apps to run: ``module:attribute`` to the ``StreamApp`` it names.

Shared by the ``volley run`` command (``volley.cli``) and its supervisor of
worker processes (``volley.workers``), which checks every target once before
it starts any worker.
"""

from __future__ import annotations

import importlib
import os
import sys

from volley.engine import StreamApp
from volley.errors import ConfigurationError


def load_app(target: str) -> StreamApp:
    """``package.module:attribute`` to the StreamApp it names."""
    module_name, _, attribute = target.partition(":")
    if not module_name or not attribute:
        raise ConfigurationError(f"app {target!r} must be given as module:attribute, e.g. myproject.worker:app")
    sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"cannot import {module_name!r} for app {target!r}: {exc}") from exc
    app = getattr(module, attribute, None)
    if not isinstance(app, StreamApp):
        raise ConfigurationError(
            f"{target!r} is {type(app).__name__}, not a function decorated with @engine.stream_app"
        )
    return app
