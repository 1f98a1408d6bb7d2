"""``timetravel training-set build``: a batch training-set build from the command line."""

from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

from ttstore import InvalidInput, Store, add_common_options, clock_from_now

from ._training import build_training_set, lineage, write_training_set

log = logging.getLogger("timetravel_api.training_set")
#: Off a terminal, a progress line at most this often (and one at the end).
LOG_EVERY_S = 5.0


def register_cli(sub: Any) -> None:
    """Add the ``training-set`` command group to the dispatcher."""
    ts = sub.add_parser(
        "training-set", help="batch training-set builds",
        description="Join labels (entity_id, at, label columns) with point-in-time-correct "
        "features and write Parquet with its lineage.",
    )
    tsub = ts.add_subparsers(dest="training_set_command", metavar="SUBCOMMAND", required=True)
    p = tsub.add_parser(
        "build", help="build a training set",
        description="Build a training set: the label columns unchanged, one column per feature "
        "in the requested order, then weight (when snapshot features are requested). Rows keep "
        "the label order. PATH is a local file, or store:KEY for an object in --store.",
    )
    add_common_options(p, now=True)
    p.add_argument("--labels", required=True, metavar="PATH",
                   help="labels Parquet: entity_id, at (timestamp with time zone), labels")
    p.add_argument("--features", required=True, action="append", metavar="NAMES",
                   help="comma-separated feature names (may be repeated)")
    p.add_argument("--out", required=True, metavar="PATH", help="output Parquet (zstd)")
    p.add_argument("--engine", choices=("local", "spark"), default="local")
    p.add_argument("--knowledge", choices=("as_known", "event"), default="as_known")
    p.add_argument("--workers", type=int, default=None,
                   help="processes for the local engine (default: all cores)")
    p.set_defaults(handler=_build)


def _build(args: argparse.Namespace) -> int:
    names = [n.strip() for group in args.features for n in group.split(",") if n.strip()]
    if not names:
        raise InvalidInput("--features names no feature", field="features")
    if args.workers is not None and args.workers < 1:
        raise InvalidInput("--workers must be at least 1", field="workers")
    store = Store(args.store)
    clock = clock_from_now(args.now)
    try:
        with _progress(args.out) as progress:
            table = build_training_set(
                args.labels, names, store=store, repo=args.repo, knowledge=args.knowledge,
                engine=args.engine, workers=args.workers, clock=clock, progress=progress,
            )
    finally:
        if args.engine == "spark":
            _stop_spark()
    where = write_training_set(table, args.out, store=store)
    lin = lineage(table)
    print(f"wrote {table.num_rows} rows, {len(names)} features to {where} "
          f"(knowledge={lin['knowledge']}, complete={str(lin['complete']).lower()})")
    return 0


@contextmanager
def _progress(label: str, *, terminal: bool | None = None,
              console: Any = None) -> Iterator[Callable[[float], None]]:
    """A rich progress bar on a terminal (stderr); else throttled log lines
    (``event=progress done=0.40``), so a build in a pod or CI shows that it moves."""
    if sys.stderr.isatty() if terminal is None else terminal:
        from rich.progress import Progress  # noqa: PLC0415

        with Progress(transient=True, console=console) as bar:
            task = bar.add_task(f"building {label}", total=1.0)

            def update(fraction: float) -> None:
                bar.update(task, completed=fraction)

            yield update
        return
    last = time.monotonic()

    def log_line(fraction: float) -> None:
        nonlocal last
        now = time.monotonic()
        if fraction >= 1.0 or now - last >= LOG_EVERY_S:
            last = now
            log.info("event=progress build=%s done=%.2f", label, fraction)

    yield log_line


def _stop_spark() -> None:
    """Stop the session this command started, so the JVM exits with it."""
    try:
        from pyspark.sql import SparkSession  # noqa: PLC0415
    except ImportError:
        return
    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()
