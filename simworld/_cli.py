"""``timetravel demo`` (the main job, end to end, on a local store by default) and
``timetravel up`` (the whole stack on loopback)."""

from __future__ import annotations

import argparse
import logging
import os
import time
from typing import Any

from ttstore import (
    DEFAULT_STORE,
    ENV_STORE,
    Store,
    TimetravelError,
    add_common_options,
    open_store,
    parse_timestamp,
)

DEFAULT_START = "2026-11-01T00:00:00Z"


def register(sub: Any) -> None:
    demo: argparse.ArgumentParser = sub.add_parser(
        "demo",
        help="run the main job end to end on a local store",
        description="Simulate members and days: a recommendation service logs facts, snapshots "
        "run twice a day on a stratified panel, a point-in-time training set trains a model "
        "(against a leaky baseline), and parity checks online = offline. Writes a report to "
        "reports/demo-<time>/ in the store. It uses its own feature repo, "
        "simworld/demo_repo.py (--repo is not used), and needs a store of its own.",
    )
    add_common_options(demo, now=True)
    demo.add_argument("--members", type=int, default=4000, help="simulated members (4000)")
    demo.add_argument("--days", type=int, default=7, help="simulated days (7)")
    demo.add_argument("--seed", type=int, default=7, help="random seed (7)")
    demo.add_argument("--requests-per-day", type=int, default=None,
                      help="recommendation requests per simulated day (members/3, >= 150)")
    demo.set_defaults(handler=_demo)

    up: argparse.ArgumentParser = sub.add_parser(
        "up",
        help="start the whole stack locally, on loopback, to try the APIs by hand",
        description="Start the ingest server, the query API and (with services) the snapshot "
        "scheduler, optionally the simulated world (--with-sim) and a moto S3 server (--s3), all "
        "on 127.0.0.1. Prints the URLs; Ctrl-C stops everything. Auth is off unless "
        "--tokens-file is given.",
    )
    add_common_options(up, now=True)
    up.add_argument("--ingest-port", type=int, default=8081, help="ingest server port (8081)")
    up.add_argument("--api-port", type=int, default=8080, help="query API port (8080)")
    up.add_argument("--tokens-file", default=None, help="turn auth on with this tokens file")
    up.add_argument("--with-sim", action="store_true",
                    help="also run the simulated world, select a panel from its population, "
                    "and snapshot it on a schedule")
    up.add_argument("--sim-port", type=int, default=9001, help="simulated world port (9001)")
    up.add_argument("--sim-members", type=int, default=10_000, help="simulated members (10000)")
    up.add_argument("--sim-rate", type=float, default=1.0,
                    help="simulated seconds per wall second (1.0)")
    up.add_argument("--s3", action="store_true",
                    help="run a moto S3 server and use s3://timetravel/data as the store")
    up.add_argument("--s3-port", type=int, default=9000, help="moto S3 port (9000)")
    up.add_argument("--services", default=None,
                    help="services TOML for the scheduler (default: none, or the sim's)")
    up.add_argument("--every", default="12h", help="snapshot cadence (12h)")
    up.set_defaults(handler=_up)


def _demo(args: argparse.Namespace) -> int:
    if args.members < 1 or args.days < 1:
        raise TimetravelError("--members and --days must be at least 1", code="invalid_input")
    if args.days < 2:
        raise TimetravelError("--days must be at least 2 (later days are held out for testing)",
                              code="invalid_input")
    if args.requests_per_day is not None and args.requests_per_day < 1:
        raise TimetravelError("--requests-per-day must be at least 1", code="invalid_input")
    from ._demo import DemoConfig, has_demo_run, run_demo  # noqa: PLC0415

    if not args.verbose:  # the demo prints its own progress; run logs only with -v
        for name in ("snapshotter", "factlog", "timetravel_api"):
            logging.getLogger(name).setLevel(logging.ERROR)

    start_us = parse_timestamp(args.now or DEFAULT_START, field="--now")
    store = open_store(args)
    if (args.store == DEFAULT_STORE and not os.environ.get(ENV_STORE)
            and has_demo_run(store)):  # `make demo` twice: the second run gets its own store
        fresh = f"./timetravel-demo-{time.strftime('%Y%m%dT%H%M%SZ', time.gmtime())}"
        print(f"The default store {DEFAULT_STORE} already holds a demo run; this run uses "
              f"{fresh} (pass --store to choose).", flush=True)
        store = Store(fresh)
    result = run_demo(store, DemoConfig(
        members=args.members, days=args.days, seed=args.seed, start_us=start_us,
        requests_per_day=args.requests_per_day))
    return 0 if all(v == "ok" for v in result.summary["steps"].values()) else 1


def _up(args: argparse.Namespace) -> int:
    from ._up import UpConfig, run_up  # noqa: PLC0415

    return run_up(UpConfig(
        store=args.store, ingest_port=args.ingest_port, api_port=args.api_port,
        tokens_file=args.tokens_file, with_sim=args.with_sim, sim_port=args.sim_port,
        sim_members=args.sim_members, sim_rate=args.sim_rate, s3=args.s3, s3_port=args.s3_port,
        services=args.services, every=args.every, now=args.now,
    ))
