"""What a run did: counters, each input counted once at its final state, and a bounded list of errors."""

from __future__ import annotations

from dataclasses import dataclass, field

MAX_ERRORS = 100  # lines kept in RunReport.errors; the rest are only counted (a poison message fails forever)


@dataclass
class RunReport:
    """What a run did. Every consumed input ends in exactly one of acked, nacked, dead_lettered, failed, abandoned.

    ``dead_lettered`` counts inputs whose dead letter the DLQ's broker confirmed; ``failed`` those given back
    after a failure (no DLQ, or the DLQ or an output could not be written); ``abandoned`` those unfinished at
    shutdown or on a partition revoke, or settled in a transaction that aborted (they are delivered again).
    ``produced`` counts distinct outputs handed to producers (a re-produced output once). ``errors`` keeps the
    first ``MAX_ERRORS`` failure lines; ``errors_dropped`` counts the ones after. ``tracer_failures`` counts
    the tracer's calls that raised (the first of each kind of call is also an ``errors`` line).
    """

    consumed: int = 0
    acked: int = 0
    nacked: int = 0
    dead_lettered: int = 0
    failed: int = 0
    abandoned: int = 0
    retries: int = 0
    produced: int = 0
    elapsed_seconds: float = 0.0
    errors: list[str] = field(default_factory=list)
    errors_dropped: int = 0
    tracer_failures: int = 0  # tracer calls that raised (the messages were handled on; see run/tracing.py)

    @property
    def settled(self) -> int:
        return self.acked + self.nacked + self.dead_lettered + self.failed + self.abandoned

    def settled_counts(self) -> tuple[int, int]:
        """The final states an aborted transaction takes back (see ``void_since``): acked, dead-lettered."""
        return self.acked, self.dead_lettered

    def void_since(self, counts: tuple[int, int]) -> None:
        """An aborted transaction settled nothing: inputs acked or dead-lettered since ``counts`` come again
        (abandoned). Those given back (nacked, failed) stay counted so: their give-back reached the consumer (their
        delivery counts against max_deliveries), and it is what aborted the transaction."""
        acked, dead_lettered = counts
        self.abandoned += self.acked - acked + self.dead_lettered - dead_lettered
        self.acked, self.dead_lettered = counts

    def add_error(self, line: str) -> None:
        if len(self.errors) < MAX_ERRORS:
            self.errors.append(line)
        else:
            self.errors_dropped += 1
