"""``timetravel snapshot select``: build a context set and commit it to the store.

stdout carries the ``selection_id`` alone, so scripts can capture it; everything else (the
summary, notes on fallbacks and caps, where the report went) goes to stderr.
"""

from __future__ import annotations

import argparse
import logging
import sys
import time
from typing import Any

import pyarrow.parquet as pq

from ttstore import ENTITY_TYPES, Store, SystemClock, add_common_options, parse_timestamp

from ._allocate import ALLOCATIONS
from ._errors import PopulationError, SelectionError
from ._population import read_population
from ._select import select_contexts
from ._selections import REPORT_NAME, save_selection, selection_key

log = logging.getLogger("snapshotter.select")


def register_select_cli(ssub: Any) -> None:
    """Add ``select`` to the ``timetravel snapshot`` subcommands."""
    p: argparse.ArgumentParser = ssub.add_parser(
        "select", help="build a context set (stratified panel sample)",
        description="Select a stratified panel sample of a population and commit it to the "
        "store as a context set. Prints the selection_id alone on stdout.",
    )
    p.add_argument("--population", required=True, metavar="PATH",
                   help="Parquet (file or directory) or CSV (.csv, .csv.gz): a local path, "
                   "else a key in the store")
    p.add_argument("--entity", default="entity_id", metavar="COL",
                   help="the entity key column (default entity_id)")
    p.add_argument("--entity-type", choices=ENTITY_TYPES, default=None,
                   help="declared key type; default: the Parquet type, or string for CSV "
                   "(so '007' stays a string key)")
    p.add_argument("--strata", default="", metavar="COL[,COL...]",
                   help="strata columns, comma-separated (default: one stratum)")
    p.add_argument("--n", type=int, required=True, help="total sample size")
    p.add_argument("--allocation", choices=ALLOCATIONS, default="proportional",
                   help="how n is split over strata (default proportional)")
    p.add_argument("--variability-col", default=None, metavar="COL",
                   help="numeric column for Neyman allocation (per-stratum sample std)")
    p.add_argument("--min-per-stratum", type=int, default=1, metavar="K",
                   help="floor per non-empty stratum (default 1)")
    p.add_argument("--seed", type=int, default=0,
                   help="panel hash seed; keep it fixed for a panel stable across days "
                   "(default 0)")
    p.add_argument("--out", default=None, metavar="PATH",
                   help="also write the context set to PATH as Parquet")
    p.add_argument("--report", default=None, metavar="PATH",
                   help="also write the PNG report (population vs sample shares) to PATH")
    add_common_options(p, now=True)
    p.set_defaults(handler=_select_command)


def _select_command(args: argparse.Namespace) -> int:
    strata = [c.strip() for c in args.strata.split(",") if c.strip()]
    if args.allocation == "neyman" and not args.variability_col:
        raise SelectionError("--allocation neyman needs --variability-col",
                             field="variability_col")
    # A one-shot command: --now is the selection time exactly (an advancing clock would add the
    # microseconds spent starting up).
    selected_at_us = (SystemClock().now_us() if args.now is None
                      else parse_timestamp(args.now, field="--now"))
    store = Store(args.store)
    t0 = time.perf_counter()
    numeric = [args.variability_col] if args.allocation == "neyman" else []
    population = read_population(
        args.population, entity=args.entity, strata=strata, numeric=numeric,
        entity_type=args.entity_type, store=store,
    )
    t_read = time.perf_counter()
    cs = select_contexts(
        population, n=args.n, selected_at_us=selected_at_us, entity=args.entity,
        strata=strata, allocation=args.allocation,
        variability_col=args.variability_col if args.allocation == "neyman" else None,
        min_per_stratum=args.min_per_stratum, seed=args.seed, source=args.population,
    )
    t_select = time.perf_counter()
    d = cs.design
    for note in d.notes:
        log.warning("%s", note)
    save_selection(store, cs)
    if args.out:
        try:
            pq.write_table(cs.table, args.out, compression="zstd")
        except OSError as exc:
            raise PopulationError(f"cannot write --out {args.out!r}: {exc}",
                                  field="out") from exc
    if args.report:
        try:
            with open(args.report, "wb") as f:
                f.write(store.get(selection_key(cs.selection_id, REPORT_NAME)))
        except OSError as exc:
            raise PopulationError(f"cannot write --report {args.report!r}: {exc}",
                                  field="report") from exc
    log.info(
        "selected %d of %d in %d strata (%s allocation, seed %d): read %.2fs, select %.2fs; "
        "committed %s",
        d.sample_size, d.population_size, len(d.strata_detail), d.allocation_used, d.seed,
        t_read - t0, t_select - t_read, cs.selection_id,
    )
    print(cs.selection_id, file=sys.stdout, flush=True)
    return 0
