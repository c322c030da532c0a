"""Volley: turn one Python function into a production message-stream worker.

    from volley import Engine, QueueConfig

    app = Engine(app_name="demo", input_queue="in", output_queues=["out"], queue_config={...})

    @app.stream_app
    def handler(message):
        return [("out", message)]

    handler()  # runs until SIGINT / SIGTERM
"""

from volley.config import QueueConfig
from volley.engine import Engine, StreamApp
from volley.errors import (
    ConfigurationError,
    ConsumerFailedError,
    DataValidationError,
    DeliveryError,
    HandlerFailedError,
    MessageError,
    SerializationError,
    UnknownComponentError,
    VolleyError,
)
from volley.memory import MemoryBroker
from volley.message import Envelope, MessageContext, OutgoingMessage
from volley.run import RunReport


def __getattr__(name: str) -> str:
    # The version comes from the installed metadata (one VERSION file for the suite), read on first use so that
    # ``import volley`` does not pay for importlib.metadata.
    if name == "__version__":
        from volley.plugins import distribution_version

        return distribution_version("volley-core") or "0+unknown"
    raise AttributeError(f"module 'volley' has no attribute {name!r}")


__all__ = [
    "ConfigurationError",
    "ConsumerFailedError",
    "DataValidationError",
    "DeliveryError",
    "Engine",
    "Envelope",
    "HandlerFailedError",
    "MemoryBroker",
    "MessageContext",
    "MessageError",
    "OutgoingMessage",
    "QueueConfig",
    "RunReport",
    "SerializationError",
    "StreamApp",
    "UnknownComponentError",
    "VolleyError",
    "__version__",
]
