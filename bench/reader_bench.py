"""Scan throughput of factlog.FactReader on a local store, raw files versus compacted.

    .venv/bin/python -m bench.reader_bench [--facts 4000000] [--files 80] [--dup-share 0.01]

It writes ``--facts`` facts of one fact type over two UTC days, as ``--files`` raw objects in
logging order (entities interleaved, as producers write them), with a share of duplicate copies.
It then times, before and after ``Compactor.run()``: a full deduplicated scan (all columns, and
3 columns), and scans for 1, 10, 100 and 1,000 random entities. Figures are facts per second
(full scans) or milliseconds per scan (entity scans), best of ``--repeat`` runs.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from typing import Any

import numpy as np
import pyarrow as pa

from factlog import CompactionConfig, Compactor, FactReader, FactType, FactTypeCatalog
from factlog._ids import uuid7_array
from ttstore import TIMESTAMP_TYPE, US_PER_DAY, ManualClock, Store, utc_date

from ._types import Result

T0 = 1_798_761_600_000_000  # 2027-01-01T00:00:00Z
FT = FactType("play", entity=("member_id", "int64"),
              fields={"video_id": "int64", "secs": "float64", "device": "string"})


def build(store: Store, n: int, files: int, dup_share: float, n_entities: int) -> None:
    rng = np.random.default_rng(1)
    FactTypeCatalog(store).declare(FT)
    logged = np.sort(T0 + rng.integers(0, 2 * US_PER_DAY, n))
    ids = uuid7_array(logged)
    member = rng.integers(0, n_entities, n)
    video = rng.integers(0, 50_000, n)
    secs = rng.random(n) * 600
    device = pa.array(np.array(["tv", "phone", "web", "tablet"])[rng.integers(0, 4, n)])
    # Duplicates: copies of earlier facts (a retried producer), logged a little later.
    n_dup = int(n * dup_share)
    src = rng.integers(0, n, n_dup)
    idx = np.concatenate([np.arange(n), src])
    logged_all = np.concatenate([logged, np.minimum(logged[src] + 1000,
                                                    T0 + 2 * US_PER_DAY - 1)])
    order = np.argsort(logged_all, kind="stable")
    idx, logged_all = idx[order], logged_all[order]
    schema = FT.arrow_schema().remove_metadata()
    table = pa.Table.from_arrays([
        ids.take(pa.array(idx)), pa.array(member[idx]),
        pa.array(logged[idx]).cast(TIMESTAMP_TYPE), pa.array(logged_all).cast(TIMESTAMP_TYPE),
        pa.array(logged_all).cast(TIMESTAMP_TYPE), pa.array(["bench"] * len(idx)),
        pa.array(video[idx]), pa.array(secs[idx]), device.take(pa.array(idx)),
    ], schema=schema)
    per = -(-table.num_rows // files)
    for seg, off in enumerate(range(0, table.num_rows, per)):
        chunk = table.slice(off, per)
        ev = chunk.column("event_time").cast(pa.int64()).to_numpy()
        days = ev // US_PER_DAY
        for day in np.unique(days):
            part = chunk.filter(pa.array(days == day))
            date = utc_date(int(day) * US_PER_DAY)
            store.write_parquet(f"facts/play/date={date}/bench-{seg:010d}.parquet", part)


def timed(fn: Any, repeat: int) -> tuple[float, Any]:
    """The best of ``repeat`` runs: on a shared machine, the least disturbed one."""
    times, out = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t)
    return min(times), out


def measure(reader: FactReader, repeat: int, n_entities: int) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    res: dict[str, Any] = {}
    s, t = timed(lambda: reader.scan("play"), repeat)
    res["full_scan_s"], res["facts"] = s, t.num_rows
    res["full_scan_facts_per_s"] = t.num_rows / s
    s, t = timed(lambda: reader.scan("play", columns=["member_id", "event_time", "secs"]), repeat)
    res["narrow_scan_facts_per_s"] = t.num_rows / s
    s, _ = timed(lambda: reader.scan("play", dedup=False), repeat)
    res["full_scan_no_dedup_facts_per_s"] = res["facts"] / s
    for k in (1, 10, 100, 1000):
        ents = rng.choice(n_entities, k, replace=False)
        s, t = timed(lambda e=ents: reader.scan("play", entities=e), repeat)
        res[f"scan_{k}_entities_ms"] = s * 1000
        res[f"scan_{k}_entities_rows"] = t.num_rows
    hour = 3_600_000_000
    s, t = timed(lambda: reader.scan("play", entities=ents, start_us=T0 + US_PER_DAY + hour,
                                     end_us=T0 + US_PER_DAY + 2 * hour), repeat)
    res["scan_1000_entities_1h_ms"] = s * 1000
    return res


def bench(n_facts: int, files: int, n_entities: int, dup_share: float, repeat: int,
          row_group_rows: int) -> dict[str, Any]:
    """Build a raw store, measure, compact, measure again; the figures of both."""
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        t = time.perf_counter()
        build(store, n_facts, files, dup_share, n_entities)
        build_s = time.perf_counter() - t
        reader = FactReader(store)
        raw = measure(reader, repeat, n_entities)
        compactor = Compactor(store, clock=ManualClock(T0 + 3 * US_PER_DAY),
                              config=CompactionConfig(row_group_rows=row_group_rows))
        t = time.perf_counter()
        report = compactor.run()
        compact_s = time.perf_counter() - t
        compacted = measure(reader, repeat, n_entities)
        assert compacted["facts"] == raw["facts"]
        return {"facts_written": report.totals()["rows_in"], "raw_files": files,
                "build_s": build_s, "compaction_s": compact_s,
                "compaction": report.totals(), "raw": raw, "compacted": compacted}


def run(quick: bool) -> list[Result]:
    n_facts, files, n_entities, repeat = ((400_000, 20, 20_000, 2) if quick
                                          else (2_000_000, 40, 100_000, 3))
    out = bench(n_facts, files, n_entities, 0.01, repeat, CompactionConfig().row_group_rows)
    raw, comp = out["raw"], out["compacted"]
    note = (f"{raw['facts']:,} facts ({out['facts_written']:,} copies, 1% duplicates) over "
            f"2 days in {files} raw files, {n_entities:,} entities; best of {repeat}")
    base = "raw files (before compaction)"
    results = [
        Result(metric="FactReader full scan, dedup, compacted", unit="facts/s",
               value=comp["full_scan_facts_per_s"], baseline=raw["full_scan_facts_per_s"],
               baseline_name=base, note=note),
        Result(metric="FactReader scan 3 columns, dedup, compacted", unit="facts/s",
               value=comp["narrow_scan_facts_per_s"], baseline=raw["narrow_scan_facts_per_s"],
               baseline_name=base, note=note),
        Result(metric="FactReader full scan, no dedup, compacted", unit="facts/s",
               value=comp["full_scan_no_dedup_facts_per_s"],
               baseline=raw["full_scan_no_dedup_facts_per_s"], baseline_name=base, note=note),
    ]
    for k in (1, 10, 100, 1000):
        results.append(Result(
            metric=f"FactReader scan {k:,} entities, compacted", unit="ms",
            value=comp[f"scan_{k}_entities_ms"], baseline=raw[f"scan_{k}_entities_ms"],
            baseline_name=base, note=note))
    results.append(Result(
        metric="FactReader scan 1,000 entities, 1 h window, compacted", unit="ms",
        value=comp["scan_1000_entities_1h_ms"], baseline=raw["scan_1000_entities_1h_ms"],
        baseline_name=base, note=note))
    results.append(Result(
        metric="Compactor.run on the raw store", unit="s", value=out["compaction_s"],
        note=note))
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--facts", type=int, default=4_000_000)
    ap.add_argument("--files", type=int, default=80)
    ap.add_argument("--entities", type=int, default=200_000)
    ap.add_argument("--dup-share", type=float, default=0.01)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--row-group-rows", type=int, default=CompactionConfig().row_group_rows)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    out = bench(args.facts, args.files, args.entities, args.dup_share, args.repeat,
                args.row_group_rows)
    raw, compacted, compact_s = out["raw"], out["compacted"], out["compaction_s"]
    if args.json:
        print(json.dumps(out, indent=1))
        return
    print(f"{out['facts_written']:,} copies in {args.files} raw files per day-split; "
          f"{raw['facts']:,} facts; compaction {compact_s:.1f}s")
    print(f"{'measure':34} {'raw':>14} {'compacted':>14}")
    for k in raw:
        if k == "facts" or k.endswith("_rows"):
            continue
        print(f"{k:34} {raw[k]:>14,.1f} {compacted[k]:>14,.1f}")


if __name__ == "__main__":
    main()
