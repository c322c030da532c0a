"""The callbacks Volley gives librdkafka, next to those a user puts in the queue's config."""

from __future__ import annotations

import logging
from typing import Any

from volley_kafka.clients import rdkafka_logger, with_callbacks


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
