"""What a Pydantic core schema says about validation: whether it runs code of the application's own."""

from __future__ import annotations

from typing import Any

_CODE_TYPES = frozenset({"function-before", "function-after", "function-wrap", "function-plain", "call"})
"""Core schema types whose validation calls a Python function (validators, ``validate_call``)."""
_CODE_FLAGS = ("post_init", "custom_init")
"""Keys of model and dataclass schemas that make validation call ``model_post_init``, ``__post_init__`` or a custom
``__init__``."""
_NOT_VALIDATION = frozenset({"serialization", "metadata"})
"""Keys whose contents do not take part in validation (a serializer's ``function-plain`` runs only when dumping)."""


def runs_own_code(core_schema: Any) -> bool:
    """Whether validating with ``core_schema`` may call Python code: a validator of the model or of any type in
    it, a post-init hook, a custom ``__init__``. Such validation may have side effects or cost, and may answer
    differently when called again, so it must not be repeated. Conservative: Pydantic's own function-based
    types (``EmailStr``, say) count as well."""
    pending: list[Any] = [core_schema]
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            if node.get("type") in _CODE_TYPES or any(node.get(flag) for flag in _CODE_FLAGS):
                return True
            pending.extend(value for key, value in node.items() if key not in _NOT_VALIDATION)
        elif isinstance(node, (list, tuple)):
            pending.extend(node)
    return False
