"""Volley-core's own plugin: the memory connector, stdlib codecs and the ``memory*`` profiles.

They register through the same hooks as any third-party plugin, so there is a
single path from a name in a configuration to the object that serves it.
"""

from __future__ import annotations

from volley.codecs import DataclassModelHandler, JsonSerializer, PassThroughModelHandler, RawSerializer
from volley.hooks import Register, hookimpl
from volley.memory import MemoryConnector


@hookimpl
def volley_register_connectors(register: Register) -> None:
    register("memory", MemoryConnector())


@hookimpl
def volley_register_serializers(register: Register) -> None:
    register("json", JsonSerializer)
    register("none", RawSerializer)


@hookimpl
def volley_register_model_handlers(register: Register) -> None:
    register("dataclass", DataclassModelHandler)
    register("none", PassThroughModelHandler)


@hookimpl
def volley_register_profiles(register: Register) -> None:
    register("memory", {"connector": "memory", "serializer": "json", "model_handler": "dataclass", "data_model": dict})
    register("memory-batch-json", {"connector": "memory", "serializer": "json", "model_handler": "dataclass",
                                   "data_model": dict, "batch_size": 100})
    register("memory-dlq", {"connector": "memory", "serializer": "none", "model_handler": "none",
                            "data_model": None})
