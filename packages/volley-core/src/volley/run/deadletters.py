"""Dead letters: the records that carry a failed input to the dead-letter queue, and what is said once they land.

A dead letter is the input as received (value, key, headers) plus ``volley-*`` headers that say where it came
from and why it failed. The input counts as dead-lettered, and observers and the log hear of it, only once the
DLQ's broker has confirmed every letter.
"""

from __future__ import annotations

import logging

from volley.message import Headers, OutgoingMessage
from volley.ports import Observer
from volley.run.tokens import DeadLetter, describe

logger = logging.getLogger("volley")

HEADER_PREFIX = "volley-"
QUIET_STAGES = frozenset({"deserialize", "validate", "redelivery"})  # bad input: a warning, not an error


def letters(letter: DeadLetter, error_type: str, topic: str) -> list[OutgoingMessage]:
    """One record per failed input, each carrying ``letter`` as its token."""
    records = []
    for env in letter.members:
        headers: Headers = dict(env.headers) if env.headers else {}
        headers[HEADER_PREFIX + "error-stage"] = letter.stage.encode()
        headers[HEADER_PREFIX + "error-type"] = error_type.encode()
        headers[HEADER_PREFIX + "error-reason"] = letter.reason.encode(errors="replace")
        headers[HEADER_PREFIX + "source-queue"] = env.source.encode()
        headers[HEADER_PREFIX + "source-position"] = str(env.position).encode()
        if env.partition is not None:
            headers[HEADER_PREFIX + "source-partition"] = str(env.partition).encode()
        headers[HEADER_PREFIX + "attempts"] = str(env.attempt).encode()
        records.append(OutgoingMessage(topic, env.value, env.key, headers, None, None, letter))
    return records


def announce(letter: DeadLetter, app_name: str, topic: str, observer: Observer) -> None:
    """The DLQ confirmed ``letter``: count it for observers and log it."""
    observer.on_dead_letter(app_name, letter.stage, len(letter.members))
    log = logger.warning if letter.stage in QUIET_STAGES else logger.error
    log("%s: %s to the dead-letter queue %s (%s failed: %s)", app_name, describe(letter.failed), topic,
        letter.stage, letter.reason)
