"""Data for the point-in-time join benchmark (``bench/pit_bench.py``): a local store of facts of
one fact type, compacted, and label rows (entity, ``at``).

Facts (``t``: ``member_id`` int64 → ``value`` float64, ``n`` int64), generated vectorized:

- event times uniform over 30 days from ``T0``; ``logged_at`` within 2 s of the event, except a
  ``late_share`` of late facts logged 1 h to 3 days later (exponential, mean 12 h), many of them
  after the ``at`` of labels that follow their event time;
- a ``tie_share`` of facts moved onto another fact's ``event_time`` of the same entity (ties that
  ``logged_at`` and then ``fact_id`` break);
- ``null_share`` of ``value`` null (``T.value.last`` is the last *non-null* value);
- a ``dup_share`` of retried copies (same ``fact_id`` and ``event_time``, logged later; a tenth
  of them with a different payload, a conflict the earliest copy wins).

They are written as raw objects in logging order by ``files_per_day`` writers taking turns (one
object per writer and date partition), and then
compacted (``factlog.Compactor``), so the store holds sorted, deduplicated ``c-*`` files.

Labels: entities uniform over the fact entities plus 1% never seen, ``at`` uniform over the last
20 days; 2% of them put exactly on a fact's ``event_time`` and 2% exactly on a fact's
``logged_at`` (the window edges of SPEC §3).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from factlog import CompactionConfig, Compactor, FactType, FactTypeCatalog
from factlog._ids import uuid7_array
from ttstore import TIMESTAMP_TYPE, US_PER_DAY, Store, utc_date

T0 = 1_798_761_600_000_000  # 2027-01-01T00:00:00Z
DAYS = 30
HOUR_US = 3_600_000_000
FT = FactType("t", entity=("member_id", "int64"), fields={"value": "float64", "n": "int64"})
FEATURES = ["t.value.last", "t.value.sum.7d", "t.count.1d"]


@dataclass(frozen=True)
class PitData:
    """What was generated: sizes and timings of the setup (not part of any measured figure)."""

    facts: int  # distinct facts
    copies: int  # rows written, duplicates included
    late: int
    entities: int
    generate_s: float
    compact_s: float
    files_compacted: int


def generate_facts(
    store: Store, n_facts: int, n_entities: int, *, late_share: float = 0.05,
    dup_share: float = 0.01, tie_share: float = 0.002, null_share: float = 0.01,
    files_per_day: int = 8, seed: int = 11,
) -> PitData:
    """Write ``n_facts`` facts (plus duplicate copies) of ``FT`` into ``store`` and compact."""
    t_start = time.perf_counter()
    rng = np.random.default_rng(seed)
    FactTypeCatalog(store).declare(FT)
    member = rng.integers(0, n_entities, n_facts)
    ev = T0 + rng.integers(0, DAYS * US_PER_DAY, n_facts)
    # Ties: a few facts take the event_time of another fact of the same entity.
    n_tie = int(n_facts * tie_share)
    if n_tie:
        a = rng.integers(0, n_facts, n_tie)
        b = rng.integers(0, n_facts, n_tie)
        member[b] = member[a]
        ev[b] = ev[a]
    delay = rng.integers(0, 2_000_000, n_facts)
    late = rng.random(n_facts) < late_share
    delay[late] = HOUR_US + np.minimum(
        rng.exponential(12 * HOUR_US, int(late.sum())), 3 * 24 * HOUR_US).astype(np.int64)
    logged = ev + delay
    # A few equal logged_at between tied facts (then fact_id decides).
    if n_tie:
        same = rng.random(n_tie) < 0.5
        logged[b[same]] = logged[a[same]]
    value = rng.standard_normal(n_facts) * 10.0 ** rng.integers(-3, 6, n_facts)
    value_valid = rng.random(n_facts) >= null_share
    nval = rng.integers(0, 1000, n_facts)
    ids = uuid7_array(logged)

    # Retried copies: same fact_id and event_time, logged later (10% with another payload).
    n_dup = int(n_facts * dup_share)
    src = rng.integers(0, n_facts, n_dup)
    idx = np.concatenate([np.arange(n_facts), src])
    logged_all = np.concatenate([logged, logged[src] + rng.integers(1, 60_000_000, n_dup)])
    value_all = value[idx].copy()
    conflict = np.zeros(len(idx), dtype=bool)
    conflict[n_facts:] = rng.random(n_dup) < 0.1
    value_all[conflict] = value_all[conflict] + 1.0

    order = np.argsort(logged_all, kind="stable")  # producers write in logging order
    idx, logged_all, value_all = idx[order], logged_all[order], value_all[order]
    ts = pa.array(logged_all).cast(TIMESTAMP_TYPE)
    schema = FT.arrow_schema().remove_metadata()
    table = pa.Table.from_arrays([
        ids.take(pa.array(idx)),
        pa.array(member[idx]),
        pa.array(ev[idx]).cast(TIMESTAMP_TYPE),
        ts,
        ts,
        pa.array(np.full(len(idx), "bench", dtype=object), pa.string()),
        pa.array(value_all, mask=~value_valid[idx]),
        pa.array(nval[idx]),
    ], schema=schema)
    day = (ev[idx] - T0) // US_PER_DAY
    seg = np.arange(len(idx)) % files_per_day  # writers take turns; each file in logging order
    part = day * files_per_day + seg
    by_part = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[by_part], np.arange(DAYS * files_per_day + 1))
    for p in range(DAYS * files_per_day):
        lo, hi = int(bounds[p]), int(bounds[p + 1])
        if lo == hi:
            continue
        d, s = divmod(p, files_per_day)
        chunk = table.take(pa.array(by_part[lo:hi]))
        date = utc_date(T0 + d * US_PER_DAY)
        store.write_parquet(f"facts/t/date={date}/bench-{s:010d}.parquet", chunk)
    generate_s = time.perf_counter() - t_start
    t_start = time.perf_counter()
    report = Compactor(store, config=CompactionConfig(grace_us=0)).run()
    totals = report.totals()
    return PitData(
        facts=n_facts, copies=len(idx), late=int(late.sum()), entities=n_entities,
        generate_s=generate_s, compact_s=time.perf_counter() - t_start,
        files_compacted=int(totals.get("files_out", 0)),
    )


def generate_labels(
    facts: pa.Table, n_labels: int, n_entities: int, *, seed: int = 12
) -> pa.Table:
    """``n_labels`` rows (``entity_id``, ``at``) over the last 20 days; a few exactly on a fact's
    ``event_time`` or ``logged_at`` (``facts``: any sample of stored facts with ``member_id``,
    ``event_time`` and ``logged_at``)."""
    rng = np.random.default_rng(seed)
    ent = rng.integers(0, int(n_entities * 1.01) + 1, n_labels)  # ~1% never seen
    at = T0 + (DAYS - 20) * US_PER_DAY + rng.integers(0, 20 * US_PER_DAY, n_labels)
    f_ent = facts.column("member_id").to_numpy()
    f_ev = facts.column("event_time").cast(pa.int64()).to_numpy()
    f_la = facts.column("logged_at").cast(pa.int64()).to_numpy()
    recent = np.flatnonzero(f_ev >= T0 + (DAYS - 20) * US_PER_DAY)
    for col, share in ((f_ev, 0.02), (f_la, 0.02)):
        rows = rng.choice(n_labels, int(n_labels * share), replace=False)
        pick = recent[rng.integers(0, len(recent), len(rows))]
        ent[rows] = f_ent[pick]
        at[rows] = col[pick]
    return pa.table({"entity_id": pa.array(ent),
                     "at": pa.array(at).cast(TIMESTAMP_TYPE)})
