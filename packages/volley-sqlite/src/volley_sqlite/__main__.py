"""``python -m volley_sqlite``: look at and feed a queue database from a shell.

    python -m volley_sqlite stats [--path FILE]
    python -m volley_sqlite publish QUEUE 'MESSAGE' ['MESSAGE' ...] [--key KEY] [--delay SECONDS] [--path FILE]
    python -m volley_sqlite compact [--retention SECONDS] [--path FILE]

Without ``--path``, ``$VOLLEY_SQLITE_PATH`` or ``volley.sqlite3`` in the current directory.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from volley_sqlite import admin


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m volley_sqlite", description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--path", default=None, help="the database file (default: $VOLLEY_SQLITE_PATH or "
                                                     "volley.sqlite3)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("stats", help="rows per queue: ready, delayed, held, acked")
    publish = commands.add_parser("publish", help="append messages (UTF-8 text) to a queue")
    publish.add_argument("queue")
    publish.add_argument("message", nargs="+")
    publish.add_argument("--key", default=None)
    publish.add_argument("--delay", type=float, default=0.0)
    compact = commands.add_parser("compact", help="delete acked rows past a retention and shrink the file")
    compact.add_argument("--retention", type=float, default=0.0, help="keep acked rows younger than this (s)")
    args = parser.parse_args(argv)
    if args.command != "publish" and not os.path.exists(args.path or admin.default_path()):
        parser.error(f"no queue database at {args.path or admin.default_path()!r}")
    if args.command == "stats":
        for queue, counts in admin.stats(args.path).items():
            print(queue, " ".join(f"{name}={count}" for name, count in counts.items()))
    elif args.command == "publish":
        count = admin.publish(args.path, args.queue, [m.encode() for m in args.message],
                              key=args.key.encode() if args.key is not None else None, delay=args.delay)
        print(f"published {count} message(s) to {args.queue}")
    else:
        print(f"deleted {admin.compact(args.path, args.retention)} acked row(s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
