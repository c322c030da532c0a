"""volley-jsongz's plugin module: the one the ``volley`` entry point names."""

from __future__ import annotations

from volley.plugins import Register, hookimpl
from volley_jsongz.serializer import GzipJsonSerializer


@hookimpl
def volley_register_serializers(register: Register) -> None:
    # A zero-argument factory: Volley calls it once per queue that names "json-gzip".
    register("json-gzip", GzipJsonSerializer)
