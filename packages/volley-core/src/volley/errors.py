"""The exceptions Volley raises, grouped so that callers can catch by intent."""

from __future__ import annotations


class VolleyError(Exception):
    """Base of every exception Volley raises on purpose."""


class ConfigurationError(VolleyError, ValueError):
    """The configuration cannot work. Raised at Engine construction or start-up, never mid-stream.

    The message always says what to change.
    """


class BrokerUnavailableError(ConfigurationError):
    """No broker answered at start-up. The address may be wrong, or the broker not up yet (or down): unlike other
    configuration errors, starting again later can help, so ``volley run`` exits with 1 (as for an outage
    mid-stream), not 2, and ``volley run --workers N`` restarts the worker with its growing delay. A
    ``ConfigurationError``, for callers that catch that."""


class UnknownComponentError(ConfigurationError, KeyError):
    """A profile, connector, serializer or model handler name that no installed plugin provides."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class MessageError(VolleyError):
    """A message that cannot be processed because of its content. It goes to the dead-letter queue.

    ``payload`` is the raw data as received, ``reason`` a one-line explanation
    that ends up in the DLQ headers.
    """

    stage = "message"

    def __init__(self, reason: str, payload: bytes | object = b"") -> None:
        super().__init__(reason)
        self.reason = reason
        self.payload = payload


class SerializationError(MessageError):
    """The bytes could not be decoded (or a value could not be encoded) by the serializer."""

    stage = "deserialize"


class DataValidationError(MessageError):
    """The decoded data does not fit the queue's data model."""

    stage = "validate"


class DeliveryError(VolleyError):
    """A broker refused or lost an output for good (after its own retries)."""


class InvalidRecordError(DeliveryError):
    """A producer refused a record because of the record itself (a partition its topic lacks, an option the
    broker cannot honour, a record larger than the client takes): producing it again cannot help. The engine sends
    the input to the dead-letter queue at stage ``output``, as for any other malformed output. In exactly-once
    mode the input's other records may be in the transaction already: it aborts, and when the input comes again
    it goes to the dead-letter queue unhandled. A dead letter refused this way stops the app."""


class TransactionAbortedError(DeliveryError):
    """A record of an exactly-once app that was not sent because its transaction is over (aborted, or none was
    open): not the record's fault. The abort rewinds the input to the last commit, where it is consumed again, so
    the record is not retried and the input is not given back (which would count a delivery against
    ``max_deliveries``); the engine counts it abandoned and the transaction aborts."""


class ConsumerFailedError(VolleyError):
    """An input's client failed for good and can neither consume nor commit any more (librdkafka's fatal errors,
    such as a static group member fenced by another with the same ``group.instance.id``).

    A consumer raises it from ``consume``; the run stops with it (in-flight work finishes within the shutdown
    deadline) and ``volley run`` exits with status 1, so that a supervisor starts a fresh process. Nothing
    unacknowledged is lost: it is delivered again.
    """


class HandlerFailedError(VolleyError):
    """A message failed in the handler, exhausted its retries and had no dead-letter queue to go to."""
