"""The first, factlog-only demo: log facts through the public logger, read them back, print
counts.

``timetravel demo`` now runs the full story (:mod:`simworld._demo`), whose read-back step keeps
this check on the compute app's facts; this module stays as a small standalone example of the
logger and the reader. Everything goes
through the same public code paths a production service uses: ``FactLogger`` to log, a flush,
``FactReader`` to read back; the demo checks that every fact it logged is read back exactly once.
"""

from __future__ import annotations

import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from typing import TextIO

import numpy as np

from factlog import FactLogger, FactReader, FactType
from ttstore import US_PER_DAY, US_PER_S, ManualClock, Store, utc_date

PLAYBACK = FactType(
    "playback",
    entity=("member_id", "int64"),
    fields={"video_id": "int64", "seconds": "float64", "device": "string", "genre": "string"},
    lookback="30d",
)
IMPRESSION = FactType(
    "impression",
    entity=("member_id", "int64"),
    fields={"video_id": "int64", "row": "int64", "position": "int64", "score": "float64"},
)
_DEVICES = ("tv", "phone", "tablet", "web")
_GENRES = ("drama", "comedy", "documentary", "action", "kids")


@dataclass(frozen=True)
class DemoResult:
    logged: dict[str, int]
    read_back: dict[str, int]
    per_day: dict[tuple[str, str], int]
    duplicates: int


def run_factlog_demo(
    store: Store, *, members: int, days: int, seed: int, start_us: int, out: TextIO | None = None
) -> DemoResult:
    """Simulate ``days`` of serving for ``members`` on a manual clock and log their facts."""
    stream = out if out is not None else sys.stdout
    rng = np.random.default_rng(seed)
    clock = ManualClock(start_us)
    logged: Counter[str] = Counter()
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tt-demo-spool-") as spool, FactLogger(
        store=store, producer="demo-compute-app", spool_dir=spool, clock=clock,
        fact_types=[PLAYBACK, IMPRESSION], full_policy="block",
    ) as logger:
        # Each simulated hour: some members get impressions, some of those play a title.
        for hour in range(days * 24):
            hour_us = start_us + hour * 3600 * US_PER_S
            active = rng.choice(members, size=max(1, members // 8), replace=False)
            # Requests arrive in time order within the hour; a play follows its impression.
            offsets = np.sort(rng.integers(0, 3000 * US_PER_S, size=len(active)))
            for m, offset in zip(active.tolist(), offsets.tolist(), strict=True):
                clock.set(hour_us + offset)
                video = int(rng.integers(1, 500))
                for pos in range(3):
                    logger.log("impression", {"member_id": m, "video_id": video + pos,
                                              "row": 0, "position": pos,
                                              "score": float(rng.random())})
                    logged["impression"] += 1
                if rng.random() < 0.4:
                    clock.advance(int(rng.integers(1, 600)) * US_PER_S)
                    logger.log("playback", {"member_id": m, "video_id": video,
                                            "seconds": float(rng.gamma(2.0, 600.0)),
                                            "device": _DEVICES[m % len(_DEVICES)],
                                            "genre": _GENRES[video % len(_GENRES)]})
                    logged["playback"] += 1
        logger.flush(timeout_s=60)
        stats = logger.stats()
    elapsed = time.perf_counter() - t0

    reader = FactReader(store)
    read_back: dict[str, int] = {}
    per_day: dict[tuple[str, str], int] = {}
    duplicates = 0
    for ft in (PLAYBACK, IMPRESSION):
        raw = reader.scan(ft.name, dedup=False)
        table = reader.scan(ft.name)
        duplicates += raw.num_rows - table.num_rows
        read_back[ft.name] = table.num_rows
        days_us = table.column("event_time").cast("int64").to_numpy()
        for day, n in zip(*np.unique(days_us // US_PER_DAY, return_counts=True), strict=True):
            per_day[(ft.name, utc_date(int(day) * US_PER_DAY))] = int(n)

    print(f"Logged {sum(logged.values()):,} facts in {elapsed:.1f}s "
          f"(accepted {stats.accepted:,}, durable {stats.durable:,}, written {stats.written:,}, "
          f"dropped {sum(stats.dropped.values()):,}).", file=stream)
    print(f"{'fact type':<12} {'date':<12} {'facts':>8}", file=stream)
    for (name, date), n in sorted(per_day.items()):
        print(f"{name:<12} {date:<12} {n:>8,}", file=stream)
    for name in sorted(logged):
        verdict = "ok" if read_back.get(name) == logged[name] else "MISMATCH"
        print(f"{name}: logged {logged[name]:,}, read back {read_back.get(name, 0):,} [{verdict}]",
              file=stream)
    print(f"Duplicate copies in the store: {duplicates}. Store: {store.url}", file=stream)
    return DemoResult(dict(logged), read_back, per_day, duplicates)
