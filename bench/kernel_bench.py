"""The as-of fact kernel alone, in memory (no store): ``timetravel_api._kernels``.

    .venv/bin/python -m bench.kernel_bench [--facts 10000000] [--entities 100000]
        [--labels 1000000] [--late-share 0.05] [--knowledge as_known] [--profile]

Data: ``--facts`` facts of one fact type over ``--entities`` entities and 30 days, already sorted
as the reader returns them; ~``--late-share`` of them logged late (exponential delay, mean 6 h),
the rest within 2 s of their event_time. ``--labels`` query rows at random times over the last
20 days. Features: ``T.value.last``, ``T.value.sum.7d`` and ``T.count.1d``. The figure is the
kernel's wall time (best of ``--repeat``); ``--profile`` prints a cProfile of one run.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time

import numpy as np
import pyarrow as pa

from factlog import FactType
from timetravel_api._features import parse_features
from timetravel_api._kernels import fact_features
from ttstore import TIMESTAMP_TYPE, US_PER_DAY

from ._types import Result

T0 = 1_798_761_600_000_000  # 2027-01-01T00:00:00Z
FT = FactType("t", entity=("member_id", "int64"), fields={"value": "float64"})
FEATURES = ["t.value.last", "t.value.sum.7d", "t.count.1d"]


def make_data(
    n_facts: int, n_entities: int, n_labels: int, late_share: float, seed: int = 7
) -> tuple[pa.Table, pa.Array, np.ndarray]:
    rng = np.random.default_rng(seed)
    member = rng.integers(0, n_entities, n_facts)
    ev = T0 + rng.integers(0, 30 * US_PER_DAY, n_facts)
    delay = rng.integers(0, 2_000_000, n_facts)
    late = rng.random(n_facts) < late_share
    delay[late] = rng.exponential(6 * 3600e6, int(late.sum())).astype(np.int64)
    la = ev + delay
    value = rng.standard_normal(n_facts) * 100
    order = np.lexsort((la, ev, member))
    facts = pa.table({
        "member_id": pa.array(member[order]),
        "event_time": pa.array(ev[order]).cast(TIMESTAMP_TYPE),
        "logged_at": pa.array(la[order]).cast(TIMESTAMP_TYPE),
        "value": pa.array(value[order]),
    })
    ents = pa.array(rng.integers(0, n_entities, n_labels))
    at = T0 + 10 * US_PER_DAY + rng.integers(0, 20 * US_PER_DAY, n_labels)
    return facts, ents, at


def time_kernel(facts: pa.Table, ents: pa.Array, at: np.ndarray, knowledge: str,
                repeat: int) -> tuple[float, float]:
    """Best wall time and best CPU time of this process (s); CPU time is the steadier figure
    on a shared machine."""
    specs = parse_features(FEATURES, fact_types={"t": FT})
    best, best_cpu = float("inf"), float("inf")
    for _ in range(repeat):
        t0, c0 = time.perf_counter(), time.process_time()
        fact_features(facts, specs, ents, at, knowledge=knowledge,  # type: ignore[arg-type]
                      lookback_us=None, entity_col="member_id")
        best = min(best, time.perf_counter() - t0)
        best_cpu = min(best_cpu, time.process_time() - c0)
    return best, best_cpu


def run(quick: bool) -> list[Result]:
    n_facts, n_entities, n_labels = ((1_000_000, 10_000, 100_000) if quick
                                     else (10_000_000, 100_000, 1_000_000))
    facts, ents, at = make_data(n_facts, n_entities, n_labels, 0.05)
    out = []
    for knowledge in ("as_known", "event"):
        secs, cpu = time_kernel(facts, ents, at, knowledge, repeat=2)
        out.append(Result(
            metric=f"fact kernel, {knowledge}, {n_labels:,} labels × 3 features", value=secs,
            unit="s", note=f"{n_facts:,} facts, {n_entities:,} entities, 30 days, 5% late; "
                           f"in memory, no store; CPU {cpu:.3f} s"))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--facts", type=int, default=10_000_000)
    p.add_argument("--entities", type=int, default=100_000)
    p.add_argument("--labels", type=int, default=1_000_000)
    p.add_argument("--late-share", type=float, default=0.05)
    p.add_argument("--knowledge", default="as_known", choices=("as_known", "event"))
    p.add_argument("--repeat", type=int, default=3)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args(argv)
    t0 = time.perf_counter()
    facts, ents, at = make_data(args.facts, args.entities, args.labels, args.late_share)
    print(f"data: {args.facts:,} facts, {args.labels:,} labels in "
          f"{time.perf_counter() - t0:.1f} s", file=sys.stderr)
    secs, cpu = time_kernel(facts, ents, at, args.knowledge, args.repeat)
    print(f"kernel {args.knowledge}: {secs:.3f} s wall, {cpu:.3f} s CPU (best of "
          f"{args.repeat}); {args.labels / secs:,.0f} labels/s")
    if args.profile:
        specs = parse_features(FEATURES, fact_types={"t": FT})
        prof = cProfile.Profile()
        prof.enable()
        fact_features(facts, specs, ents, at, knowledge=args.knowledge, lookback_us=None,
                      entity_col="member_id")
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(18)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
