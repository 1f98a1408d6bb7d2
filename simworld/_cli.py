"""``timetravel demo``: the main job, end to end, on a local store by default."""

from __future__ import annotations

import argparse
from typing import Any

from ttstore import TimetravelError, parse_timestamp
from ttstore._cli import add_common_options, open_store

DEFAULT_START = "2026-11-01T00:00:00Z"


def register(sub: Any) -> None:
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run the main job end to end on a local store",
        description="Log facts through the public logger for simulated members and days, read "
        "them back through the reader, and print counts per fact type and day.",
    )
    add_common_options(demo, now=True)
    demo.add_argument("--members", type=int, default=2000, help="simulated members (2000)")
    demo.add_argument("--days", type=int, default=3, help="simulated days (3)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (7)")
    demo.set_defaults(handler=_demo)


def _demo(args: argparse.Namespace) -> int:
    if args.members < 1 or args.days < 1:
        raise TimetravelError("--members and --days must be at least 1", code="invalid_input")
    from ._factlog_demo import run_factlog_demo  # noqa: PLC0415

    start_us = parse_timestamp(args.now or DEFAULT_START, field="--now")
    result = run_factlog_demo(
        open_store(args), members=args.members, days=args.days, seed=args.seed, start_us=start_us
    )
    return 0 if result.read_back == result.logged and result.duplicates == 0 else 1
