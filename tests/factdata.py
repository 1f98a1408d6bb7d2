"""Helpers for reader/compaction/stats tests: write fact objects in the store layout directly (no
logger), and a brute-force reference of the reader's semantics (SPEC §3) in plain Python."""

from __future__ import annotations

import json
from collections import defaultdict
from typing import Any

import numpy as np
import pyarrow as pa

from factlog import FactType, rows_to_table
from ttstore import Store, format_timestamp, utc_date

T0 = 1_798_761_600_000_000  # 2027-01-01T00:00:00Z
H = 3_600_000_000
DAY = 24 * H

PLAY = FactType(
    "play", entity=("member_id", "int64"),
    fields={"video_id": "int64", "secs": "float64", "tag": "string", "meta": "json",
            "at": "timestamp", "ids": "list<int64>"},
)
PAGE = FactType("page", entity=("user", "string"), fields={"path": "string", "n": "int64"})


def write_facts(
    store: Store, ft: FactType, rows: list[dict[str, Any]], *, writer: str = "w1",
    segment: int = 1, producer: str | None = "p1", ingested_at_us: int | None = None,
) -> list[str]:
    """Write ``rows`` (times as int µs) as raw fact objects, one per UTC date of event_time.

    Returns the keys written."""
    by_date: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        by_date[utc_date(r["event_time"])].append(r)
    keys = []
    for date, rs in sorted(by_date.items()):
        prod_rows = []
        for r in rs:
            pr = dict(r)
            pr["event_time"] = format_timestamp(r["event_time"])
            if "logged_at" in r:
                pr["logged_at"] = format_timestamp(r["logged_at"])
            if pr.get("at") is not None:
                pr["at"] = format_timestamp(pr["at"])
            prod_rows.append(pr)
        logged = max(r.get("logged_at", r["event_time"]) for r in rs)
        now = 10 * 365 * DAY + T0
        table, rej = rows_to_table(
            ft, prod_rows, logged_at_us=logged, now_us=now,
            ingested_at_us=ingested_at_us if ingested_at_us is not None else logged,
            producer=producer,
        )
        assert not rej, rej
        k = f"facts/{ft.name}/date={date}/{writer}-{segment:010d}.parquet"
        store.write_parquet(k, table)
        keys.append(k)
    return keys


def table_rows(table: pa.Table) -> list[dict[str, Any]]:
    """Rows with timestamps as int µs."""
    cols = {}
    for name in table.column_names:
        col = table.column(name)
        cols[name] = (col.cast(pa.int64()) if pa.types.is_timestamp(col.type) else col).to_pylist()
    return [{n: cols[n][i] for n in cols} for i in range(table.num_rows)]


def _canon(row: dict[str, Any], ft: FactType) -> str:
    payload = {}
    for f, t in ft.fields.items():
        v = row.get(f)
        if v is not None and t == "timestamp":
            v = format_timestamp(v)
        elif v is not None and t == "json":
            v = json.loads(v)
        payload[f] = v
    return json.dumps(payload, sort_keys=True, separators=(",", ":"))


def reference_scan(
    copies: list[dict[str, Any]], ft: FactType, *, entities: Any = None,
    start_us: int | None = None, end_us: int | None = None,
    logged_before_us: int | None = None, dedup: bool = True,
) -> list[dict[str, Any]]:
    """What a scan must return, computed the obvious way from every live copy."""
    ent = ft.entity_name
    rows = [r for r in copies if entities is None or r[ent] in set(entities)]
    if dedup:
        groups: dict[tuple[Any, str], list[dict[str, Any]]] = defaultdict(list)
        for r in rows:
            groups[(r[ent], r["fact_id"])].append(r)
        rows = [min(g, key=lambda r: (r["logged_at"], _canon(r, ft), r["event_time"],
                                      r.get("ingested_at", 0), r.get("producer") is not None,
                                      r.get("producer") or ""))
                for g in groups.values()]
    rows = [r for r in rows
            if (start_us is None or r["event_time"] >= start_us)
            and (end_us is None or r["event_time"] <= end_us)
            and (logged_before_us is None or r["logged_at"] <= logged_before_us)]
    return sorted(rows, key=lambda r: (r[ent], r["event_time"], r["logged_at"], r["fact_id"]))


def reference_conflicts(copies: list[dict[str, Any]], ft: FactType) -> set[tuple[Any, str]]:
    ent = ft.entity_name
    seen: dict[tuple[Any, str], set[tuple[int, str]]] = defaultdict(set)
    for r in copies:
        seen[(r[ent], r["fact_id"])].add((r["event_time"], _canon(r, ft)))
    return {k for k, v in seen.items() if len(v) > 1}


def random_facts(
    rng: np.random.Generator, n: int, *, n_entities: int = 4, n_ids: int | None = None,
    days: int = 3, big_keys: bool = False,
) -> list[dict[str, Any]]:
    """Rows of PLAY with few entities, fact ids and values, so duplicates, conflicts and ties
    are common."""
    n_ids = n_ids or max(1, n // 2)
    base = 2**60 if big_keys else 0
    rows = []
    for _ in range(n):
        fid = int(rng.integers(0, n_ids))
        # Copies of one fact share its UTC date (the reader's documented partition limit).
        ev = (T0 + (fid % days) * DAY + int(rng.choice([0, 1, 12, 23])) * H
              + int(rng.integers(0, 2)) * 1000)
        rows.append({
            "member_id": base + int(rng.integers(0, n_entities)),
            "fact_id": f"id{fid:04d}",
            "event_time": ev,
            "logged_at": ev + int(rng.choice([0, 0, 1000, 2 * H])),
            "video_id": int(rng.integers(0, 3)) if rng.random() < 0.9 else None,
            "secs": float(rng.integers(0, 2)) / 2,
            "tag": str(rng.choice(["a", "b", "é"])),
            "meta": {"k": int(rng.integers(0, 2))} if rng.random() < 0.5 else None,
            "at": T0 + int(rng.integers(0, 2)),
            "ids": [int(x) for x in rng.integers(0, 3, size=int(rng.integers(0, 3)))],
        })
    return rows
