"""The callbacks Volley gives librdkafka, next to those a user puts in the queue's config."""

from __future__ import annotations

import logging
import socket
import time
from typing import Any

from volley_kafka.clients import admin_config, rdkafka_logger, with_callbacks
from volley_kafka.producer_checks import topic_max_message_bytes


def test_volleys_callbacks_are_set_and_a_users_of_the_same_name_runs_after_them() -> None:
    calls: list[tuple[str, Any]] = []
    users_logger = logging.getLogger("an-app.kafka")
    config = with_callbacks({"bootstrap.servers": "b:9092", "on_commit": lambda *a: calls.append(("user", a)),
                             "logger": users_logger},
                            on_commit=lambda *a: calls.append(("volley", a)),
                            error_cb=lambda *a: calls.append(("volley-error", a)))
    config["on_commit"](None, [1])
    config["error_cb"]("e")
    assert calls == [("volley", (None, [1])), ("user", (None, [1])), ("volley-error", ("e",))]
    assert config["logger"] is users_logger, "a logger of the user's is kept"
    assert with_callbacks({})["logger"] is rdkafka_logger


def test_an_admin_client_keeps_what_reaching_the_brokers_needs() -> None:
    """A review found the start-up admin clients built from a prefix list: an ``oauth_cb`` (MSK IAM, OAuth) and
    ``enable.ssl.certificate.verification`` were dropped, so the admin could not authenticate and hung."""
    def token(_config: object) -> tuple[str, float]:
        return "t", 0.0

    config = admin_config({"bootstrap.servers": "b:9092", "security.protocol": "SASL_SSL", "oauth_cb": token,
                           "enable.ssl.certificate.verification": False, "https.ca.location": "/ca",
                           "linger.ms": 5, "group.id": "g", "share.acknowledgement.mode": "explicit",
                           "transactional.id": "t", "on_delivery": print})
    assert config == {"bootstrap.servers": "b:9092", "security.protocol": "SASL_SSL", "oauth_cb": token,
                      "enable.ssl.certificate.verification": False, "https.ca.location": "/ca"}


def test_a_topic_limit_that_cannot_be_read_in_time_is_not_checked() -> None:
    """A broker address that accepts connections and never answers: the advisory check gives up within its
    timeout instead of failing the start with a bare TimeoutError (a review found it)."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        started = time.monotonic()
        limit = topic_max_message_bytes({"bootstrap.servers": f"127.0.0.1:{port}"}, "t", 1.0, what="queue 'out'")
        assert limit is None
        assert time.monotonic() - started < 10
