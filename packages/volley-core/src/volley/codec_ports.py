"""The codec ports: what the engine needs from a serializer (bytes to plain data and back) and a model handler
(plain data to the user's data model and back), and the optional abilities it binds once per queue for a faster
per-message path. Part of the ports: ``volley.ports`` exports every name here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Protocol, runtime_checkable


@runtime_checkable
class Serializer(Protocol):
    """Bytes to plain Python data and back (json, orjson, msgpack)."""

    def serialize(self, message: Any) -> bytes: ...

    def deserialize(self, message: bytes) -> Any: ...


@runtime_checkable
class ModelHandler(Protocol):
    """Plain data (or raw bytes, when no serializer is configured) to the user's data model and back."""

    def construct(self, message: Any, schema: Any) -> Any:
        """Build an instance of ``schema`` from deserialized data; raise on invalid data."""

    def deconstruct(self, model: Any) -> Any:
        """Turn a model instance back into data the serializer (or the broker, as bytes) accepts."""


# Optional codec abilities: faster bound functions for the per-message path. The engine binds them once per
# queue (volley.queues) and falls back to the plain methods above.


@runtime_checkable
class UncheckedDeserializer(Protocol):
    """A serializer exposing its library's raw decode: whatever it raises becomes a ``SerializationError``."""

    def unchecked_deserialize(self, message: bytes) -> Any: ...


@runtime_checkable
class UncheckedSerializer(Protocol):
    """A serializer exposing its library's raw encode, for ``FastEncodeBinder`` to fuse with a model dump."""

    def unchecked_serialize(self, message: Any) -> bytes: ...


DUMP_MODES = ("json", "python")
"""The values of ``DeclaresDumpMode.dump_mode``; the engine refuses any other when it resolves the queue."""


@runtime_checkable
class DeclaresDumpMode(Protocol):
    """A serializer that says in which form it wants a model handler's dumps: ``"json"`` (plain JSON data:
    datetimes as strings, bytes as text; what a serializer that declares nothing gets) or ``"python"`` (Python
    values: bytes stay bytes; msgpack). A ``"python"`` serializer may also be handed models themselves (a
    subclass of the queue's model, a list of models) to dump as it sees fit. A ``FusedEncodeBinder`` reads it
    once per queue."""

    dump_mode: str


@runtime_checkable
class DeclaresWireFormat(Protocol):
    """A serializer that says its bytes are a standard format, so that a model handler may read and write them
    itself, without plain data in between (``FusedDecodeBinder``, ``FusedEncodeBinder``). ``"json"``: it reads
    any RFC 8259 JSON text, and writes compact UTF-8 JSON (no spaces, keys in the order given, NaN and
    infinities as ``null``). A serializer whose bytes differ (sorted keys, indentation, other options) must not
    declare it: the handler's own encoder would not write what it writes. Any other value declares nothing."""

    wire_format: str


@runtime_checkable
class ValidatorBinder(Protocol):
    """A model handler that binds a checked validator for one data model once (``construct`` pre-bound)."""

    def bind(self, model: Any) -> Callable[[Any], Any]: ...


@runtime_checkable
class UncheckedValidatorBinder(Protocol):
    """A model handler with an unchecked validator: when it raises, the checked one explains the failure."""

    def bind_unchecked(self, model: Any) -> Callable[[Any], Any]: ...


@runtime_checkable
class DeconstructBinder(Protocol):
    """A model handler that binds type check and dump of one data model into one call."""

    def bind_deconstruct(self, model: Any, queue: str) -> Callable[[Any], Any]: ...


@runtime_checkable
class FastEncodeBinder(Protocol):
    """A model handler that fuses dump and a serializer's unchecked encode, falling back to ``checked`` for
    anything unusual (which explains failures)."""

    def bind_fast_encode(self, model: Any, unchecked_serialize: Callable[[Any], bytes],
                         checked: Callable[[Any], bytes]) -> Callable[[Any], bytes]: ...


@runtime_checkable
class FusedEncodeBinder(Protocol):
    """A model handler that fuses dump and a serializer's unchecked encode, given the serializer itself so that it
    can ask, once, for the serializer's other declared abilities (``DeclaresDumpMode``, ``UncheckedDeserializer``).
    The engine prefers it to ``FastEncodeBinder``; ``checked`` and a None result mean what they mean there."""

    def bind_fused_encode(self, model: Any, serializer: UncheckedSerializer,
                          checked: Callable[[Any], bytes]) -> Callable[[Any], bytes] | None: ...


@runtime_checkable
class FusedDecodeBinder(Protocol):
    """A model handler that reads a serializer's bytes straight into the data model in one call, given the
    serializer so that it can ask, once, what the serializer declares (``DeclaresWireFormat``). Unchecked, like
    ``UncheckedValidatorBinder``: when it raises, the engine runs the serializer's decode and the checked
    validation on the same bytes, which say what is wrong; so a handler must not fuse validation that runs code
    of the application's (it would run twice). None: no fused decode for this model and serializer."""

    def bind_fused_decode(self, model: Any, serializer: Serializer) -> Callable[[bytes], Any] | None: ...


@runtime_checkable
class OutputChecker(Protocol):
    """A model handler that checks an output message against the queue's data model before it is encoded."""

    def check_output(self, message: Any, model: Any) -> None: ...
