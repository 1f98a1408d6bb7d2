"""The ``timetravel`` command line: one dispatcher, commands contributed by each package.

Each package registers its commands under the ``timetravel.commands`` entry-point group with a
``register(subparsers)`` function, so the dispatcher depends on no package and every package
keeps its commands next to its code. Shared here: ``--store``/``--repo``/``--now`` options, and
turning errors into one line on stderr with a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Callable, Sequence
from importlib.metadata import entry_points
from typing import Any

from ._config import DEFAULT_STORE, ENV_REPO, ENV_STORE
from ._errors import TimetravelError
from ._store import Store

ENTRY_POINT_GROUP = "timetravel.commands"
EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


def add_common_options(parser: argparse.ArgumentParser, *, now: bool = False) -> None:
    """``--store`` and ``--repo`` (every command), and ``--now`` for commands that act "now"."""
    parser.add_argument(
        "--store",
        default=os.environ.get(ENV_STORE, DEFAULT_STORE),
        help=f"store URL: file:///abs/path, a plain path, or s3://bucket/prefix "
        f"(env {ENV_STORE}; default {DEFAULT_STORE}). The S3 endpoint comes from "
        "AWS_ENDPOINT_URL, credentials from the standard AWS variables or profile.",
    )
    parser.add_argument(
        "--repo",
        default=os.environ.get(ENV_REPO),
        help=f"feature repo: a Python module path (env {ENV_REPO}); optional",
    )
    if now:
        parser.add_argument(
            "--now",
            default=None,
            metavar="RFC3339",
            help="act as if the clock read this time (UTC, with offset); for simulation, "
            "backfills and tests. On a long-running command the clock starts here and advances.",
        )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug detail")


def open_store(args: argparse.Namespace) -> Store:
    return Store(args.store)


Handler = Callable[[argparse.Namespace], int | None]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="timetravel",
        description="Timetravel: log serving-time facts, snapshot services for a stratified "
        "sample, and rebuild point-in-time-correct features.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for ep in sorted(entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
        register: Callable[[Any], None] = ep.load()
        register(sub)
    _full_names_only(parser)
    return parser


def _full_names_only(parser: argparse.ArgumentParser) -> None:
    """Refuse abbreviated options in every (sub)command: argparse takes any unambiguous prefix
    by default, so a script or manifest written with ``--cache`` would silently change meaning
    (or stop parsing) the day another option starting with ``--cache`` is added."""
    parser.allow_abbrev = False
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for child in action.choices.values():
                _full_names_only(child)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if getattr(args, "verbose", False) else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    handler: Handler | None = getattr(args, "handler", None)
    if handler is None:
        parser.print_help(sys.stderr)
        return EXIT_USER_ERROR
    try:
        return int(handler(args) or 0)
    except TimetravelError as exc:
        print(f"timetravel: error [{exc.code}]: {exc.message}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("timetravel: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


def run() -> None:
    sys.exit(main())
