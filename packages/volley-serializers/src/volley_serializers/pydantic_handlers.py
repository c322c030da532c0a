"""The Pydantic model handlers: ``pydantic``, ``pydantic-parser`` and ``pydantic-list``.

Each works with any Pydantic model class (and, through a ``TypeAdapter`` built
once per data model, with any type Pydantic can validate: dataclasses,
``TypedDict``, ``list[Model]``...). Nothing is built per message: a handler
instance belongs to one queue and caches, per data model, the pre-bound
validate and dump functions.

What goes on the wire: models are dumped in Pydantic's **JSON mode**
(``model_dump(mode="json")``): datetimes as ISO 8601 strings, ``UUID`` and
``Decimal`` as strings, enums as their values. That dict is plain JSON data,
so every serializer (stdlib ``json``, ``orjson``, ``msgpack``) encodes it and
the model validates back equal, whichever serializer sits in between. It costs
about the same as Python mode followed by orjson (orjson then has no
datetimes to format) and less with msgpack, which would otherwise need a
conversion hook per datetime. ``bytes`` fields follow the model's
``ser_json_bytes`` setting (UTF-8 by default; set ``"base64"`` for binary).
The exception is a serializer that declares ``dump_mode = "python"``
(:class:`volley.ports.DeclaresDumpMode`; msgpack does): the engine's fused
encode (``bind_fused_encode``, handed the serializer once per queue) dumps in
Python mode for it, so bytes stay bytes (see
``volley_serializers.msgpack_serializer``).

Errors: data that does not fit the model raises
:class:`volley.errors.DataValidationError`; bytes that are not JSON at all
(``pydantic-parser`` only) raise :class:`volley.errors.SerializationError`;
both carry the input and a one-line reason for the DLQ headers. A model that
cannot be dumped raises ``SerializationError``.

Fast paths for the engine (all optional, built once per queue):

- ``bind(schema) -> Callable[[data], model]``: validate into ``schema``.
- ``bind_deconstruct(schema) -> Callable[[model], data]``: check that the
  output is a ``schema`` instance (``TypeError`` otherwise) and dump it.
- ``check_output(message, schema)``: only the type check.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

from pydantic import BaseModel, TypeAdapter
from pydantic_core import to_json, to_jsonable_python

from volley.errors import ConfigurationError, DataValidationError
from volley.ports import DeclaresDumpMode, DeclaresWireFormat, Serializer, UncheckedDeserializer, UncheckedSerializer
from volley_serializers._plain import plain_tree
from volley_serializers._pydantic_errors import (
    dump_failed,
    model_name,
    one_line,
    parse_failed,
    validation_reason,
    wrong_output,
)
from volley_serializers._pydantic_schema import (
    CHECK_TREE,
    PLAIN_TREE,
    holds_non_finite,
    plain_tree_need,
    reads_json_otherwise,
    runs_own_code,
    writes_json_otherwise,
)

Validate = Callable[[Any], Any]
Dump = Callable[[Any], Any]


def _is_model_class(schema: Any) -> bool:
    return isinstance(schema, type) and issubclass(schema, BaseModel)


def _complete(schema: type[BaseModel]) -> type[BaseModel]:
    """A model with forward references still unresolved fails here, at Engine construction, not per message."""
    if not schema.__pydantic_complete__:
        try:
            schema.model_rebuild(raise_errors=True)
        except Exception as exc:
            name = model_name(schema)
            raise ConfigurationError(
                f"data model {name} is not fully defined ({one_line(str(exc))}); define every type it refers to "
                f"and call {name}.model_rebuild() before building the Engine"
            ) from exc
    return schema


def _adapter(schema: Any) -> TypeAdapter[Any]:
    try:
        return TypeAdapter(schema)
    except Exception as exc:
        raise ConfigurationError(
            f"data model {schema!r} is not a type Pydantic can validate: {one_line(str(exc))}"
        ) from exc


def _identity(message: Any) -> Any:
    return message


def _plain_json(serializer: Any) -> bool:
    """Whether ``serializer`` declares its bytes plain JSON (``DeclaresWireFormat``): Pydantic may read and write
    them itself."""
    return isinstance(serializer, DeclaresWireFormat) and serializer.wire_format == "json"


_BINDING = threading.local()
"""The serializer ``bind_fused_encode`` is binding for, on this thread, for the ``bind_fast_encode`` it calls."""


class PydanticModelHandler:
    """``pydantic``: deserialized data to a model (what ``model_validate`` does) and a model to JSON-mode data.

    It calls the model's validator and serializer directly, skipping the
    keyword handling of ``model_validate`` / ``model_dump``, which makes it
    faster than calling those per message. A data model of ``None`` means no
    model: data passes through unchanged.
    """

    def __init__(self) -> None:
        self._validators: dict[Any, Validate] = {}
        self._dumpers: dict[Any, Dump] = {}
        self._to_python: dict[type, Callable[..., Any]] = {}
        self._to_json: dict[type, Callable[..., bytes]] = {}

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"

    # ------------------------------------------------------------------ fast paths, built once per data model

    def bind(self, schema: Any) -> Validate:
        """The function that validates one message into ``schema``: call it per message, build it once."""
        validate = self._validators.get(schema)
        if validate is None:
            validate = self._validators[schema] = _identity if schema is None else self._make_validate(schema)
        return validate

    def bind_deconstruct(self, schema: Any, queue: str | None = None) -> Dump:
        """The function that checks one output is a ``schema`` (``TypeError`` naming ``queue`` if not) and dumps it.

        It replaces ``check_output`` followed by ``deconstruct``: one call per
        output instead of two, and no per-output lookup of the model's serializer.
        """
        key = (schema, queue)
        dump = self._dumpers.get(key)
        if dump is None:
            dump = self._dumpers[key] = self.deconstruct if schema is None else self._make_deconstruct(schema, queue)
        return dump

    def bind_unchecked(self, schema: Any) -> Validate:
        """Pydantic's own validation into ``schema``, without Volley's error wrapping.

        For the engine's hot loop: when it raises, the engine calls ``bind(schema)``'s function on the same
        data, which raises the error that says what is wrong. That is only safe for validation that runs no
        code of the application's: a schema with validators (or post-init hooks) anywhere in it gets
        ``bind(schema)``'s function itself, so that it is validated once and its first error is the reason.
        """
        if schema is None:
            return _identity
        if self._runs_own_code(schema):
            return self.bind(schema)
        return self._validator(schema).validate_python  # type: ignore[no-any-return]

    def bind_fused_encode(self, schema: Any, serializer: UncheckedSerializer,
                          fallback: Callable[[Any], bytes]) -> Callable[[Any], bytes] | None:
        """One call that dumps an output of exactly ``schema`` (JSON mode) and serializes it with the serializer's
        unchecked function (the library's own).

        Anything but an instance of ``schema`` itself (a subclass, a list), and any failure, goes to
        ``fallback``: the checked encoder, which handles those and raises the error that says what is wrong.
        None when ``schema`` is not a model class. A serializer that declares ``dump_mode = "python"``
        (msgpack) gets Python-mode dumps instead, for every schema (``_python_mode_encode``).
        """
        # Through bind_fast_encode, which a subclass written for the older port may override (to turn fusing off,
        # or to fuse its own way, calling super() for the rest): it decides, as it did when the engine called it,
        # and ours learns the serializer from _BINDING (set for this call, on this thread).
        _BINDING.serializer = serializer
        try:
            return self.bind_fast_encode(schema, serializer.unchecked_serialize, fallback)
        finally:
            _BINDING.serializer = None

    def bind_fast_encode(self, schema: Any, serialize: Callable[[Any], bytes],
                         fallback: Callable[[Any], bytes]) -> Callable[[Any], bytes] | None:
        """The older port (``volley.ports.FastEncodeBinder``): called with the serializer's function only, JSON-mode
        dumps fused with it; called by ``bind_fused_encode``, what the serializer declares decides (Python mode for
        msgpack)."""
        serializer = getattr(_BINDING, "serializer", None)
        if isinstance(serializer, DeclaresDumpMode) and serializer.dump_mode == "python":
            reread = serializer.unchecked_deserialize if isinstance(serializer, UncheckedDeserializer) else None
            return self._python_mode_encode(schema, serialize, reread, fallback)
        if not _is_model_class(schema):
            return None
        model_serializer = _complete(schema).__pydantic_serializer__
        write: Callable[[Any], bytes]
        if _plain_json(serializer) and not writes_json_otherwise(schema.__pydantic_core_schema__):
            # Pydantic's JSON encoder writes what serialize would (compact JSON of the JSON-mode dump) without the
            # dict in between, and integers beyond 64 bits too (orjson refuses them); not for a model that dumps
            # NaN otherwise than as null, or has dicts keyed by other than str (writes_json_otherwise).
            write = model_serializer.to_json
        else:
            to_python = model_serializer.to_python

            def write(message: Any) -> bytes:
                return serialize(to_python(message, mode="json"))

        def encode(message: Any) -> bytes:
            if type(message) is schema:
                try:
                    return write(message)
                except Exception:  # noqa: S110 - the checked path below explains it
                    pass
            return fallback(message)

        return encode

    def _python_mode_encode(self, schema: Any, serialize: Callable[[Any], bytes],
                            reread: Callable[[bytes], Any] | None,
                            fallback: Callable[[Any], bytes]) -> Callable[[Any], bytes]:
        """For a serializer that carries Python values (msgpack): outputs are dumped in Python mode (bytes stay
        bytes), made readable where the schema says they may not be (``plain_tree_need``): content typed at run
        time is packed, then read back through the serializer's unchecked decode (``reread``) to check it, or,
        without one, always made plain. Anything that fails goes to ``fallback``, the checked JSON-mode encoder:
        it refuses a wrong output with the error that says so, and still encodes a model that only JSON mode can
        dump (a custom type with a JSON-only serializer).
        """
        model_class = _is_model_class(schema)
        if model_class:
            to_python = _complete(schema).__pydantic_serializer__.to_python
            need = plain_tree_need(schema.__pydantic_core_schema__)
        else:
            adapter = _adapter(schema)
            to_python, need = adapter.serializer.to_python, plain_tree_need(adapter.core_schema)
        if reread is None and need == CHECK_TREE:
            need = PLAIN_TREE  # nothing to check with: made plain, always
        read_back: Callable[[bytes], Any] = _identity if reread is None else reread
        accepts = self._accepts

        def dump_and_pack(dumped: Any) -> bytes:
            if need == PLAIN_TREE:
                return serialize(plain_tree(dumped))
            packed = serialize(dumped)
            if need == CHECK_TREE:
                try:
                    read_back(packed)
                except ValueError:  # a map key msgpack readers refuse: written as a string instead
                    return serialize(plain_tree(dumped))
            return packed

        def encode(message: Any) -> bytes:
            try:
                if not model_class:
                    return dump_and_pack(to_python(message, warnings="error"))
                if type(message) is schema:
                    return dump_and_pack(to_python(message))
                if accepts(message, schema):  # a subclass, a list of models: the serializer dumps each one
                    return serialize(message)
            except Exception:  # noqa: S110 - the checked path below explains it
                pass
            return fallback(message)

        return encode

    @staticmethod
    def _accepts(message: Any, schema: type) -> bool:
        """Whether ``message`` is an output of the queue's model (a subclass is one)."""
        return isinstance(message, schema)

    def check_output(self, message: Any, schema: Any) -> None:
        """Raise ``TypeError`` unless ``message`` is an instance of the queue's data model (when that is a class)."""
        if isinstance(schema, type) and not isinstance(message, schema):
            raise wrong_output(schema, message)

    # ------------------------------------------------------------------ the ModelHandler protocol

    def construct(self, message: Any, schema: Any) -> Any:
        validate = self._validators.get(schema)
        if validate is None:
            validate = self.bind(schema)
        return validate(message)

    def deconstruct(self, model: Any) -> Any:
        to_python = self._to_python.get(type(model))
        if to_python is None:
            return self._deconstruct_new_type(model)
        try:
            return to_python(model, mode="json")
        except Exception as exc:
            raise dump_failed(model, exc) from exc

    def _deconstruct_new_type(self, model: Any) -> Any:
        """First output of a type: remember its serializer (a class attribute lookup through Pydantic's metaclass
        costs more than the dict lookup that replaces it)."""
        serializer = getattr(type(model), "__pydantic_serializer__", None)
        if serializer is None:
            return self._dump_other(model)
        self._to_python[type(model)] = serializer.to_python
        return self.deconstruct(model)

    def bind_fused_decode(self, schema: Any, serializer: Serializer) -> Validate | None:
        """Bytes of a serializer that declares JSON (``wire_format = "json"``: orjson) straight into ``schema``,
        with Pydantic's own parser, in JSON mode (``validate_json``): no plain data in between.

        Unchecked, for the engine's hot loop (``volley.ports.FusedDecodeBinder``): when it raises, the engine runs
        the serializer and the checked validation on the same bytes, which say what is wrong (and accept what
        JSON mode alone would refuse). Only for a model class whose unchecked validation is Pydantic's own
        (``bind_unchecked``: a model with validators of the application's, or a subclass validating its own way,
        is not fused) and that JSON mode reads as Python mode does (no union, no json-or-python type: a smart
        union takes a string for a UUID or a datetime in JSON mode). What differs is what JSON carries beyond
        orjson: integers beyond 64 bits are kept, strict fields accept what strict JSON mode accepts, numbers
        beyond a double's range are infinities (orjson refused them). Models with ``Decimal`` or ``Fraction``
        fields, numbers coerced to strings, default factories of their own or callable discriminators are not
        fused (``reads_json_otherwise``). ``NaN`` and ``Infinity``, which orjson refuses and Pydantic's parser
        reads, are left to the two steps (bytes that contain them anywhere, for a model that could keep one), so
        they are refused as before.
        """
        if not _is_model_class(schema) or not _plain_json(serializer):
            return None
        validator = _complete(schema).__pydantic_validator__
        if self.bind_unchecked(schema) != validator.validate_python:
            return None
        if reads_json_otherwise(schema.__pydantic_core_schema__):
            return None
        validate_json = validator.validate_json
        if not holds_non_finite(schema.__pydantic_core_schema__):
            return validate_json  # nothing to keep NaN in: no check needed

        def fused_decode(payload: bytes) -> Any:
            # memchr for "N" and "I" first (tens of ns; a substring search costs about 0.2 us per message)
            if (78 in payload and b"NaN" in payload) or (73 in payload and b"Infinity" in payload):
                raise ValueError("NaN or Infinity: left to the serializer, which refuses them")
            return validate_json(payload)

        return fused_decode

    # ------------------------------------------------------------------ building the bound functions

    def _validator(self, schema: Any) -> Any:
        """The pydantic-core validator of ``schema`` (a model's own, or a TypeAdapter's)."""
        if _is_model_class(schema):
            return _complete(schema).__pydantic_validator__
        return _adapter(schema).validator

    def _runs_own_code(self, schema: Any) -> bool:
        """Whether validating into ``schema`` calls validators or hooks of the application's."""
        if _is_model_class(schema):
            return runs_own_code(_complete(schema).__pydantic_core_schema__)
        return runs_own_code(_adapter(schema).core_schema)

    def _make_validate(self, schema: Any) -> Validate:
        validate_python = self._validator(schema).validate_python

        def validate(message: Any) -> Any:
            try:
                return validate_python(message)
            except Exception as exc:
                raise DataValidationError(validation_reason(exc, schema), message) from exc

        return validate

    def _make_deconstruct(self, schema: Any, queue: str | None) -> Dump:
        if not _is_model_class(schema):
            to_python = _adapter(schema).serializer.to_python

            def dump_typed(model: Any) -> Any:
                try:
                    return to_python(model, mode="json", warnings="error")
                except Exception as exc:
                    raise dump_failed(model, exc, schema) from exc

            return dump_typed
        to_python = _complete(schema).__pydantic_serializer__.to_python
        generic = self.deconstruct

        def dump(model: Any) -> Any:
            if type(model) is schema:
                try:
                    return to_python(model, mode="json")
                except Exception as exc:
                    raise dump_failed(model, exc) from exc
            if isinstance(model, schema):  # a subclass: dump it as its own class, as model_dump would
                return generic(model)
            raise wrong_output(schema, model, queue)

        return dump

    def _dump_other(self, model: Any) -> Any:
        """Anything that is not a Pydantic model or dataclass: dicts, lists of models, plain values."""
        try:
            return to_jsonable_python(model)
        except Exception as exc:
            raise dump_failed(model, exc) from exc


class PydanticParserModelHandler(PydanticModelHandler):
    """``pydantic-parser``: raw bytes straight to the model with Pydantic's JSON parser, and a model to JSON bytes.

    Use it without a serializer (``serializer: none``): Pydantic's own parser
    reads the bytes (``model_validate_json``) and writes them
    (``model_dump_json``), with no intermediate dict. Bytes that are not JSON
    raise ``SerializationError``; JSON that does not fit the model raises
    ``DataValidationError``.
    """

    def deconstruct(self, model: Any) -> bytes:
        dump_json = self._to_json.get(type(model))
        if dump_json is None:
            return self._deconstruct_new_type(model)  # type: ignore[no-any-return]
        try:
            return dump_json(model)
        except Exception as exc:
            raise dump_failed(model, exc) from exc

    def _deconstruct_new_type(self, model: Any) -> Any:
        serializer = getattr(type(model), "__pydantic_serializer__", None)
        if serializer is None:
            try:
                return to_json(model)
            except Exception as exc:
                raise dump_failed(model, exc) from exc
        self._to_json[type(model)] = serializer.to_json
        return self.deconstruct(model)

    def bind_unchecked(self, schema: Any) -> Validate:
        if schema is None:
            return _identity
        if self._runs_own_code(schema):
            return self.bind(schema)  # validated once: see PydanticModelHandler.bind_unchecked
        return self._validator(schema).validate_json  # type: ignore[no-any-return]

    def bind_fused_encode(self, schema: Any, serializer: UncheckedSerializer,
                          fallback: Callable[[Any], bytes]) -> Callable[[Any], bytes] | None:
        return None  # the model writes its own JSON bytes: nothing to fuse

    def bind_fast_encode(self, schema: Any, serialize: Callable[[Any], bytes],
                         fallback: Callable[[Any], bytes]) -> Callable[[Any], bytes] | None:
        return None  # the same, by the older port

    def _make_validate(self, schema: Any) -> Validate:
        validate_json = self._validator(schema).validate_json

        def validate(message: Any) -> Any:
            try:
                return validate_json(message)
            except Exception as exc:
                raise parse_failed(exc, schema, message) from exc

        return validate

    def _make_deconstruct(self, schema: Any, queue: str | None) -> Dump:
        if not _is_model_class(schema):
            to_json_typed = _adapter(schema).serializer.to_json

            def dump_typed(model: Any) -> Any:
                try:
                    return to_json_typed(model, warnings="error")
                except Exception as exc:
                    raise dump_failed(model, exc, schema) from exc

            return dump_typed
        dump_json = _complete(schema).__pydantic_serializer__.to_json
        generic = self.deconstruct

        def dump(model: Any) -> Any:
            if type(model) is schema:
                try:
                    return dump_json(model)
                except Exception as exc:
                    raise dump_failed(model, exc) from exc
            if isinstance(model, schema):
                return generic(model)
            raise wrong_output(schema, model, queue)

        return dump


class PydanticListModelHandler(PydanticModelHandler):
    """``pydantic-list``: a batch of messages to a list of models, and a list of models back to a list of data.

    The engine validates a batch **per record** (through ``bind``), so one bad
    record goes to the DLQ alone while the rest of the batch reaches the
    handler as a list. ``construct`` also accepts a whole list (the py-volley
    shape) and then names the index of the first bad item. An output may be
    one model or a list of models.
    """

    def construct(self, message: Any, schema: Any) -> Any:
        validate = self.bind(schema)
        if not isinstance(message, list):
            return validate(message)
        models = []
        for index, item in enumerate(message):
            try:
                models.append(validate(item))
            except DataValidationError as exc:
                raise DataValidationError(one_line(f"item {index}: {exc.reason}"), message) from exc
        return models

    def deconstruct(self, model: Any) -> Any:
        to_python = self._to_python.get(type(model))  # one model: the common case first, without super()
        if to_python is not None:
            try:
                return to_python(model, mode="json")
            except Exception as exc:
                raise dump_failed(model, exc) from exc
        if isinstance(model, (list, tuple)):
            single = PydanticModelHandler.deconstruct
            return [single(self, m) for m in model]
        return self._deconstruct_new_type(model)

    @staticmethod
    def _accepts(message: Any, schema: type) -> bool:
        if isinstance(message, (list, tuple)):
            return all(isinstance(item, schema) for item in message)
        return isinstance(message, schema)

    def check_output(self, message: Any, schema: Any) -> None:
        if not isinstance(schema, type) or isinstance(message, schema):
            return
        if not isinstance(message, (list, tuple)):
            raise wrong_output(schema, message)
        for item in message:
            if not isinstance(item, schema):
                raise wrong_output(schema, item)

    def _make_deconstruct(self, schema: Any, queue: str | None) -> Dump:
        single = super()._make_deconstruct(schema, queue)

        def dump(model: Any) -> Any:
            if isinstance(model, (list, tuple)):
                return [single(m) for m in model]
            return single(model)

        return dump
