"""Context selection (``snapshotter.select_contexts``) on a large population, in memory.

    .venv/bin/python -m bench.select_bench [--rows 10000000] [--n 100000] [--repeat 2]

Data: ``--rows`` members with int64 keys (a random permutation, so keys are unordered), three
strata columns (region × 5, device × 4, tenure × 6: 120 strata, skewed shares) and a gamma
"hours" column for Neyman. The figure is the wall time of ``select_contexts`` (best of
``--repeat``): stratum coding, allocation, keyed hashing, panel ranking and building the context
set. The same population with string keys (``m<id>``) is timed too. The baseline is
scikit-learn's ``train_test_split(..., test_size=n, stratify=strata)`` on the same rows: it
returns only a split, with no weights or design, and is not a panel.

The whole command is timed as well: ``timetravel snapshot select`` in a child process on the
same rows written as a Parquet file, from its start (interpreter and imports included) to its
exit: reading the file, selecting, writing the context set and its design to a local store, and
drawing the PNG report.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from snapshotter import select_contexts

from ._types import Result, at_most

T0 = 1_798_761_600_000_000  # 2027-01-01T00:00:00Z
STRATA = ["region", "device", "tenure"]


def make_population(rows: int, seed: int = 11) -> pa.Table:
    rng = np.random.default_rng(seed)
    region = rng.choice(np.array(["eu", "us", "latam", "apac", "mena"]), rows,
                        p=[0.35, 0.3, 0.15, 0.15, 0.05])
    device = rng.choice(np.array(["tv", "mobile", "web", "console"]), rows,
                        p=[0.4, 0.35, 0.2, 0.05])
    tenure = rng.integers(0, 6, rows)
    return pa.table({
        "member_id": pa.array(rng.permutation(rows * 3)[:rows].astype(np.int64)),
        "region": pa.array(region),
        "device": pa.array(device),
        "tenure": pa.array(tenure),
        "hours": pa.array(rng.gamma(2.0, 3.0, rows)),
    })


def time_select(pop: pa.Table, n: int, allocation: str, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        cs = select_contexts(pop, n=n, selected_at_us=T0, entity="member_id", strata=STRATA,
                             allocation=allocation, variability_col="hours", seed=1)
        best = min(best, time.perf_counter() - t0)
        assert len(cs) == n
    return best


def time_cli(pop: pa.Table, n: int) -> float:
    """Wall seconds of ``timetravel snapshot select`` on ``pop`` as a Parquet file."""
    with tempfile.TemporaryDirectory(prefix="tt-select-bench-") as tmp:
        path = Path(tmp) / "population.parquet"
        pq.write_table(pop, path)
        cmd = [sys.executable, "-c", "from ttstore._cli import run; run()", "snapshot",
               "select", "--store", str(Path(tmp) / "store"), "--population", str(path),
               "--entity", "member_id", "--strata", ",".join(STRATA), "--n", str(n),
               "--seed", "1", "--now", "2027-01-01T00:00:00Z"]
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True)
        seconds = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"snapshot select failed: {r.stderr[-2000:]}")
        reports = list((Path(tmp) / "store").rglob("*.png"))
        if not r.stdout.strip() or not reports:
            raise RuntimeError(f"no selection id or no report: {r.stdout!r}")
    return seconds


def time_sklearn(pop: pa.Table, n: int) -> float:
    from sklearn.model_selection import train_test_split

    labels = (pc.cast(pop["tenure"], pa.string()).to_numpy(zero_copy_only=False).astype(object)
              + pop["region"].to_numpy(zero_copy_only=False).astype(object)
              + pop["device"].to_numpy(zero_copy_only=False).astype(object))
    codes = np.unique(labels, return_inverse=True)[1]
    keys = pop["member_id"].to_numpy()
    t0 = time.perf_counter()
    train_test_split(keys, test_size=n, stratify=codes, random_state=1)
    return time.perf_counter() - t0


def run(quick: bool, *, rows: int | None = None, n: int | None = None,
        repeat: int = 2) -> list[Result]:
    rows = rows or (1_000_000 if quick else 10_000_000)
    n = n or (10_000 if quick else 100_000)
    pop = make_population(rows)
    note = f"{rows:,} members, 120 strata, n={n:,}, best of {repeat}"
    target = None if quick else at_most(10.0, stretch=3.0)
    sk = time_sklearn(pop, n)
    out = [Result(
        metric=f"select {rows:,} rows, proportional, int64 keys", unit="s",
        value=time_select(pop, n, "proportional", repeat), baseline=sk,
        baseline_name="sklearn train_test_split(stratify)", target=target, note=note,
    ), Result(
        metric=f"select {rows:,} rows, neyman, int64 keys", unit="s",
        value=time_select(pop, n, "neyman", repeat), target=target, note=note,
    )]
    keys = pc.binary_join_element_wise("m", pc.cast(pop["member_id"], pa.string()), "")
    spop = pop.set_column(0, "member_id", keys)
    out.append(Result(
        metric=f"select {rows:,} rows, proportional, string keys", unit="s",
        value=time_select(spop, n, "proportional", repeat), target=target,
        note=note + "; keys like 'm1234567'",
    ))
    out.append(Result(
        metric=f"timetravel snapshot select, {rows:,} rows, whole command", unit="s",
        value=time_cli(pop, n), target=target,
        note=note.rsplit(",", 1)[0] + "; one run: start to exit, Parquet read, store write and "
        "PNG report included",
    ))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000_000)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args(argv)
    for r in run(False, rows=args.rows, n=args.n, repeat=args.repeat):
        base = "" if r.baseline is None else f"  (baseline {r.baseline_name}: {r.baseline:.2f} s)"
        print(f"{r.metric}: {r.value:.2f} {r.unit}{base}  [{r.note}]")
    return 0


if __name__ == "__main__":
    sys.exit(main())
