"""Resolving a queue's configuration into the parts that serve it: connector, codec, data model.

This runs once per queue at Engine construction, so every unknown name or
impossible combination fails there, with a message that says what to change,
and the per-message path only calls pre-bound functions.
"""

from __future__ import annotations

import logging
import math
import types
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from volley.codecs import PassThroughModelHandler, RawSerializer
from volley.config import ORDERINGS, import_dotted, is_none_name, resolve_env
from volley.errors import ConfigurationError, DataValidationError, MessageError, SerializationError
from volley.plugins import Registry
from volley.ports import (
    DUMP_MODES,
    Connector,
    Consumer,
    ConsumerFactory,
    DeclaresDeliveryTerms,
    DeclaresDumpMode,
    DeconstructBinder,
    DeliveryTerms,
    FastEncodeBinder,
    FusedDecodeBinder,
    FusedEncodeBinder,
    ModelHandler,
    OutputChecker,
    Producer,
    ProducerFactory,
    QueueSpec,
    Serializer,
    UncheckedDeserializer,
    UncheckedSerializer,
    UncheckedValidatorBinder,
    ValidatorBinder,
)

logger = logging.getLogger("volley")

Decoder = Callable[[bytes], Any]
Encoder = Callable[[Any], bytes]


@dataclass
class ResolvedQueue:
    """A queue ready for use: names, connector, and pre-bound decode / encode functions."""

    name: str
    value: str
    spec: QueueSpec
    connector: Connector
    consumer_factory: Callable[[QueueSpec], Consumer] | None
    producer_factory: Callable[[QueueSpec], Producer] | None
    serializer: Serializer
    model_handler: ModelHandler
    data_model: Any
    batch_size: int | None
    batch_timeout_seconds: float
    ordering: str
    deserialize: Decoder
    fast_deserialize: Decoder
    validate: Callable[[Any], Any]
    # The handler's unchecked validation (or ``validate``): when it raises, ``validate`` explains the failure.
    fast_validate: Callable[[Any], Any]
    encode: Encoder
    # Bytes to the data model in one call (the handler's ``bind_fused_decode``), tried first; when it raises,
    # ``fast_deserialize`` and the validations above run on the same bytes and say what is wrong. None: no fusion.
    fused_decode: Decoder | None = None
    # The broker gives up on a record after this many deliveries (DeliveryTerms.delivery_limit), if it does.
    delivery_limit: int | None = None

    def describe_model(self) -> str:
        model = self.data_model
        return "no data model (raw bytes)" if model is None else getattr(model, "__qualname__", repr(model))

    def make_consumer(self) -> Consumer:
        if self.consumer_factory is not None:
            return self.consumer_factory(self.spec)
        return self.connector.create_consumer(self.spec)

    def make_producer(self) -> Producer:
        if self.producer_factory is not None:
            return self.producer_factory(self.spec)
        return self.connector.create_producer(self.spec)


def _component(registry: Registry, kind: str, value: Any, none_factory: Callable[[], Any], queue: str) -> Any:
    """A serializer or model handler from a registered name, a dotted path, a class or an instance."""
    if is_none_name(value):
        return none_factory()
    if isinstance(value, str):
        if (kind, value) in registry:
            factory = registry.get(kind, value)
        elif "." in value:
            factory = import_dotted(value, f"{kind.replace('_', ' ')} of queue {queue!r}")
        else:
            factory = registry.get(kind, value)  # raises UnknownComponentError with the known names
        value = factory
    if isinstance(value, type) or _is_factory(value):
        return value()
    return value


def _is_factory(obj: Any) -> bool:
    """A zero-argument callable that builds the component, as opposed to a component instance."""
    return callable(obj) and not isinstance(obj, (Serializer, ModelHandler))


def _data_model(value: Any, queue: str) -> Any:
    if is_none_name(value):
        return None
    if isinstance(value, str):
        value = import_dotted(value, f"data_model of queue {queue!r}")
    if not _is_type_like(value):
        raise ConfigurationError(
            f"data_model of queue {queue!r} must be a class (or a type expression such as list[Model]), got "
            f"{value!r} of type {type(value).__qualname__}"
        )
    return value


def _is_type_like(value: Any) -> bool:
    """A class, a generic alias (``list[Model]``), a union, or another construct of the typing module."""
    return (isinstance(value, (type, types.GenericAlias, types.UnionType))
            or type(value).__module__ in ("typing", "typing_extensions"))


def _connector_part(registry: Registry, value: Any, queue: str, role: str) -> Any:
    """py-volley let ``consumer:`` / ``producer:`` name a class; Volley also accepts a connector name."""
    if isinstance(value, str):
        if ("connector", value) in registry:
            return registry.get("connector", value)
        return import_dotted(value, f"{role} of queue {queue!r}")
    return value


def _identity(data: Any) -> Any:
    return data


def _bind_validate(handler: ModelHandler, model: Any) -> Callable[[Any], Any]:
    if isinstance(handler, PassThroughModelHandler):
        return _identity
    if isinstance(handler, ValidatorBinder):
        bound = handler.bind(model)
        if callable(bound):
            return bound
    construct = handler.construct

    def validate(data: Any) -> Any:
        return construct(data, model)

    return validate


def _bind_unchecked(handler: ModelHandler, model: Any, validate: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """A handler's unchecked validation (``bind_unchecked``), for the engine's hot loop; else ``validate``."""
    if validate is _identity or not isinstance(handler, UncheckedValidatorBinder):
        return validate
    unchecked = handler.bind_unchecked(model)
    return unchecked if callable(unchecked) else validate


def _bind_fused_decode(serializer: Serializer, handler: ModelHandler, model: Any) -> Decoder | None:
    if model is None or not isinstance(handler, FusedDecodeBinder):
        return None
    fused = handler.bind_fused_decode(model, serializer)
    return fused if callable(fused) else None


def _bind_encode(queue: str, serializer: Serializer, handler: ModelHandler, model: Any) -> Encoder:
    passthrough = isinstance(handler, PassThroughModelHandler)
    if isinstance(handler, DeconstructBinder) and model is not None and not passthrough:
        return _bind_dump_encode(queue, serializer, handler, model)
    serialize = serializer.serialize
    deconstruct = handler.deconstruct
    if isinstance(handler, OutputChecker):
        check_output = handler.check_output

        def encode_checked(message: Any) -> bytes:
            check_output(message, model)
            return serialize(message if passthrough else deconstruct(message))

        return encode_checked
    if passthrough:
        return serialize
    if model is not None and isinstance(model, type) and model is not Any:
        wrong_type = _wrong_type(queue, model)

        def encode_typed(message: Any) -> bytes:
            if not isinstance(message, model):
                raise wrong_type(message)
            return serialize(deconstruct(message))

        return encode_typed

    def encode(message: Any) -> bytes:
        return serialize(deconstruct(message))

    return encode


def _bind_dump_encode(queue: str, serializer: Serializer, handler: DeconstructBinder, model: Any) -> Encoder:
    """The handler's own bound dump (type check and dump in one call), then the serializer."""
    serialize = serializer.serialize
    dump = handler.bind_deconstruct(model, queue)

    def encode_bound(message: Any) -> bytes:
        return serialize(dump(message))

    # Optionally, the handler fuses dump and the serializer's unchecked function into one call, falling
    # back to encode_bound (which explains failures) for anything unusual. A FusedEncodeBinder gets the
    # serializer itself (to read its declared abilities); one written for the older port, the function.
    fused: Encoder | None = None
    if isinstance(serializer, UncheckedSerializer):
        if isinstance(handler, FusedEncodeBinder):
            fused = handler.bind_fused_encode(model, serializer, encode_bound)
        elif isinstance(handler, FastEncodeBinder):
            fused = handler.bind_fast_encode(model, serializer.unchecked_serialize, encode_bound)
    return fused if callable(fused) else encode_bound


def _wrong_type(queue: str, model: type) -> Callable[[Any], TypeError]:
    model_name = model.__qualname__

    def wrong_type(message: Any) -> TypeError:
        return TypeError(
            f"queue {queue!r} expects {model_name} messages, but the handler returned "
            f"{type(message).__qualname__}: construct a {model_name} (or change the queue's data_model)"
        )

    return wrong_type


def resolve_queue(
    registry: Registry, name: str, settings: Mapping[str, Any], app_name: str, role: str
) -> ResolvedQueue:
    """Merge profile defaults with the queue's own settings and build every part it needs."""
    merged, config = _merge_profile(registry, settings)
    connector_name = merged.get("connector")
    connector, consumer_factory, producer_factory = _connector_parts(registry, name, merged)
    serializer, handler, data_model = _codec_parts(registry, name, merged)
    batch_size = merged.get("batch_size")
    if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
        raise ConfigurationError(f"batch_size of queue {name!r} must be a positive integer, got {batch_size!r}")
    value = resolve_env(str(merged["value"]))
    if not value.strip():
        raise ConfigurationError(
            f"queue {name!r} has an empty 'value' once environment variables are substituted "
            f"({merged['value']!r}): set the variable, or give a default with ${{VAR:-default}}"
        )
    spec = QueueSpec(
        name=name, value=value, connector=str(connector_name or "custom"), config=config, app_name=app_name, role=role
    )
    terms = (connector.delivery_terms(spec) if role == "input" and isinstance(connector, DeclaresDeliveryTerms)
             else None)
    ordering = _ordering(name, merged.get("ordering"), terms)
    return ResolvedQueue(
        name=name,
        value=value,
        spec=spec,
        connector=connector,
        consumer_factory=consumer_factory,
        producer_factory=producer_factory,
        serializer=serializer,
        model_handler=handler,
        data_model=data_model,
        batch_size=batch_size,
        batch_timeout_seconds=_batch_timeout(name, merged.get("batch_timeout_seconds")),
        ordering=ordering,
        deserialize=serializer.deserialize,
        # A serializer may offer its library's raw decode: the pipeline turns whatever it raises into a
        # SerializationError (volley.queues.classify), so the adapter's own wrapper is not needed there.
        fast_deserialize=(serializer.unchecked_deserialize if isinstance(serializer, UncheckedDeserializer)
                          else serializer.deserialize),
        validate=(validate := _bind_validate(handler, data_model)),
        fast_validate=_bind_unchecked(handler, data_model, validate),
        encode=_bind_encode(name, serializer, handler, data_model),
        fused_decode=_bind_fused_decode(serializer, handler, data_model),
        delivery_limit=terms.delivery_limit if terms is not None else None,
    )


def _batch_timeout(name: str, value: Any) -> float:
    if value is None:
        return 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        raise ConfigurationError(
            f"batch_timeout_seconds of queue {name!r} must be a finite number of seconds, 0 or more; got {value!r}"
        )
    return float(value)


def _ordering(name: str, wanted: Any, terms: DeliveryTerms | None) -> str:
    """The queue's ordering: as configured, else "partition"; "none" for a connector that promises no order,
    which refuses any other (a share group hands any record to any member)."""
    unordered = terms is not None and not terms.ordered
    ordering = str(wanted or ("none" if unordered else "partition"))
    if ordering not in ORDERINGS:
        raise ConfigurationError(f"ordering of queue {name!r} must be one of {ORDERINGS}, got {ordering!r}")
    if unordered and ordering != "none":
        raise ConfigurationError(
            f"queue {name!r}: ordering {ordering!r} cannot be honoured: its connector delivers records in no "
            "order (a Kafka share group hands any record to any member, and redelivers released ones later). "
            "Remove 'ordering' (or set it to 'none'), or consume through a consumer group (the confluent* "
            "profiles) to keep the order of each partition or key"
        )
    return ordering


def _merge_profile(registry: Registry, settings: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The queue's settings over its profile's, and its connector config over the profile's (env resolved)."""
    merged: dict[str, Any] = {}
    profile = settings.get("profile")
    if profile is not None:
        merged.update(registry.get("profile", str(profile)))
    merged.update({k: v for k, v in settings.items() if k != "profile" and v is not None})
    profile_config = registry.get("profile", str(profile)).get("config") if profile is not None else None
    queue_config = settings.get("config")
    for source, given in ((f"profile {profile!r}", profile_config), ("the queue", queue_config)):
        if given is not None and not isinstance(given, Mapping):
            raise ConfigurationError(
                f"config of queue {settings.get('name')!r} (from {source}) must be a mapping of connector settings, "
                f"got {type(given).__name__} {given!r}"
            )
    config = dict(profile_config or {})
    config.update(queue_config or {})
    return merged, resolve_env(config)


def _connector_parts(
    registry: Registry, name: str, merged: Mapping[str, Any]
) -> tuple[Any, Callable[[QueueSpec], Consumer] | None, Callable[[QueueSpec], Producer] | None]:
    """The queue's connector, and the consumer / producer factories that its ``consumer:`` / ``producer:`` name."""
    connector_name = merged.get("connector")
    consumer_part = _connector_part(registry, merged["consumer"], name, "consumer") if merged.get("consumer") else None
    producer_part = _connector_part(registry, merged["producer"], name, "producer") if merged.get("producer") else None
    if connector_name is None and consumer_part is None and producer_part is None:
        raise ConfigurationError(
            f"queue {name!r} names no profile and no connector: set profile= (one of "
            f"{', '.join(registry.names('profile'))}) or connector="
        )
    connector: Any = (registry.get("connector", str(connector_name)) if connector_name is not None
                      else _OnlyFactories(name))
    return connector, _consumer_factory(consumer_part), _producer_factory(producer_part)


def _consumer_factory(part: Any) -> Callable[[QueueSpec], Consumer] | None:
    """An object's ``create_consumer`` (a connector is one), or the part itself: a class taking the queue spec."""
    if part is None:
        return None
    return part.create_consumer if isinstance(part, ConsumerFactory) else part


def _producer_factory(part: Any) -> Callable[[QueueSpec], Producer] | None:
    """An object's ``create_producer`` (a connector is one), or the part itself: a class taking the queue spec."""
    if part is None:
        return None
    return part.create_producer if isinstance(part, ProducerFactory) else part


def _codec_parts(registry: Registry, name: str, merged: Mapping[str, Any]) -> tuple[Serializer, ModelHandler, Any]:
    """The queue's serializer, model handler and data model (no data model: the pass-through handler)."""
    serializer: Serializer = _component(registry, "serializer", merged.get("serializer"), RawSerializer, name)
    handler: ModelHandler = _component(
        registry, "model_handler", merged.get("model_handler"), PassThroughModelHandler, name
    )
    data_model = _data_model(merged.get("data_model"), name)
    if data_model is None and not isinstance(handler, PassThroughModelHandler):
        handler = PassThroughModelHandler()
    for part_name, part, methods in (
        ("serializer", serializer, ("serialize", "deserialize")),
        ("model_handler", handler, ("construct", "deconstruct")),
    ):
        missing = [m for m in methods if not callable(getattr(part, m, None))]
        if missing:
            raise ConfigurationError(f"{part_name} {part!r} of queue {name!r} lacks {', '.join(missing)}()")
    if isinstance(serializer, DeclaresDumpMode) and serializer.dump_mode not in DUMP_MODES:
        raise ConfigurationError(
            f"serializer {serializer!r} of queue {name!r} has dump_mode {serializer.dump_mode!r}: it must be "
            "'json' or 'python' (volley.ports.DeclaresDumpMode)"
        )
    return serializer, handler, data_model


class _OnlyFactories:
    """Stands for the connector of a queue configured only through explicit consumer / producer classes."""

    def __init__(self, queue: str) -> None:
        self._queue = queue

    def create_consumer(self, queue: QueueSpec) -> Consumer:
        raise ConfigurationError(f"queue {self._queue!r} is used as an input but has no consumer or connector")

    def create_producer(self, queue: QueueSpec) -> Producer:
        raise ConfigurationError(f"queue {self._queue!r} is used as an output but has no producer or connector")


def classify(stage: str, exc: BaseException, payload: bytes) -> MessageError:
    """Normalize any exception from a codec into Volley's documented message errors."""
    if isinstance(exc, MessageError):
        return exc
    if stage == "deserialize":
        return SerializationError(f"{type(exc).__name__}: {exc}", payload)
    return DataValidationError(f"{type(exc).__name__}: {exc}", payload)
