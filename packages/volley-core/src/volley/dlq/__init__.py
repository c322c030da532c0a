"""Dead letters you can work with: ``volley dlq inspect | replay | purge``.

The pieces: :mod:`~volley.dlq.letter` (a letter read through its headers), :mod:`~volley.dlq.filters`,
:mod:`~volley.dlq.target` (an app's dead-letter queue and where letters go back to), :mod:`~volley.dlq.replay`
(the confirmed, resumable replay loop and its :mod:`~volley.dlq.journal`), :mod:`~volley.dlq.inspect`,
:mod:`~volley.dlq.purge`, and the command line in :mod:`~volley.dlq.command`. Connectors take part through the
ports ``QueueBrowser``, ``BrowsableConnector``, ``SettlingBrowser`` and ``PurgeableBefore`` (``volley.ports``).
"""

from volley.dlq.filters import LetterFilter, parse_time
from volley.dlq.inspect import Inspection, inspect
from volley.dlq.journal import Journal
from volley.dlq.letter import REPLAY_COUNT, DeadLetter
from volley.dlq.purge import CannotPurgeSingleLettersError, purge, purge_before
from volley.dlq.replay import ReplayOptions, ReplayStoppedError, ReplaySummary, replay
from volley.dlq.target import DeadLetterQueue

__all__ = [
    "REPLAY_COUNT",
    "CannotPurgeSingleLettersError",
    "DeadLetter",
    "DeadLetterQueue",
    "Inspection",
    "Journal",
    "LetterFilter",
    "ReplayOptions",
    "ReplayStoppedError",
    "ReplaySummary",
    "inspect",
    "parse_time",
    "purge",
    "purge_before",
    "replay",
]
