"""Queue configuration: ``QueueConfig`` objects, plain dicts or YAML, with profiles and env-var resolution.

The accepted shapes are py-volley's, so existing configuration files keep
working: a list of ``QueueConfig``, a ``{queue_name: {...}}`` dict, or a YAML
file with a top-level ``queues:`` mapping.
"""

from __future__ import annotations

import dataclasses
import importlib
import os
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from volley.errors import ConfigurationError
from volley.redaction import redacted_repr

NONE_NAMES = frozenset({"none", "disabled", "null", ""})
ORDERINGS = ("partition", "key", "none")

QUEUE_FIELDS = (
    "name",
    "value",
    "profile",
    "connector",
    "consumer",
    "producer",
    "data_model",
    "model_handler",
    "serializer",
    "config",
    "batch_size",
    "batch_timeout_seconds",
    "ordering",
)

# What a profile (a bundle of queue defaults registered by a plugin) may set: a queue's settings but its identity.
PROFILE_FIELDS = tuple(f for f in QUEUE_FIELDS if f not in {"name", "value", "profile"})


def check_profile_settings(name: str, settings: Any, distribution: str) -> None:
    """Fail on a profile that is not a mapping or sets an unknown key (a typo such as ``serialiser`` would
    otherwise leave every queue of that profile without the setting)."""
    if not isinstance(settings, Mapping):
        raise ConfigurationError(
            f"profile {name!r} of {distribution} must be a mapping of queue settings, got {type(settings).__name__}"
        )
    unknown = sorted(set(settings) - set(PROFILE_FIELDS), key=str)
    if unknown:
        raise ConfigurationError(
            f"profile {name!r} of {distribution} has unknown setting(s) {unknown}; allowed settings: "
            f"{list(PROFILE_FIELDS)}"
        )


@dataclasses.dataclass(repr=False)
class QueueConfig:
    """One queue: its alias in the app (``name``), its name on the broker (``value``) and how to talk to it.

    ``profile`` bundles defaults (connector, serializer, model handler, data
    model); every other field overrides the profile. ``config`` goes to the
    connector untouched (librdkafka settings, redis options...). ``batch_size``
    makes the handler receive lists of messages. ``ordering`` says what must be
    processed in order: each ``partition`` (default), each message ``key``, or
    nothing (``none``).
    """

    name: str
    value: str
    profile: str | None = None
    connector: str | None = None
    consumer: Any = None
    producer: Any = None
    data_model: Any = None
    model_handler: Any = None
    serializer: Any = None
    config: dict[str, Any] | None = None
    batch_size: int | None = None
    batch_timeout_seconds: float | None = None
    ordering: str | None = None

    def __repr__(self) -> str:
        """Names the secrets in ``config`` (passwords, tokens) without showing them: tracebacks print it."""
        return redacted_repr(self)

    def to_dict(self) -> dict[str, Any]:
        """The fields that were set, as py-volley's ``QueueConfig.to_dict`` gave them."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if getattr(self, f.name) is not None}


_ENV_PATTERN = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?-)([^}]*))?\}")


def resolve_env(value: Any) -> Any:
    """Replace ``${VAR}``, ``${VAR:-default}`` (VAR unset or empty) and ``${VAR-default}`` (VAR unset) in strings,
    as the shell does, recursively; an unset VAR without default fails."""
    if isinstance(value, str):

        def substitute(match: re.Match[str]) -> str:
            var, form, default = match.group(1), match.group(2), match.group(3)
            found = os.environ.get(var)
            if found is not None and not (found == "" and form == ":-"):
                return found
            if default is not None:
                return default
            raise ConfigurationError(
                f"configuration refers to ${{{var}}} but the environment variable {var} is not set; "
                f"set it or write ${{{var}:-default}}"
            )

        return _ENV_PATTERN.sub(substitute, value)
    if isinstance(value, Mapping):
        return {k: resolve_env(v) for k, v in value.items()}
    if isinstance(value, list):
        return [resolve_env(v) for v in value]
    if isinstance(value, tuple):
        return tuple(resolve_env(v) for v in value)
    return value


def load_yaml(path: str | os.PathLike[str]) -> dict[str, dict[str, Any]]:
    """Read a py-volley style YAML file (top-level ``queues:``) into the dict form."""
    try:
        import yaml  # type: ignore[import-untyped,unused-ignore]
    except ImportError:
        raise ConfigurationError(
            f"reading the YAML configuration {os.fspath(path)!r} needs PyYAML: pip install 'volley-core[yaml]' "
            "(or pass queue_config= as QueueConfig objects or a dict)"
        ) from None
    file = Path(path)
    if not file.is_file():
        raise ConfigurationError(
            f"YAML configuration {os.fspath(path)!r} does not exist; pass yaml_config_path= or queue_config="
        )
    try:
        document = yaml.load(file.read_text(), Loader=_unique_keys_loader(yaml))  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigurationError(f"YAML configuration {os.fspath(path)!r} is not valid YAML: {exc}") from exc
    if not isinstance(document, Mapping) or "queues" not in document:
        raise ConfigurationError(f"YAML configuration {os.fspath(path)!r} must have a top-level 'queues:' mapping")
    return normalize_queue_config(document["queues"])


def _unique_keys_loader(yaml: Any) -> Any:
    """A SafeLoader that refuses a mapping giving a key twice: safe_load keeps the last one silently, so a
    copy-pasted queue block (or a setting written twice) would replace the first without a word."""

    class UniqueKeyLoader(yaml.SafeLoader):  # type: ignore[misc,name-defined,unused-ignore]
        def construct_mapping(self, node: Any, deep: bool = False) -> Any:
            seen: set[Any] = set()
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":  # `<<: *defaults`: its keys may be overridden here
                    continue
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, str) and key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"{key!r} is given more than once in the same mapping", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

    return UniqueKeyLoader


def _named_entries(config: list[Any] | tuple[Any, ...]) -> list[tuple[str, Any]]:
    """A list of QueueConfig (or dicts with a 'name'): (name, settings) pairs, each name once."""
    pairs: list[tuple[str, Any]] = []
    for entry in config:
        if isinstance(entry, QueueConfig):
            pairs.append((entry.name, entry.to_dict()))
        elif isinstance(entry, Mapping) and "name" in entry:
            pairs.append((str(entry["name"]), dict(entry)))
        else:
            raise ConfigurationError(
                f"queue_config list entries must be QueueConfig objects or dicts with a 'name'; got {entry!r}"
            )
    names = [name for name, _ in pairs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise ConfigurationError(f"queue_config names the queue(s) {twice} more than once; give each queue one entry")
    return pairs


def normalize_queue_config(config: Any) -> dict[str, dict[str, Any]]:
    """Bring any accepted configuration shape to ``{queue_name: {field: value}}`` and check the field names."""
    queues: dict[str, dict[str, Any]] = {}
    items: Iterable[tuple[str, Any]]
    if isinstance(config, Mapping):
        items = config.items()
    elif isinstance(config, (list, tuple)):
        items = _named_entries(config)
    else:
        raise ConfigurationError(
            f"queue_config must be a list of QueueConfig, a dict of queue name to settings, or None; got "
            f"{type(config).__name__}"
        )
    for name, given in items:
        settings = given.to_dict() if isinstance(given, QueueConfig) else given
        if not isinstance(settings, Mapping):
            raise ConfigurationError(f"settings of queue {name!r} must be a mapping, got {settings!r}")
        unknown = set(settings) - set(QUEUE_FIELDS)
        if unknown:
            raise ConfigurationError(
                f"queue {name!r} has unknown setting(s) {sorted(unknown)}; known settings: {list(QUEUE_FIELDS)}"
            )
        entry = dict(settings)
        entry["name"] = str(name)
        if "value" not in entry or not entry["value"]:
            raise ConfigurationError(f"queue {name!r} needs a 'value': the topic or queue name on the broker")
        queues[str(name)] = entry
    return queues


def import_dotted(path: str, what: str) -> Any:
    """Import ``package.module.Attribute``; fail with a message that says what was being looked for."""
    module_name, _, attribute = path.rpartition(".")
    if not module_name:
        raise ConfigurationError(f"{what} {path!r} is neither a registered name nor a dotted import path")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigurationError(f"{what} {path!r}: cannot import module {module_name!r} ({exc})") from exc
    try:
        return getattr(module, attribute)
    except AttributeError:
        raise ConfigurationError(f"{what} {path!r}: module {module_name!r} has no attribute {attribute!r}") from None


def is_none_name(value: Any) -> bool:
    return value is None or (isinstance(value, str) and value.strip().lower() in NONE_NAMES)
