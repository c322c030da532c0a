"""The ``volley`` command: run apps, list plugins, run the demo."""

from __future__ import annotations

import argparse
import asyncio
import ctypes
import logging
import os
import signal
import sys
from collections.abc import Sequence

from volley.apps import load_app
from volley.dlq.command import add_commands as add_dlq_commands
from volley.engine import StreamApp
from volley.errors import BrokerUnavailableError, ConfigurationError, ConsumerFailedError, DeliveryError
from volley.plugins import KINDS, core_requirement, distribution_version, get_registry
from volley.run import BLOCKED_EXIT_CODE

__all__ = ["load_app", "main"]  # load_app lives in volley.apps; still importable from here


async def _run_all(apps: Sequence[StreamApp]) -> None:
    stopping = False

    def stop_all(sig: int, _frame: object = None) -> None:
        nonlocal stopping
        if stopping:
            os._exit(130)
        stopping = True
        logging.getLogger("volley").info("%s received: stopping %d app(s)", signal.Signals(sig).name, len(apps))
        for app in apps:
            app.stop()

    # Python-level handlers (not the loop's): they run even while a handler call blocks the loop, so the stop
    # request reaches each run's deadline watchdog (see StreamApp.__call__).
    previous = {sig: signal.signal(sig, stop_all) for sig in (signal.SIGINT, signal.SIGTERM)}
    tasks = [asyncio.ensure_future(app.run_async(_hard_deadline=True)) for app in apps]
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            if task.exception() is not None:
                for app in apps:
                    app.stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            raise errors[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if any(app.still_running for app in apps):
        raise SystemExit(BLOCKED_EXIT_CODE)


def cmd_run(args: argparse.Namespace) -> int:
    if args.workers < 1:
        raise ConfigurationError(f"--workers must be 1 or more, got {args.workers}")
    if args.workers > 1:
        from volley.workers import supervise

        return supervise(args.apps, args.workers)
    supervisor = os.environ.get("VOLLEY_SUPERVISOR_PID")
    if supervisor:
        stop_with_supervisor(int(supervisor))
    apps = [load_app(target) for target in args.apps]
    asyncio.run(_run_all(apps))
    return 0


PR_SET_PDEATHSIG = 1  # linux/prctl.h
SIGPIPE_EXIT_CODE = 128 + 13  # what a shell reports for a command whose pipe was closed (SIGPIPE is 13)


def stop_with_supervisor(supervisor: int) -> None:
    """A worker of ``volley run --workers N``: get SIGTERM (a graceful stop) when the supervisor dies, even by
    ``kill -9``, so that no orphan keeps consuming (Linux; elsewhere the supervisor's own signals must do)."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM), 0, 0, 0)
        except (OSError, AttributeError) as exc:
            logging.getLogger("volley").warning("cannot ask to be stopped with the supervisor: %s", exc)
    if os.getppid() != supervisor:  # it died before we could ask
        raise SystemExit(f"volley: the supervisor (pid {supervisor}) is gone; not starting")


def cmd_plugins(_: argparse.Namespace) -> int:
    registry = get_registry()
    # Which version of each distribution registered what, and the volley-core range it was built for: the first
    # thing to compare when a plugin misbehaves after an upgrade.
    print("distributions:")
    for distribution in sorted(registry.distributions()):
        version = distribution_version(distribution) or "(not installed: source tree)"
        requirement = core_requirement(distribution)
        needs = f"  needs {requirement}" if requirement else ""
        print(f"  {distribution:<28} {version}{needs}")
    for kind in KINDS:
        names = registry.names(kind)
        print(f"{kind}s:")
        if not names:
            print("  (none)")
        for name in names:
            print(f"  {name:<28} {registry.entries[kind][name].distribution}")
    return 0


def cmd_demo(_: argparse.Namespace) -> int:
    from volley.demo import main as demo_main

    return demo_main()


def version_line() -> str:
    """``volley --version``: volley-core's version and the Python it runs on (plugins: ``volley plugins``)."""
    version = distribution_version("volley-core") or "(not installed: source tree)"
    return f"volley-core {version} (Python {sys.version.split()[0]})"


def _log_level(text: str) -> int | None:
    """A level name (any case) or number; None when logging knows no such level."""
    text = text.strip()
    if text.isdigit():
        return int(text)
    level = logging.getLevelName(text.upper())
    return level if isinstance(level, int) else None


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="volley", description="Run Volley stream apps.")
    parser.add_argument("--version", action="version", version=version_line())
    parser.add_argument("--log-level", default=os.environ.get("VOLLEY_LOG_LEVEL", "INFO"))
    commands = parser.add_subparsers(dest="command", required=True)
    run = commands.add_parser("run", help="run one or more apps (module:attribute) until SIGINT/SIGTERM")
    run.add_argument("apps", nargs="+", metavar="module:app")
    run.add_argument("--workers", type=int, default=1, help="worker processes (each a consumer-group member)")
    run.set_defaults(func=cmd_run)
    commands.add_parser("plugins", help="list installed connectors, serializers, handlers, profiles").set_defaults(
        func=cmd_plugins)
    commands.add_parser("demo", help="run the two-node demo on in-memory queues").set_defaults(func=cmd_demo)
    add_dlq_commands(commands)
    args = parser.parse_args(argv)
    level = _log_level(args.log_level)
    if level is None:
        print(f"volley: configuration error: unknown log level {args.log_level!r} (--log-level or VOLLEY_LOG_LEVEL): "
              "use DEBUG, INFO, WARNING, ERROR or CRITICAL, or a number", file=sys.stderr)
        return 2
    logging.basicConfig(level=level, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except BrokerUnavailableError as exc:  # not answering yet, or an outage: a supervisor restarts the process
        print(f"volley: broker unavailable: {exc}", file=sys.stderr)
        return 1
    except ConfigurationError as exc:
        print(f"volley: configuration error: {exc}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        # The reader went away (``volley plugins | head``): nothing left to say. Point stdout at /dev/null so that
        # the interpreter's final flush does not raise again.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return SIGPIPE_EXIT_CODE
    except (DeliveryError, ConsumerFailedError) as exc:  # a supervisor restarts the process
        print(f"volley: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
