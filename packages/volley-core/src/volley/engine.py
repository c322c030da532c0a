"""The Engine and ``stream_app``: the py-volley compatible front door.

The Engine resolves the configuration (so that every mistake fails at
construction) and ``stream_app`` wraps the user's function into a
``StreamApp`` that runs it (see ``volley.run``).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import math
import os
import signal
import threading
import warnings
from collections.abc import Callable, Mapping, Sequence
from types import GeneratorType
from typing import Any

from volley.config import QueueConfig, is_none_name, load_yaml, normalize_queue_config
from volley.errors import ConfigurationError
from volley.observe import MultiObserver
from volley.plugins import Registry, get_registry
from volley.ports import CheckedConnector, DeclaresMetricsSettings, Observer, Tracer
from volley.queues import ResolvedQueue, resolve_queue
from volley.run import BLOCKED_EXIT_CODE, Run, RunReport

logger = logging.getLogger("volley")

FAILURE_POLICIES = ("stop", "continue")
TRACING_ENV = "VOLLEY_TRACING"  # names the tracer when Engine(tracing=...) does not: ops turn tracing on


class Engine:
    """A Volley application: one input queue, any number of output queues, an optional dead-letter queue.

    The first eight arguments are py-volley's, with the same meaning; the rest
    tune delivery, concurrency and failure handling. All configuration errors
    are raised here, not when the app starts.
    """

    def __init__(
        self,
        app_name: str = "volley",
        input_queue: str = "input-queue",
        output_queues: Sequence[str] | None = None,
        dead_letter_queue: str | None = None,
        queue_config: Sequence[QueueConfig] | Mapping[str, Any] | None = None,
        yaml_config_path: str | os.PathLike[str] = "./volley_config.yml",
        metrics_port: int | None = 3000,
        poll_interval_seconds: float = 1.0,
        *,
        max_in_flight: int = 100,
        max_buffered: int | None = None,
        consume_batch_size: int = 500,
        max_retries: int = 3,
        retry_backoff_seconds: float = 0.1,
        retry_backoff_max_seconds: float = 30.0,
        max_deliveries: int = 10,
        redelivery_delay_seconds: float = 1.0,
        on_failure: str = "stop",
        shutdown_timeout_seconds: float = 30.0,
        transaction_interval_seconds: float = 0.1,
        transaction_max_messages: int = 10_000,
        sync_handler_mode: str = "auto",
        tune_gc: bool = True,
        observers: Sequence[Observer] | None = None,
        metrics_settings: Mapping[str, Any] | None = None,
        tracing: str | None = None,
        tracing_settings: Mapping[str, Any] | None = None,
        registry: Registry | None = None,
    ) -> None:
        self._init_kwargs: dict[str, Any] = {
            k: v for k, v in locals().items() if k not in ("self", "queue_config", "yaml_config_path", "registry")
        }
        self.app_name = app_name
        self.input_queue = input_queue
        if isinstance(output_queues, (str, bytes)):
            raise ConfigurationError(
                f"output_queues must be a list of queue names, got the string {output_queues!r}: "
                f"write output_queues=[{output_queues!r}]"
            )
        self.output_queues = list(output_queues or [])
        self.dead_letter_queue = dead_letter_queue
        self.metrics_port = metrics_port
        self.poll_interval_seconds = _positive(poll_interval_seconds, "poll_interval_seconds", allow_zero=True)
        self.max_in_flight = _count(max_in_flight, "max_in_flight")
        self.consume_batch_size = _count(consume_batch_size, "consume_batch_size")
        self.max_buffered = int(
            _positive(max_buffered, "max_buffered")
            if max_buffered is not None
            else max(4 * self.consume_batch_size, 4 * self.max_in_flight)
        )
        # Whether max_buffered was given: an exactly-once input's default bound is transaction_max_messages instead
        # (max_buffered keeps the at-least-once default; the run decides, once it knows the input is transactional).
        self.max_buffered_given = max_buffered is not None
        self.max_retries = _non_negative(max_retries, "max_retries")
        self.retry_backoff_seconds = _positive(retry_backoff_seconds, "retry_backoff_seconds", allow_zero=True)
        self.retry_backoff_max_seconds = _positive(retry_backoff_max_seconds, "retry_backoff_max_seconds",
                                                   allow_zero=True)
        self.max_deliveries = _count(max_deliveries, "max_deliveries")
        self.redelivery_delay_seconds = _positive(redelivery_delay_seconds, "redelivery_delay_seconds",
                                                  allow_zero=True)
        if on_failure not in FAILURE_POLICIES:
            raise ConfigurationError(f"on_failure must be one of {FAILURE_POLICIES}, got {on_failure!r}")
        self.on_failure = on_failure
        if sync_handler_mode not in ("auto", "thread"):
            raise ConfigurationError(f"sync_handler_mode must be 'auto' or 'thread', got {sync_handler_mode!r}")
        self.sync_handler_mode = sync_handler_mode
        if not isinstance(tune_gc, bool):  # ("no" would have meant True)
            raise ConfigurationError(f"tune_gc must be True or False, got {tune_gc!r}")
        self.tune_gc = tune_gc
        self.shutdown_timeout_seconds = _positive(shutdown_timeout_seconds, "shutdown_timeout_seconds")
        self.transaction_interval_seconds = _positive(transaction_interval_seconds, "transaction_interval_seconds")
        self.transaction_max_messages = _count(transaction_max_messages, "transaction_max_messages")
        self.registry = registry or get_registry()

        self.queue_config = config = _load_queue_config(queue_config, yaml_config_path)
        _check_queue_names(config, input_queue, self.output_queues, dead_letter_queue)
        if dead_letter_queue is None:
            logger.warning(
                "%s: no dead_letter_queue configured: a message that cannot be processed %s",
                app_name,
                "stops the app" if on_failure == "stop" else "is logged and given back to the broker",
            )
        self.queues: dict[str, ResolvedQueue] = self._resolve_queues()
        self._bound_deliveries()
        # Fail now, not at start, on connector settings that cannot work.
        self._check_connectors()
        self.observer = self._build_observer(observers, metrics_settings)
        self.tracer = self._build_tracer(tracing, tracing_settings)

    def _resolve_queues(self) -> dict[str, ResolvedQueue]:
        """Each queue named once, in the order input, outputs, dead letters (a name's first role wins)."""
        roles = [(self.input_queue, "input"), *((name, "output") for name in self.output_queues)]
        if self.dead_letter_queue is not None:
            roles.append((self.dead_letter_queue, "dlq"))
        queues: dict[str, ResolvedQueue] = {}
        for name, role in roles:
            if name not in queues:
                queues[name] = resolve_queue(self.registry, name, self.queue_config[name], self.app_name, role)
        return queues

    def _bound_deliveries(self) -> None:
        """A broker that gives up on a record after N deliveries (a share group archives it, which drops it)
        would never show the engine delivery N + 1. A record still failing goes to the DLQ on delivery N - 1, so
        that one delivery is left should its dead letter fail to be written (given back on delivery N, the
        broker archives it: lost)."""
        limit = self.input.delivery_limit
        if limit is not None and self.max_deliveries >= limit - 1:
            bounded = max(1, limit - 2)
            logger.info("%s: the input %r is delivered at most %d times by its broker; a record still failing "
                        "goes to the dead-letter queue on its delivery %d (max_deliveries=%d is above it)",
                        self.app_name, self.input_queue, limit, bounded + 1, self.max_deliveries)
            self.max_deliveries = bounded

    def _build_observer(self, observers: Sequence[Observer] | None,
                        metrics_settings: Mapping[str, Any] | None) -> MultiObserver:
        """The given observers, then one from each registered observer plugin."""
        settings = dict(metrics_settings or {})
        built: list[Observer] = list(observers or [])
        plugins = self.registry.names("observer")
        factories = [self.registry.get("observer", name) for name in plugins]
        _check_metrics_settings(settings, plugins, factories)
        built.extend(factory(self.app_name, self.metrics_port, settings) for factory in factories)
        if self.metrics_port is not None and not plugins and not observers:
            warnings.warn(
                f"Engine(metrics_port={self.metrics_port}) but no metrics observer is installed, so no metrics "
                "are served: pip install volley-prometheus (or pass metrics_port=None)",
                stacklevel=3,  # the caller of Engine()
            )
        return MultiObserver(built)

    def _build_tracer(self, name: str | None, settings: Mapping[str, Any] | None) -> Tracer | None:
        """The tracer named by ``tracing`` (or the VOLLEY_TRACING environment variable); None: tracing is off."""
        if name is None:
            name = os.environ.get(TRACING_ENV, "").strip() or None
        if name is None or is_none_name(name):
            return None
        factory = self.registry.get("tracer", name)  # unknown: says which distribution to install
        tracer = factory(self.app_name, dict(settings or {}))
        if not isinstance(tracer, Tracer):
            raise ConfigurationError(f"the tracer plugin {name!r} returned {tracer!r}, which is not a "
                                     "volley.ports.Tracer (it needs a bind(source, outputs) method)")
        return tracer

    def with_queue_config(self, queue_config: Mapping[str, Any], **overrides: Any) -> Engine:
        """A copy of this Engine with other queue settings (``volley.testing`` swaps in memory queues this way)."""
        kwargs = {**self._init_kwargs, **overrides}
        return Engine(queue_config=queue_config, registry=self.registry, **kwargs)

    def _check_connectors(self) -> None:
        checked: set[int] = set()
        for queue in self.queues.values():
            if isinstance(queue.connector, CheckedConnector) and id(queue) not in checked:
                checked.add(id(queue))
                queue.connector.check(queue.spec)

    @property
    def input(self) -> ResolvedQueue:
        return self.queues[self.input_queue]

    def stream_app(self, func: Callable[..., Any]) -> StreamApp:
        """Decorate the handler. Calling the result runs the app until SIGINT/SIGTERM (as in py-volley)."""
        return StreamApp(self, func)


def _is_generator(func: Callable[..., Any], test: Callable[[Any], bool]) -> bool:
    """Whether ``func`` (or what it wraps: a decorator with functools.wraps, a partial, its ``__call__``) is a
    generator function of the kind ``test`` finds."""
    unwrapped = inspect.unwrap(func)
    return test(unwrapped) or test(inspect.unwrap(type(unwrapped).__call__))


def _run_generator(produce: Callable[..., Any]) -> Callable[..., Any]:
    """``produce`` (a generator handler, or its msg_ctx adapter) called with what the run passes (the message,
    and the context when it wants one) and, when it returns a generator (a decorator around one may return
    something else), run to its end: its outputs as a list."""
    def call_generator(*args: Any) -> Any:
        result = produce(*args)
        return list(result) if type(result) is GeneratorType else result

    return call_generator


class StreamApp:
    """A handler bound to its Engine: run it forever, until drained, or inside your own event loop."""

    def __init__(self, engine: Engine, func: Callable[..., Any]) -> None:
        self.engine = engine
        self.func = func
        # (an object whose __call__ is ``async def`` is a coroutine function too)
        self.is_async = inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(type(func).__call__)
        self.wants_context = _wants_context(func)
        # What the pipeline calls: func itself, or an adapter passing msg_ctx by keyword when the handler
        # declares it keyword-only (``def handler(msg, *, msg_ctx)``) or not second.
        self.call: Callable[..., Any] = func
        if self.wants_context and _context_by_keyword(func):
            if self.is_async:
                async def call_async(message: Any, context: Any) -> Any:
                    return await func(message, msg_ctx=context)

                self.call = call_async
            else:
                def call_sync(message: Any, context: Any) -> Any:
                    return func(message, msg_ctx=context)

                self.call = call_sync
        if _is_generator(func, inspect.isasyncgenfunction):
            raise ConfigurationError(f"handler {getattr(func, '__name__', func)!r} is an async generator (async def "
                                     "with yield): make it return its outputs as a list, or a sync generator")
        if not self.is_async and _is_generator(func, inspect.isgeneratorfunction):
            # A handler that yields its outputs runs within the call: what its body raises is the handler's
            # failure (retried, then dead-lettered at stage "handler"), as for one that returns them.
            self.call = _run_generator(self.call)
        self._run: Run | None = None
        self._stop_requested = threading.Event()
        self._still_running: str | None = None
        self.last_report: RunReport | None = None  # the counters of the last run that ended, however it ended
        self.__wrapped__ = func
        self.__name__ = getattr(func, "__name__", "stream_app")
        self.__doc__ = func.__doc__

    # ------------------------------------------------------------------ running

    def __call__(self) -> RunReport:
        """Run until SIGINT or SIGTERM, then shut down gracefully (py-volley's behaviour).

        The shutdown deadline holds here even for a handler that never returns: a call still blocking the event
        loop past it ends the process with exit code 70, and a call still running on the handler thread when
        the run has shut down makes this raise ``SystemExit(70)``, each with a log line naming the handler;
        nothing unfinished is acknowledged. A second signal exits at once (130)."""
        report = asyncio.run(self._run_with_signals())
        if self.still_running is not None:
            raise SystemExit(BLOCKED_EXIT_CODE)
        return report

    async def _run_with_signals(self) -> RunReport:
        # Python-level handlers, not the loop's: they run in the main thread between bytecodes even while a
        # handler call blocks the loop, so a stop request (and a second signal) always gets through.
        installed: dict[int, Any] = {}
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                installed[int(sig)] = signal.signal(sig, self._on_signal)
        try:
            return await self.run_async(_hard_deadline=True)
        finally:
            for signum, previous in installed.items():
                signal.signal(signum, previous)

    def _on_signal(self, sig: int, _frame: Any = None) -> None:
        if self._stop_requested.is_set():
            logger.warning("%s: second %s: exiting without waiting", self.engine.app_name, signal.Signals(sig).name)
            os._exit(130)
        logger.info("%s: %s received: shutting down gracefully", self.engine.app_name, signal.Signals(sig).name)
        self.stop()

    async def run_async(self, *, stop_when_drained: bool = False, drain_idle_seconds: float = 0.5,
                        max_messages: int | None = None, _hard_deadline: bool = False) -> RunReport:
        """Run on the current event loop; return when stopped (or drained, or after ``max_messages`` inputs).

        Cancelling it (``asyncio.timeout``, ``asyncio.wait_for``) shuts the app down gracefully and then raises
        ``CancelledError`` as usual (so ``TimeoutError`` from those)."""
        run = Run(self, stop_when_drained=stop_when_drained, drain_idle_seconds=drain_idle_seconds,
                  max_messages=max_messages, hard_deadline=_hard_deadline)
        self._run = run
        self._still_running = None
        if self._stop_requested.is_set():
            run.request_stop()
        try:
            return await run.run()
        finally:
            self._still_running = run.still_running
            self.last_report = run.report
            self._run = None
            self._stop_requested.clear()

    def run_until_drained(self, timeout: float | None = 60.0, drain_idle_seconds: float = 0.5,
                          max_messages: int | None = None) -> RunReport:
        """Run until the input has been empty for ``drain_idle_seconds`` and nothing is in flight.

        For tests, batch jobs and the demo. ``timeout`` bounds the whole run: past
        it the app shuts down gracefully and ``TimeoutError`` is raised.
        """

        async def bounded() -> RunReport:
            task = asyncio.ensure_future(
                self.run_async(stop_when_drained=True, drain_idle_seconds=drain_idle_seconds,
                               max_messages=max_messages)
            )
            try:
                return await asyncio.wait_for(asyncio.shield(task), timeout)
            except TimeoutError:
                self.stop()
                await task
                raise TimeoutError(f"{self.engine.app_name} did not drain its input within {timeout} s") from None

        return asyncio.run(bounded())

    def stop(self) -> None:
        """Ask the app to shut down gracefully; safe to call from any thread or a signal handler."""
        self._stop_requested.set()
        run = self._run
        if run is not None:
            run.request_stop_threadsafe()

    @property
    def still_running(self) -> str | None:
        """After a run: the handler whose call was still running past the shutdown deadline, if any."""
        return self._still_running

    @property
    def report(self) -> RunReport | None:
        """Counters of the run in progress, if any."""
        return self._run.report if self._run is not None else None


def _check_metrics_settings(settings: Mapping[str, Any], plugins: Sequence[str], factories: Sequence[Any]) -> None:
    """Refuse a metrics_settings key no observer plugin reads (a misspelled ``metrics_hots`` would bind every
    interface). Plugins say which keys they read (``ports.DeclaresMetricsSettings``); when one does not, unknown
    keys may be its own and are let through."""
    declared = [factory.settings_keys if isinstance(factory, DeclaresMetricsSettings) else None
                for factory in factories]
    if not settings or any(keys is None for keys in declared):
        return
    known: set[str] = set().union(*(keys for keys in declared if keys is not None))
    unknown = sorted(set(settings) - known, key=str)
    if unknown:
        raise ConfigurationError(
            f"metrics_settings has unknown key(s) {unknown}; the installed observer plugin(s) "
            f"{', '.join(plugins) or '(none)'} read {sorted(known)}"
        )


def _wants_context(func: Callable[..., Any]) -> bool:
    try:
        parameters = list(inspect.signature(func).parameters.values())
    except (TypeError, ValueError):  # builtins without a signature
        return False
    if any(p.name == "msg_ctx" for p in parameters):
        return True
    positional = [p for p in parameters if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 2:
        # A second parameter with a default is the handler's own (``limit=10``), unless it is named msg_ctx.
        return positional[1].default is positional[1].empty
    if any(p.kind == p.VAR_POSITIONAL for p in parameters):
        return True
    if not positional:
        raise ConfigurationError(
            f"handler {getattr(func, '__qualname__', func)!r} must take the message as its first argument "
            "(and optionally msg_ctx)"
        )
    return False


def _context_by_keyword(func: Callable[..., Any]) -> bool:
    """msg_ctx is passed by keyword when it is keyword-only or not the second parameter
    (``def handler(message, limit=10, msg_ctx=None)``)."""
    parameters = list(inspect.signature(func).parameters.values())
    names = [p.name for p in parameters]
    if "msg_ctx" not in names:
        return False
    parameter = parameters[names.index("msg_ctx")]
    if names.index("msg_ctx") == 1:
        return parameter.kind == parameter.KEYWORD_ONLY
    if parameter.kind == parameter.POSITIONAL_ONLY:
        raise ConfigurationError(
            f"handler {getattr(func, '__qualname__', func)!r} takes msg_ctx positional-only but not as its second "
            "parameter, so Volley cannot pass it: make msg_ctx the second parameter, or let it be passed by keyword"
        )
    return True


def _positive(value: float | None, name: str, *, allow_zero: bool = False) -> float:
    """A number (not a string, not a bool), not NaN, 0 or more (or positive)."""
    if (isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0
            or (value == 0 and not allow_zero)):
        raise ConfigurationError(
            f"{name} must be a number, {'0 or more' if allow_zero else 'positive'}; got {value!r}"
        )
    return float(value)


def _count(value: Any, name: str) -> int:
    """A whole number, 1 or more (``int(0.5)`` would have made it 0)."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"{name} must be a whole number, 1 or more; got {value!r}")
    return value


def _non_negative(value: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"{name} must be a whole number, 0 or more; got {value!r}")
    return value


def _load_queue_config(
    queue_config: Sequence[QueueConfig] | Mapping[str, Any] | None, yaml_config_path: str | os.PathLike[str]
) -> dict[str, dict[str, Any]]:
    """The queue configuration as given (a list of QueueConfig or a dict), or else read from the YAML file."""
    if isinstance(queue_config, (list, tuple, Mapping)):
        return normalize_queue_config(queue_config)
    if queue_config is None:
        logger.info("loading queue configuration from %s", os.fspath(yaml_config_path))
        return load_yaml(yaml_config_path)
    raise ConfigurationError(
        "queue_config must be a list of QueueConfig or a dict of queue name to settings "
        f"(got {type(queue_config).__name__}); or leave it None and pass yaml_config_path="
    )


def _check_queue_names(
    config: Mapping[str, Any], input_queue: str, output_queues: Sequence[str], dead_letter_queue: str | None
) -> None:
    """Every queue the Engine names is configured, and the dead letters do not go back to the input."""
    wanted = [input_queue, *output_queues]
    if dead_letter_queue is not None:
        wanted.append(dead_letter_queue)
    missing = [q for q in wanted if q not in config]
    if missing:
        raise ConfigurationError(
            f"queue(s) {missing} are not in the queue configuration; configured queues: {sorted(config)}"
        )
    if dead_letter_queue is not None and dead_letter_queue == input_queue:
        raise ConfigurationError("the dead-letter queue cannot be the input queue: failures would loop forever")
