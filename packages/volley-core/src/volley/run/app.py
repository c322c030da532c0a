"""What a run needs of the app it runs (``volley.engine.StreamApp`` is one): the run imports nothing from the
engine module, so dependencies go one way (engine -> run)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol


class RunnableApp(Protocol):
    @property
    def engine(self) -> Any:
        """The Engine: its settings, resolved queues and observer."""

    @property
    def func(self) -> Callable[..., Any]:
        """The user's handler, as written (named in logs)."""

    @property
    def call(self) -> Callable[..., Any]:
        """What the run calls: ``func``, or an adapter passing ``msg_ctx`` by keyword."""

    @property
    def is_async(self) -> bool: ...

    @property
    def wants_context(self) -> bool: ...
