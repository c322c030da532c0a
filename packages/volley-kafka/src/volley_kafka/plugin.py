"""volley-kafka's plugin: the ``confluent`` connector (alias ``kafka``) and the ``confluent*`` profiles.

The profiles mirror py-volley's, so that existing configurations keep working;
``confluent-eos`` adds exactly-once processing (Kafka to Kafka). The ``confluent-share`` connector (alias
``kafka-share``) and its ``confluent-share*`` profiles consume through a share group (KIP-932).
"""

from __future__ import annotations

from volley.plugins import Register, hookimpl
from volley_kafka.connector import KafkaConnector
from volley_kafka.settings import EXACTLY_ONCE
from volley_kafka.share_connector import ShareConnector

GENERIC_MESSAGE = "volley_serializers.models.GenericMessage"

_connector = KafkaConnector()
_share = ShareConnector(_connector)


@hookimpl
def volley_register_connectors(register: Register) -> None:
    register("confluent", _connector)
    register("kafka", _connector)
    register("confluent-share", _share)
    register("kafka-share", _share)


@hookimpl
def volley_register_profiles(register: Register) -> None:
    json_pydantic = {"connector": "confluent", "serializer": "orjson", "model_handler": "pydantic",
                     "data_model": GENERIC_MESSAGE}
    register("confluent", dict(json_pydantic))
    register("confluent-orjson-pydantic", dict(json_pydantic))
    register("confluent-batch-json", {"connector": "confluent", "serializer": "orjson",
                                      "model_handler": "pydantic-list", "data_model": GENERIC_MESSAGE,
                                      "batch_size": 100})
    register("confluent-pydantic", {"connector": "confluent", "serializer": "none", "model_handler": "pydantic-parser",
                                    "data_model": GENERIC_MESSAGE})
    register("confluent-msgpack-pydantic", {"connector": "confluent", "serializer": "msgpack",
                                            "model_handler": "pydantic", "data_model": GENERIC_MESSAGE})
    register("confluent-dlq", {"connector": "confluent", "serializer": "none", "model_handler": "none",
                               "data_model": None})
    register("confluent-eos", {**json_pydantic, "config": {EXACTLY_ONCE: True}})
    _register_share_profiles(register)


def _register_share_profiles(register: Register) -> None:
    """The same bundles on a share group: ``confluent-share`` mirrors ``confluent``, and so on."""
    share = "confluent-share"
    json_pydantic = {"connector": share, "serializer": "orjson", "model_handler": "pydantic",
                     "data_model": GENERIC_MESSAGE}
    register(share, dict(json_pydantic))
    register(f"{share}-orjson-pydantic", dict(json_pydantic))
    register(f"{share}-batch-json", {"connector": share, "serializer": "orjson", "model_handler": "pydantic-list",
                                     "data_model": GENERIC_MESSAGE, "batch_size": 100})
    register(f"{share}-pydantic", {"connector": share, "serializer": "none", "model_handler": "pydantic-parser",
                                   "data_model": GENERIC_MESSAGE})
    register(f"{share}-msgpack-pydantic", {"connector": share, "serializer": "msgpack", "model_handler": "pydantic",
                                           "data_model": GENERIC_MESSAGE})
    # Dead letters go to an ordinary topic, written (and read back by ``volley dlq``) through the consumer-group
    # connector.
    register(f"{share}-dlq", {"connector": "confluent", "serializer": "none", "model_handler": "none",
                              "data_model": None})
