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

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
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
