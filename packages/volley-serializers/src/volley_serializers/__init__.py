"""Volley's serializers (``orjson``, ``msgpack``) and Pydantic model handlers (``pydantic``, ``pydantic-parser``,
``pydantic-list``), registered through the ``volley`` entry point.

    pip install 'volley-serializers[orjson,msgpack,pydantic]'

Installing is all it takes: queues then name them (``serializer: orjson``,
``model_handler: pydantic``, or a profile such as ``confluent-orjson-pydantic``).
The classes are importable from here for direct use; each one imports its
library only when first touched, so a missing extra fails only where it is used.

Bad input raises one of two exceptions, both from ``volley.errors`` and
re-exported here: :class:`SerializationError` (the bytes could not be
decoded, or a value encoded) and :class:`DataValidationError` (decoded data
that does not fit the data model). Both carry ``.payload`` and ``.reason``;
the engine sends the message to the dead-letter queue with the reason in its
headers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from volley.errors import DataValidationError, MessageError, SerializationError
from volley_serializers._plain import to_plain

if TYPE_CHECKING:
    from volley_serializers.models import GenericMessage
    from volley_serializers.msgpack_serializer import MsgpackSerializer
    from volley_serializers.orjson_serializer import OrjsonSerializer
    from volley_serializers.pydantic_handlers import (
        PydanticListModelHandler,
        PydanticModelHandler,
        PydanticParserModelHandler,
    )

_LAZY = {
    "OrjsonSerializer": "volley_serializers.orjson_serializer",
    "MsgpackSerializer": "volley_serializers.msgpack_serializer",
    "PydanticModelHandler": "volley_serializers.pydantic_handlers",
    "PydanticParserModelHandler": "volley_serializers.pydantic_handlers",
    "PydanticListModelHandler": "volley_serializers.pydantic_handlers",
    "GenericMessage": "volley_serializers.models",
}


def __getattr__(name: str) -> Any:
    if name == "__version__":  # from the installed metadata: the suite has one VERSION file
        from volley.plugins import distribution_version

        return distribution_version("volley-serializers") or "0+unknown"
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'volley_serializers' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)


__all__ = [
    "DataValidationError",
    "GenericMessage",
    "MessageError",
    "MsgpackSerializer",
    "OrjsonSerializer",
    "PydanticListModelHandler",
    "PydanticModelHandler",
    "PydanticParserModelHandler",
    "SerializationError",
    "__version__",
    "to_plain",
]
