"""Volley's RSMQ connector: Redis Simple Message Queue, wire-compatible with PyRSMQ and py-volley.

Install the distribution and the ``rsmq*`` profiles exist; see ``settings``
for the queue ``config`` keys, ``consumer`` for the acknowledgement and
visibility-timeout policy, ``envelope`` for how dead letters keep their
error headers.
"""

from volley_rsmq.client import RsmqClient
from volley_rsmq.connector import RsmqConnector
from volley_rsmq.consumer import LAST_ERROR_HEADER, RsmqConsumer
from volley_rsmq.producer import RsmqProducer
from volley_rsmq.settings import RsmqSettings, parse_settings

__all__ = [
    "LAST_ERROR_HEADER",
    "RsmqClient",
    "RsmqConnector",
    "RsmqConsumer",
    "RsmqProducer",
    "RsmqSettings",
    "parse_settings",
]
