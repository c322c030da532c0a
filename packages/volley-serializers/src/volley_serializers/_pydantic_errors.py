"""How the Pydantic handlers word their errors: one line for the dead-letter headers, never the input itself."""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from volley.errors import DataValidationError, SerializationError

MAX_REASON_CHARS = 500
MAX_REASON_ERRORS = 3


def model_name(schema: Any) -> str:
    """How error messages name a data model: the class name, or the type expression."""
    return schema.__qualname__ if isinstance(schema, type) else repr(schema)


def one_line(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 3] + "..."


def validation_reason(exc: BaseException, schema: Any) -> str:
    """A one-line reason for the DLQ headers: which fields failed and why, never the (possibly huge) input."""
    if isinstance(exc, ValidationError):
        errors = exc.errors(include_url=False, include_context=False, include_input=False)
        parts = [f"{'.'.join(str(p) for p in e['loc']) or '(root)'}: {e['msg']}" for e in errors[:MAX_REASON_ERRORS]]
        if len(errors) > MAX_REASON_ERRORS:
            parts.append(f"and {len(errors) - MAX_REASON_ERRORS} more")
        count = f"{len(errors)} validation error{'s' if len(errors) != 1 else ''}"
        return one_line(f"{count} for {exc.title}: {'; '.join(parts)}")
    return one_line(f"{model_name(schema)}: {type(exc).__name__}: {exc}")


def wrong_output(schema: Any, message: Any, queue: str | None = None) -> TypeError:
    name = model_name(schema)
    where = "the queue's" if queue is None else f"queue {queue!r}'s"
    return TypeError(
        f"{where} data model is {name}, but the handler produced {type(message).__qualname__}: "
        f"return {name} instances (or change the queue's data_model)"
    )


def dump_failed(model: Any, exc: BaseException, schema: Any = None) -> SerializationError:
    what = type(model).__qualname__ if schema is None else f"{type(model).__qualname__} as {model_name(schema)}"
    return SerializationError(one_line(f"cannot dump {what}: {type(exc).__name__}: {exc}"), model)


def parse_failed(exc: BaseException, schema: Any, message: Any) -> DataValidationError | SerializationError:
    reason = validation_reason(exc, schema)
    if isinstance(exc, ValidationError):
        kinds = {e["type"] for e in exc.errors(include_url=False, include_context=False, include_input=False)}
        if "json_invalid" in kinds:
            return SerializationError(reason, message)
        if "json_type" in kinds:
            reason = one_line(
                f"{reason} (pydantic-parser reads raw bytes: configure this queue with serializer 'none', "
                "or use model_handler 'pydantic' after a serializer)"
            )
    return DataValidationError(reason, message)
