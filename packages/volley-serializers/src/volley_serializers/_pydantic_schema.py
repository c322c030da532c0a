"""What a Pydantic core schema says about validation and dumps: whether it runs code of the application's own,
whether JSON mode reads it otherwise than Python mode, what a dump needs before msgpack."""

from __future__ import annotations

from collections.abc import Callable
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
    return _any_node(core_schema, lambda node: node.get("type") in _CODE_TYPES
                     or any(node.get(flag) for flag in _CODE_FLAGS), _NOT_VALIDATION)


_READ_OTHERWISE_IN_JSON = frozenset({"union", "json-or-python", "decimal", "fraction"})
"""Core schema types that may validate the same JSON data into other values in JSON mode than in Python mode: a
smart union picks the member the input fits most exactly, and in JSON mode a string fits a UUID, a datetime or
bytes as exactly as a str; a json-or-python schema has a branch of its own for JSON; Decimal and Fraction are
made from JSON numbers otherwise (10.0 gave Decimal('10.0') through orjson, Decimal('10') in JSON mode)."""


def _reads_otherwise(node: dict[str, Any]) -> bool:
    if node.get("type") in _READ_OTHERWISE_IN_JSON or node.get("coerce_numbers_to_str"):  # a node or a config
        return True
    factory = node.get("default_factory")  # code of the application's: a third run on a refused message
    if factory is not None and not (isinstance(factory, type) and factory.__module__ == "builtins"):
        return True
    return node.get("type") == "tagged-union" and callable(node.get("discriminator"))


def reads_json_otherwise(core_schema: Any) -> bool:
    """Whether validating JSON bytes (JSON mode) may give other values than validating orjson's data (Python
    mode) with ``core_schema`` (a union, a json-or-python type, Decimal, Fraction, numbers coerced to strings), or
    runs code of the application's that ``runs_own_code`` lets the unchecked path repeat (a default factory
    other than a builtin type, a callable discriminator): the fused decode would add a third run."""
    return _any_node(core_schema, _reads_otherwise, _NOT_VALIDATION)


def _writes_otherwise(node: dict[str, Any]) -> bool:
    config = node.get("config")
    if isinstance(config, dict) and config.get("ser_json_inf_nan", "null") != "null":
        return True
    keys = node.get("keys_schema") if node.get("type") == "dict" else None
    return isinstance(keys, dict) and keys.get("type") != "str"


def writes_json_otherwise(core_schema: Any) -> bool:
    """Whether Pydantic's JSON encoder may write other bytes than orjson does with the JSON-mode dump: NaN and
    infinities dumped as constants or strings (orjson writes ``null`` for the floats a JSON-mode dump leaves), and
    dicts with keys other than ``str`` (two keys that become the same string: orjson keeps the last, Pydantic
    writes both)."""
    return _any_node(core_schema, _writes_otherwise, frozenset())


def _holds_non_finite(node: dict[str, Any]) -> bool:
    kind = node.get("type")
    config = node.get("config")
    return ((kind in ("float", "complex") and node.get("allow_inf_nan") is not False) or kind == "any"
            or node.get("extra_behavior") == "allow"
            or (isinstance(config, dict) and config.get("extra_fields_behavior") == "allow"))


def holds_non_finite(core_schema: Any) -> bool:
    """Whether validating with ``core_schema`` may keep a NaN or an infinity that JSON text carried (a float, a
    complex, content typed only at run time)."""
    return _any_node(core_schema, _holds_non_finite, _NOT_VALIDATION)


def _any_node(core_schema: Any, test: Callable[[dict[str, Any]], bool], skipped: frozenset[str]) -> bool:
    pending: list[Any] = [core_schema]
    seen: set[int] = set()
    while pending:
        node = pending.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if isinstance(node, dict):
            if test(node):
                return True
            pending.extend(value for key, value in node.items() if key not in skipped)
        elif isinstance(node, (list, tuple)):
            pending.extend(node)
    return False


_RUNTIME_TYPED = frozenset({"any", "function-plain", "is-instance", "callable", "json", "generator", "complex"})
"""Core schema types whose Python-mode dump is whatever the value is at run time (or is not plain data)."""
_NOT_SCHEMA = frozenset({"metadata", "default", "expected", "members", "config", "function", "cls", "ref",
                         "serialization"})
"""Keys of a schema node that hold values, classes or settings rather than schemas of the data."""


NO_TREE, CHECK_TREE, PLAIN_TREE = 0, 1, 2
"""What a Python-mode dump needs before msgpack: nothing; a check that msgpack reads it back (runtime-typed
content, where keys other than ``str`` are possible but rare); :func:`volley_serializers._plain.plain_tree`."""


def plain_tree_need(core_schema: Any) -> int:
    """What a Python-mode dump by ``core_schema`` needs for msgpack: ``PLAIN_TREE``, ``CHECK_TREE`` or ``NO_TREE``.

    msgpack readers refuse map keys other than ``str`` or ``bytes``, and a ``timedelta`` is exact only as an
    ISO 8601 duration: a typed dict with other keys, a ``timedelta`` or a serializer function needs the plain
    tree; content typed only at run time (``Any``, extra fields, plain validators, arbitrary types) a check.
    """
    need = NO_TREE
    pending: list[Any] = [core_schema]
    while pending:
        node = pending.pop()
        if isinstance(node, (list, tuple)):
            pending.extend(node)
            continue
        if not isinstance(node, dict):
            continue
        kind = node.get("type")
        serialization = node.get("serialization")
        if (kind == "timedelta"
                or (kind == "dict" and (node.get("keys_schema") or {}).get("type") not in ("str", "bytes", "any"))
                or (isinstance(serialization, dict) and str(serialization.get("type", "")).startswith("function"))):
            return PLAIN_TREE
        config = node.get("config")
        if kind in _RUNTIME_TYPED or (kind == "dict" and (node.get("keys_schema") or {}).get("type") == "any") or (
                node.get("extra_behavior") == "allow"
                or (isinstance(config, dict) and config.get("extra_fields_behavior") == "allow")):
            need = CHECK_TREE
        pending.extend(value for key, value in node.items() if key not in _NOT_SCHEMA)
    return need
