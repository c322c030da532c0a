"""The ports: what the engine needs from a broker, a serializer and a model handler (the codec ones are defined in
volley.codec_ports and the observer events in volley.observer_events; every name is exported here).

Adapters satisfy these structurally; they import nothing from the engine and
inherit nothing. Everything on the per-message path works on batches
(``consume`` returns many envelopes, ``produce`` takes many records, ``ack``
takes many envelopes) because a per-message await or callback is what keeps
Python stream processors at a few thousand messages per second.

Optional capabilities are separate, small ``runtime_checkable`` protocols that
the engine detects with ``isinstance`` once at start-up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from volley.codec_ports import DUMP_MODES as DUMP_MODES
from volley.codec_ports import DeclaresDumpMode as DeclaresDumpMode
from volley.codec_ports import DeclaresWireFormat as DeclaresWireFormat
from volley.codec_ports import DeconstructBinder as DeconstructBinder
from volley.codec_ports import FastEncodeBinder as FastEncodeBinder
from volley.codec_ports import FusedDecodeBinder as FusedDecodeBinder
from volley.codec_ports import FusedEncodeBinder as FusedEncodeBinder
from volley.codec_ports import ModelHandler as ModelHandler
from volley.codec_ports import OutputChecker as OutputChecker
from volley.codec_ports import Serializer as Serializer
from volley.codec_ports import UncheckedDeserializer as UncheckedDeserializer
from volley.codec_ports import UncheckedSerializer as UncheckedSerializer
from volley.codec_ports import UncheckedValidatorBinder as UncheckedValidatorBinder
from volley.codec_ports import ValidatorBinder as ValidatorBinder
from volley.message import Envelope, Headers, OutgoingMessage
from volley.observer_events import CommitObserver as CommitObserver
from volley.observer_events import ConsumedObserver as ConsumedObserver
from volley.observer_events import DataModelTimeObserver as DataModelTimeObserver
from volley.observer_events import DeadLetterCountObserver as DeadLetterCountObserver
from volley.observer_events import DeliveryObserver as DeliveryObserver
from volley.observer_events import DepthObserver as DepthObserver
from volley.observer_events import HeartbeatObserver as HeartbeatObserver
from volley.observer_events import InFlightObserver as InFlightObserver
from volley.observer_events import LagObserver as LagObserver
from volley.observer_events import Observer as Observer
from volley.observer_events import ProcessTimeObserver as ProcessTimeObserver
from volley.observer_events import ProducedObserver as ProducedObserver
from volley.observer_events import ReadyObserver as ReadyObserver
from volley.observer_events import RetryObserver as RetryObserver
from volley.observer_events import StartObserver as StartObserver
from volley.observer_events import StopObserver as StopObserver
from volley.redaction import redacted_repr

DeliveryFailure = tuple[OutgoingMessage, BaseException]
DeliveryCallback = Callable[[Sequence[OutgoingMessage], Sequence[DeliveryFailure]], None]
"""Called by a producer with the records it has confirmed and those that failed for good.

A producer may call it from any thread, as often as it likes, but must report
every record it accepted exactly once. The engine's implementation is
thread-safe and cheap, so report in batches where the broker allows it.
"""

PartitionId = tuple[str, int]
"""A (topic, partition) pair, as rebalance notifications name them."""


@dataclass(frozen=True, slots=True, repr=False)
class QueueSpec:
    """One queue as a connector sees it once configuration has been resolved.

    ``name`` is the application's alias, ``value`` the broker's name for it (a
    topic, an RSMQ queue name). ``config`` is the user's connector settings,
    passed through untouched (librdkafka options, redis options, ...).
    """

    name: str
    value: str
    connector: str
    config: Mapping[str, Any] = field(default_factory=dict)
    app_name: str = "volley"
    role: str = "input"  # "input" | "output" | "dlq"

    def __repr__(self) -> str:
        """Names the secrets in ``config`` (passwords, tokens) without showing them: tracebacks print it."""
        return redacted_repr(self)


@runtime_checkable
class Consumer(Protocol):
    """Pulls envelopes from one input queue and settles them."""

    async def start(self) -> None:
        """Connect and subscribe. Misconfiguration must raise here, at start-up, not on first poll."""

    async def consume(self, max_messages: int, timeout: float) -> Sequence[Envelope]:
        """Return up to ``max_messages`` envelopes, waiting at most ``timeout`` seconds for the first.

        How failures reach the engine: an exception that is not a ``VolleyError`` (a broker outage) is
        logged and the call retried with backoff; a ``VolleyError`` stops the run, which ends by raising it.
        A consumer whose client can no longer consume or commit raises ``ConsumerFailedError``, never just
        returns nothing: a worker that stays alive without consuming looks healthy and does nothing.
        """

    async def ack(self, envelopes: Sequence[Envelope]) -> None:
        """Mark envelopes as finished: their outputs are confirmed, they must never be redelivered.

        Envelopes may be acknowledged in any order; a connector with ordered
        positions (Kafka) must only ever commit the contiguous prefix of
        finished positions.
        """

    async def nack(self, envelopes: Sequence[Envelope], delay: float) -> None:
        """Give envelopes back: they were not processed and must be delivered again, after ``delay`` if possible."""

    async def close(self) -> None:
        """Commit what is finished and release the connection. Called once, after the last ack."""


@runtime_checkable
class Producer(Protocol):
    """Sends serialized records to one or more queues of one broker."""

    async def start(self) -> None:
        """Connect. Misconfiguration must raise here."""

    def produce(self, messages: Sequence[OutgoingMessage], on_delivery: DeliveryCallback) -> None:
        """Accept records for sending without blocking the event loop; report each through ``on_delivery``."""

    async def flush(self, timeout: float) -> None:
        """Wait until every accepted record has been reported; raise ``TimeoutError`` past ``timeout``."""

    async def close(self) -> None:
        """Flush and release the connection."""


@runtime_checkable
class Pausable(Protocol):
    """A consumer that can stop fetching while staying a live member of its group (Kafka's pause/resume).

    Without it the engine simply stops calling ``consume`` under backpressure.
    """

    def pause(self) -> None: ...

    def resume(self) -> None: ...


RevokeHandler = Callable[[Sequence[PartitionId]], Awaitable[None]]


@runtime_checkable
class RebalanceAware(Protocol):
    """A consumer whose partitions can be taken away (Kafka consumer groups).

    Before giving partitions up, the consumer awaits the engine's handler, which
    drops queued work of those partitions, waits (within the shutdown deadline)
    for in-flight messages to finish and flushes the producers. The consumer then
    commits synchronously and forgets the partitions.
    """

    def set_revoke_handler(self, handler: RevokeHandler) -> None: ...


@runtime_checkable
class Transactional(Protocol):
    """A consumer that commits its inputs and the outputs they caused atomically (Kafka exactly-once).

    The engine then works in barrier mode: ``begin`` before producing a batch's
    outputs, ``commit`` once every output is confirmed, ``abort`` if anything in
    the batch failed to deliver (the consumer rewinds to its last commit). While
    ``commit`` or ``abort`` runs, the engine goes on calling ``consume`` and
    handling what it returns; it produces nothing before the next ``begin``,
    which it calls only once the commit has returned.

    An input given back (``nack``) aborts its transaction: the engine calls
    ``nack`` first, then ``abort``. The consumer keeps the delivery count and
    the delay across the rewind, and hands out nothing of the input's partition
    from the input on until what came before it is committed (or being
    committed), so that each abort is followed by progress.
    """

    @property
    def transactional(self) -> bool: ...

    async def begin(self) -> None: ...

    async def commit(self, envelopes: Sequence[Envelope]) -> None: ...

    async def abort(self) -> None: ...


@runtime_checkable
class ReasonedNack(Protocol):
    """A consumer that can remember why a message was given back (RSMQ keeps it for the next delivery).

    The engine calls this instead of ``nack`` when the consumer has it, grouping
    envelopes by reason, so that a message that finally goes to the DLQ for
    being redelivered too often carries its last error.
    """

    async def nack_with_reason(self, envelopes: Sequence[Envelope], delay: float, reason: str) -> None: ...


@runtime_checkable
class LagReporter(Protocol):
    """A consumer that can tell how far behind it is, per partition, for metrics."""

    def lag(self) -> Mapping[PartitionId, int]: ...


@runtime_checkable
class DepthReporter(Protocol):
    """A consumer that can tell how many messages wait in its queue (RSMQ), for metrics."""

    async def depth(self) -> int: ...


@runtime_checkable
class Drainable(Protocol):
    """A consumer that can tell that nothing more is due now or later (nothing ready, held or delayed).

    ``run_until_drained`` asks it, off the event loop (it may query the broker), once the engine itself
    looks idle and a poll came back empty after the last batch. Without it, that empty poll is taken as drained.
    """

    def is_drained(self) -> bool: ...


@runtime_checkable
class InstantlyDrainable(Protocol):
    """A consumer whose drain check is instant (local state, no I/O) and exact (it counts what a poll in progress
    would hand out, as when taking a message and marking it held is one step).

    The engine asks it on the event loop as soon as the last ack is through, without waiting for an empty poll
    (the in-memory consumer is one).
    """

    def is_drained_now(self) -> bool: ...


@runtime_checkable
class ReadinessReporter(Protocol):
    """An instrumented consumer that reports readiness itself (``observer.on_ready``), for instance only once
    a consumer group has assigned it partitions, and no longer after it lost them. With
    ``reports_readiness`` true, the engine does not report the app ready when the consumer has started; it
    still reports it not ready when shutdown begins."""

    reports_readiness: bool


@runtime_checkable
class Instrumented(Protocol):
    """A consumer or producer that reports its own metrics (commit latency, lag, queue depth).

    The engine hands it the observer once, before ``start``; it then calls
    ``on_commit``, ``on_lag`` or ``on_depth`` when it has something to say.
    """

    def instrument(self, observer: Observer, app_name: str) -> None: ...


@runtime_checkable
class ConsumerFactory(Protocol):
    """Builds consumers: a connector, or an object named by a queue's ``consumer:`` setting."""

    def create_consumer(self, queue: QueueSpec) -> Consumer: ...


@runtime_checkable
class ProducerFactory(Protocol):
    """Builds producers: a connector, or an object named by a queue's ``producer:`` setting."""

    def create_producer(self, queue: QueueSpec) -> Producer: ...


@runtime_checkable
class Connector(ConsumerFactory, ProducerFactory, Protocol):
    """Builds consumers and producers for one kind of broker. Registered by name through the plugin hooks."""


@runtime_checkable
class CheckedConnector(Protocol):
    """A connector that can refuse a queue's settings at Engine construction, before anything starts."""

    def check(self, queue: QueueSpec) -> None:
        """Raise ``ConfigurationError`` (saying what to change) for settings that cannot work."""


# The codec ports (Serializer, ModelHandler and their optional abilities) are in volley.codec_ports, imported
# above: part of the ports.


# The observers' events (StartObserver ... StopObserver, and Observer, all of them) are in volley.observer_events,
# imported above: part of the ports.


# ------------------------------------------------------------------ tracing
# A tracer (volley-otel is one) follows each input through the run. It is named by ``Engine(tracing=...)`` and
# registered through the ``volley_register_tracers`` hook; the engine binds it once per run and, with none
# configured, binds nothing on the message path at all.


@runtime_checkable
class MessageTrace(Protocol):
    """The trace of one input, or of one batch handled as one (volley-otel: its "process" span).

    The engine calls, on the thread that handles the message: ``activate`` / ``deactivate`` around the
    handler's work, ``retry`` per retried call, ``inject`` per output, ``fail`` once if the input failed,
    ``dead_letter`` per letter written for it, and ``end`` exactly once.
    """

    def activate(self) -> object:
        """Make this trace the current one while the handler runs (spans the handler starts become its children,
        log records it writes can carry its ids); return what ``deactivate`` needs to undo it."""

    def deactivate(self, activation: object) -> None: ...

    def inject(self, headers: Headers | None) -> Headers | None:
        """An output's headers with this trace's context added: a new dict (``headers`` stays unchanged); or
        ``headers`` itself when there is no context to add."""

    def retry(self, attempt: int, error: BaseException) -> None:
        """The handler call failed with ``error`` and is retried (``attempt``: 1 for the first retry)."""

    def fail(self, stage: str, error: BaseException) -> None:
        """The input failed for good at ``stage`` (deserialize, validate, redelivery, handler, output)."""

    def dead_letter(self, destination: str, headers: Headers) -> None:
        """The input goes to the dead-letter queue ``destination`` in a letter whose ``headers`` (changed in place)
        must carry this trace's context, so that the letter, and a replay of it, leads back to this trace."""

    def end(self) -> None: ...


@runtime_checkable
class RunTracer(Protocol):
    """A tracer bound to one run's queues."""

    def start(self, members: Sequence[Envelope], batch: bool) -> MessageTrace | None:
        """The trace of one input (``batch`` false, one member) or of a batch handled as one (a batch handler's
        group), continuing the context each member's headers carry. None: there is nothing to record or pass on
        for it (a tracer that records nothing, and an input without trace context): the engine handles it, and
        settles it if it fails, as if nothing traced."""

    def sent(self, records: Sequence[OutgoingMessage]) -> None:
        """Records (already injected) were handed to a producer in one call; called once per call."""


@runtime_checkable
class Tracer(Protocol):
    """What a ``volley_register_tracers`` factory returns: ``factory(app_name, settings) -> Tracer``."""

    def bind(self, source: QueueSpec, outputs: Sequence[QueueSpec]) -> RunTracer:
        """The tracer of one run reading ``source`` and writing ``outputs`` (dead-letter queue included)."""


# ---------------------------------------------------------------------------------------------------------------------
# Dead letters you can work with (``volley dlq``): reading a queue without consuming it, and taking messages out of it
# only once they are dealt with. Optional: a connector without them just cannot serve ``volley dlq``.


@runtime_checkable
class QueueBrowser(Protocol):
    """Reads one queue without consuming it: nothing is committed, no visibility changes, no delivery is counted,
    and a worker consuming the queue meanwhile is not disturbed.

    ``browse`` returns the next messages in queue order, after those it returned before, up to the queue's end as it
    was when ``start`` returned; an empty result means that end is reached. ``Envelope.position`` (with
    ``partition``) identifies a message for good, ``timestamp`` says when it was written (seconds since the epoch,
    when the broker knows it).
    """

    async def start(self) -> None: ...

    async def browse(self, max_messages: int) -> Sequence[Envelope]: ...

    async def close(self) -> None: ...


@runtime_checkable
class BrowsableConnector(Protocol):
    """A connector that can open a :class:`QueueBrowser` on one of its queues."""

    def create_browser(self, queue: QueueSpec) -> QueueBrowser: ...


@runtime_checkable
class LocatingConnector(Protocol):
    """A connector that can say where one of its queues lives (its cluster, server or file), as text that is the
    same for every app that names that queue there. What Volley keeps per queue outside the broker (the dead-letter
    replay journal and its lock) is kept per location, so that two queues of one name on two brokers stay apart.
    Without it, the connector's name and the queue's stand for the queue."""

    def locate(self, queue: QueueSpec) -> str: ...


@runtime_checkable
class SettlingBrowser(Protocol):
    """A browser that can take browsed messages out of the queue once they are dealt with (replayed and confirmed,
    or purged). Called only after a republish was confirmed, so that a crash in between duplicates, never loses.

    ``removes_each`` True: ``settle`` deletes exactly these messages (RSMQ, SQLite, memory), and a browser started
    afterwards never returns them. False (Kafka, whose topics cannot drop single records): ``settle`` marks them done
    and commits, under the browser's own consumer group, the contiguous prefix of done positions per partition; a
    browser started afterwards begins at that commit, and done messages past it are returned again (the caller
    remembers them).
    """

    removes_each: bool

    async def settle(self, envelopes: Sequence[Envelope]) -> None: ...


@runtime_checkable
class PurgeableBefore(Protocol):
    """A browser whose queue can drop everything before a point, but no single record (Kafka's delete-records).

    Exactly one of ``offset`` (per partition) and ``timestamp`` (seconds since the epoch: the first record written
    at or after it) is given. Returns how many records were dropped, per partition.
    """

    async def purge_before(self, *, offset: int | None = None, timestamp: float | None = None) -> Mapping[int, int]: ...


@runtime_checkable
class DeadLetterObserver(Protocol):
    """An observer that counts what ``volley dlq`` did, by the letters' source queue (the broker's name)."""

    def on_dead_letters_replayed(self, app_name: str, source_queue: str, count: int) -> None: ...

    def on_dead_letters_purged(self, app_name: str, source_queue: str, count: int) -> None: ...


@runtime_checkable
class DeclaresMetricsSettings(Protocol):
    """An observer factory (registered with ``volley_register_observers``) that names the ``metrics_settings`` keys
    it reads. When every installed observer factory does, the Engine refuses any other key: a misspelled
    ``metrics_hots`` would otherwise be ignored, and the metrics bound to every interface."""

    settings_keys: frozenset[str]


# ================================================================== delivery terms (share groups)
# What a connector's consumers promise about delivery where it is less than a partitioned log's. The engine
# reads it once, when it resolves the input queue, so that a setting the connector cannot honour fails at
# Engine construction instead of silently meaning less.


@dataclass(frozen=True, slots=True)
class DeliveryTerms:
    """The delivery promises of one input queue's consumers.

    ``ordered``: records of one partition (or key) reach the consumer in order, so ``ordering: partition`` /
    ``key`` can be honoured; False (Kafka share groups): any member may get any record at any time, and only
    ``ordering: none`` is accepted. ``exactly_once``: the consumer can commit its inputs with its outputs
    (``Transactional``). ``delivery_limit``: the broker gives up on a record after this many deliveries
    (Kafka share groups archive it, which drops it), so the engine dead-letters a record at its next-to-last
    delivery at the latest (the last is left for a dead letter that fails), whatever ``max_deliveries`` says;
    None: no such limit.
    """

    ordered: bool = True
    exactly_once: bool = False
    delivery_limit: int | None = None


@runtime_checkable
class DeclaresDeliveryTerms(Protocol):
    """A connector whose consumers promise less than order within a partition (Kafka share groups)."""

    def delivery_terms(self, queue: QueueSpec) -> DeliveryTerms: ...
