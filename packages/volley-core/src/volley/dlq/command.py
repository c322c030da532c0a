"""The ``volley dlq`` subcommands: inspect, replay and purge an app's dead letters from its own configuration."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from datetime import datetime
from pathlib import Path

from volley.apps import load_app
from volley.dlq.filters import LetterFilter, parse_duration, parse_time
from volley.dlq.inspect import inspect
from volley.dlq.journal import COUNT_RETENTION_SECONDS, Journal, default_path
from volley.dlq.progress import Progress
from volley.dlq.purge import purge, purge_before, removing_browser
from volley.dlq.replay import ReplayOptions, ReplayStoppedError, ReplaySummary, replay
from volley.dlq.target import DeadLetterQueue
from volley.errors import ConfigurationError


def _filters(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("app", metavar="module:app", help="the app whose dead-letter queue to work on")
    group = parser.add_argument_group("which letters (every given condition must hold)")
    group.add_argument("--stage", action="append", default=[],
                       help="failure stage: deserialize, validate, handler, redelivery, output (repeatable)")
    group.add_argument("--error-type", action="append", default=[], help="exception class name (repeatable)")
    group.add_argument("--reason-contains", help="text the error reason contains")
    group.add_argument("--key", action="append", default=[], help="message key, as UTF-8 text (repeatable)")
    group.add_argument("--since", help="written at or after: ISO 8601 time, or a duration ago (30m, 2h, 1d)")
    group.add_argument("--until", help="written before: ISO 8601 time, or a duration ago")
    group.add_argument("--limit", type=int, help="at most this many letters")


def _journal_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--journal", type=Path,
                        help="the replay journal (default: $VOLLEY_DLQ_JOURNAL_DIR or ~/.local/state/volley/dlq)")


def add_commands(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    dlq = commands.add_parser("dlq", help="inspect, replay or purge an app's dead letters")
    sub = dlq.add_subparsers(dest="dlq_command", required=True)

    inspect_cmd = sub.add_parser("inspect", help="count and sample the dead letters, consuming nothing")
    _filters(inspect_cmd)
    _journal_option(inspect_cmd)
    inspect_cmd.add_argument("--json", action="store_true", help="print one JSON document")
    inspect_cmd.add_argument("--samples", type=int, default=5, help="letters to show (default 5)")
    inspect_cmd.set_defaults(func=cmd_inspect)

    replay_cmd = sub.add_parser("replay", help="send dead letters back to their source queue")
    _filters(replay_cmd)
    _journal_option(replay_cmd)
    replay_cmd.add_argument("--to", help="send to this queue (an alias of the app's configuration, or a queue "
                                         "name on the input's broker) instead of each letter's source queue")
    replay_cmd.add_argument("--max-replays", type=int, default=3,
                            help="leave a letter replayed this many times already where it is (default 3)")
    replay_cmd.add_argument("--rate", type=float, help="at most this many letters per second")
    replay_cmd.add_argument("--batch-size", type=int, default=100, help="letters per confirmed batch (default 100)")
    replay_cmd.add_argument("--dry-run", action="store_true", help="say what would be moved, move nothing")
    replay_cmd.add_argument("--json", action="store_true", help="print the summary as JSON")
    replay_cmd.add_argument("--keep-counts", default="7d", metavar="DURATION",
                            help="how long the journal keeps a letter content's replay count after its last replay, "
                                 "for the loop guard where headers are dropped (default 7d)")
    replay_cmd.set_defaults(func=cmd_replay)

    purge_cmd = sub.add_parser("purge", help="delete dead letters for good")
    _filters(purge_cmd)
    purge_cmd.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    purge_cmd.add_argument("--dry-run", action="store_true", help="count what would be deleted, delete nothing")
    purge_cmd.add_argument("--before", help="Kafka: delete every letter before this offset (an integer, on every "
                                            "partition) or time (ISO 8601, or a duration ago)")
    purge_cmd.set_defaults(func=cmd_purge)


def _letter_filter(args: argparse.Namespace) -> LetterFilter:
    if args.limit is not None and args.limit < 1:
        raise ConfigurationError(f"--limit must be 1 or more, got {args.limit}")
    return LetterFilter(stages=tuple(args.stage), error_types=tuple(args.error_type),
                        reason_contains=args.reason_contains, keys=tuple(args.key),
                        since=parse_time(args.since, "--since") if args.since else None,
                        until=parse_time(args.until, "--until") if args.until else None)


def _journal(args: argparse.Namespace, dlq: DeadLetterQueue,
             count_retention_seconds: float = COUNT_RETENTION_SECONDS) -> Journal:
    path = args.journal or default_path(dlq.queue.spec.connector, dlq.name, dlq.location)
    return Journal(path, count_retention_seconds=count_retention_seconds)


def cmd_inspect(args: argparse.Namespace) -> int:
    letter_filter = _letter_filter(args)
    dlq = DeadLetterQueue(load_app(args.app))
    journal = _journal(args, dlq)
    result = asyncio.run(inspect(dlq, letter_filter, journal, samples=args.samples, limit=args.limit))
    if args.json:
        print(json.dumps(result.as_dict(), indent=2))
    else:
        print("\n".join(result.lines()))
    return 0


def cmd_replay(args: argparse.Namespace) -> int:
    if args.max_replays < 0:
        raise ConfigurationError(f"--max-replays must be 0 or more, got {args.max_replays}")
    if args.rate is not None and args.rate <= 0:
        raise ConfigurationError(f"--rate must be positive, got {args.rate}")
    if args.batch_size < 1:
        raise ConfigurationError(f"--batch-size must be 1 or more, got {args.batch_size}")
    options = ReplayOptions(filter=_letter_filter(args), to=args.to, max_replays=args.max_replays, limit=args.limit,
                            rate=args.rate, dry_run=args.dry_run, batch_size=args.batch_size)
    keep_counts = parse_duration(args.keep_counts, "--keep-counts")
    dlq = DeadLetterQueue(load_app(args.app))
    journal = _journal(args, dlq, keep_counts)
    progress = None
    if sys.stderr.isatty() and not args.json:  # a bar needs a total: count first (reading is cheap next to sending)
        progress = Progress(asyncio.run(inspect(dlq, LetterFilter(), journal, samples=0)).total)
    try:
        summary = asyncio.run(replay(dlq, journal, options, progress))
    except ReplayStoppedError as exc:  # what it did before it stopped, then the error (exit 1)
        _print_summary(args, f"replay of {dlq.name} ({options.filter.describe()}), stopped:", exc.summary, str(exc))
        raise
    finally:
        journal.close()
    _print_summary(args, f"replay of {dlq.name} ({options.filter.describe()}):", summary)
    return 0


def _print_summary(args: argparse.Namespace, title: str, summary: ReplaySummary, stopped: str | None = None) -> None:
    if args.json:
        document = summary.as_dict()
        if stopped is not None:
            document["stopped"] = stopped
        print(json.dumps(document, indent=2))
    else:
        print(title)
        print("\n".join("  " + line for line in summary.lines()))


def cmd_purge(args: argparse.Namespace) -> int:
    letter_filter = _letter_filter(args)
    dlq = DeadLetterQueue(load_app(args.app))
    if args.before is not None:
        if not letter_filter.is_everything or args.limit is not None:
            raise ConfigurationError("purge --before deletes everything before a point: it takes no filter")
        offset, stamp = _before(args.before)
        point = f"offset {offset}" if offset is not None else f"{datetime.fromtimestamp(stamp or 0).isoformat()}"
        if args.dry_run:
            print(f"would delete every letter of {dlq.name} before {point}")
            return 0
        if not args.yes and not _confirm(f"delete every letter of {dlq.name} before {point}, on every partition?"):
            print("nothing deleted")
            return 1
        dropped = asyncio.run(purge_before(dlq, offset=offset, timestamp=stamp))
        print(f"deleted {sum(dropped.values())} letter(s) of {dlq.name} before {point}")
        return 0
    removing_browser(dlq)  # a broker that cannot delete single letters says so before anything is read
    counted = asyncio.run(inspect(dlq, letter_filter, samples=0))
    count = counted.matching if args.limit is None else min(counted.matching, args.limit)
    what = f"{count} of {counted.total} letter(s) of {dlq.name} ({letter_filter.describe()})"
    if args.dry_run or count == 0:
        print(f"would delete {what}" if count else f"no letter of {dlq.name} matches ({letter_filter.describe()})")
        return 0
    if not args.yes and not _confirm(f"delete {what} for good?"):
        print("nothing deleted")
        return 1
    progress = Progress(count) if sys.stderr.isatty() else None
    # at most what was confirmed: letters arriving meanwhile are not deleted unseen
    purged = asyncio.run(purge(dlq, letter_filter, count, progress))
    print(f"deleted {purged} letter(s) of {dlq.name}")
    return 0


def _before(text: str) -> tuple[int | None, float | None]:
    if text.strip().isdigit():
        return int(text), None
    return None, parse_time(text, "--before")


def _confirm(question: str) -> bool:
    if not sys.stdin.isatty():
        raise ConfigurationError(f"{question} needs a yes: there is no terminal to ask, so pass --yes")
    return input(f"{question} [y/N] ").strip().lower() in ("y", "yes")
