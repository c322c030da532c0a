"""volley-serializers' plugin: the ``orjson`` and ``msgpack`` serializers, the Pydantic model handlers, and the
``memory-*-pydantic`` profiles.

``json`` (stdlib), ``none`` / ``disabled`` and the ``dataclass`` / ``none``
handlers are volley-core's. The libraries are optional extras, so every
factory imports its library only when called (at Engine construction) and,
if it is missing, fails with the ``pip install`` that fixes it. Loading this
plugin never imports them.
"""

from __future__ import annotations

import importlib
from typing import Any

from volley.errors import ConfigurationError
from volley.plugins import Register, hookimpl

GENERIC_MESSAGE = "volley_serializers.models.GenericMessage"


def require(library: str, extra: str, what: str) -> None:
    """Import ``library`` or fail with the command that installs it."""
    try:
        importlib.import_module(library)
    except ImportError as exc:
        raise ConfigurationError(
            f"{what} needs the {library} library, which cannot be imported ({exc}): "
            f"pip install 'volley-serializers[{extra}]'"
        ) from None


def orjson_serializer() -> Any:
    require("orjson", "orjson", "serializer 'orjson'")
    from volley_serializers.orjson_serializer import OrjsonSerializer

    return OrjsonSerializer()


def msgpack_serializer() -> Any:
    require("msgpack", "msgpack", "serializer 'msgpack'")
    from volley_serializers.msgpack_serializer import MsgpackSerializer

    return MsgpackSerializer()


def pydantic_handler() -> Any:
    require("pydantic", "pydantic", "model handler 'pydantic'")
    from volley_serializers.pydantic_handlers import PydanticModelHandler

    return PydanticModelHandler()


def pydantic_parser_handler() -> Any:
    require("pydantic", "pydantic", "model handler 'pydantic-parser'")
    from volley_serializers.pydantic_handlers import PydanticParserModelHandler

    return PydanticParserModelHandler()


def pydantic_list_handler() -> Any:
    require("pydantic", "pydantic", "model handler 'pydantic-list'")
    from volley_serializers.pydantic_handlers import PydanticListModelHandler

    return PydanticListModelHandler()


PROFILES: dict[str, dict[str, Any]] = {
    "memory-pydantic": {"connector": "memory", "serializer": "none", "model_handler": "pydantic-parser",
                        "data_model": GENERIC_MESSAGE},
    "memory-orjson-pydantic": {"connector": "memory", "serializer": "orjson", "model_handler": "pydantic",
                               "data_model": GENERIC_MESSAGE},
    "memory-msgpack-pydantic": {"connector": "memory", "serializer": "msgpack", "model_handler": "pydantic",
                                "data_model": GENERIC_MESSAGE},
    "memory-json-pydantic": {"connector": "memory", "serializer": "json", "model_handler": "pydantic",
                             "data_model": GENERIC_MESSAGE},
}


@hookimpl
def volley_register_serializers(register: Register) -> None:
    register("orjson", orjson_serializer)
    register("msgpack", msgpack_serializer)


@hookimpl
def volley_register_model_handlers(register: Register) -> None:
    register("pydantic", pydantic_handler)
    register("pydantic-parser", pydantic_parser_handler)
    register("pydantic-list", pydantic_list_handler)


@hookimpl
def volley_register_profiles(register: Register) -> None:
    for name, settings in PROFILES.items():
        register(name, dict(settings))
