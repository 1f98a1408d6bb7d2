"""``timetravel facts stats``: counts and data-quality figures of the facts in a store.

Per fact type, over the facts whose ``event_time`` is in ``[since, until]``:

- facts (deduplicated) and live copies, per UTC day, with the live files;
- the null rate of every field (over facts);
- late arrivals: the distribution of ``logged_at - event_time`` (p50, p99 and max, nearest-rank
  percentiles) and the share above the late threshold (1h);
- imports: facts whose ``ingested_at - logged_at`` is above the import threshold (1h);
- duplicate copies: those still live plus those compaction removed (from its commit records);
- fact_id conflicts (copies of one fact that differ in payload or ``event_time``): those still
  live plus those compaction resolved (from its commit records), each counted once.

Commit records are per partition, so a range that cuts a day counts that day's records whole.
The whole range of a fact type is read at once (so copies on different days are matched):
bound it with ``since``/``until`` on a large store.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ttstore import (
    US_PER_DAY,
    US_PER_S,
    InvalidInput,
    Store,
    date_to_day,
    day_to_date,
    format_timestamp,
    parse_duration,
    parse_timestamp,
)

from ._compact import entity_json
from ._dedup import dedup_table
from ._facttypes import FactTypeCatalog
from ._parquetio import read_files
from ._reader import FactReader, _bounds

DEFAULT_LATE_THRESHOLD_US = 3600 * US_PER_S
DEFAULT_IMPORT_THRESHOLD_US = 3600 * US_PER_S


@dataclass(frozen=True, kw_only=True)
class StatsConfig:
    """Thresholds of ``facts stats``.

    Args:
        late_threshold_us: a fact is late when ``logged_at - event_time`` exceeds this.
        import_threshold_us: a fact is an import when ``ingested_at - logged_at`` exceeds this.
        max_conflicts_listed: conflicting facts listed by id (all are counted).
    """

    late_threshold_us: int = DEFAULT_LATE_THRESHOLD_US
    import_threshold_us: int = DEFAULT_IMPORT_THRESHOLD_US
    max_conflicts_listed: int = 20

    def __post_init__(self) -> None:
        for name in ("late_threshold_us", "import_threshold_us", "max_conflicts_listed"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"{name} must be >= 0", field=name)


def fact_stats(
    store: Store, *, fact_types: Sequence[str] | None = None, since_us: int | None = None,
    until_us: int | None = None, catalog: FactTypeCatalog | None = None,
    config: StatsConfig | None = None,
) -> dict[str, Any]:
    """The figures of every fact type (or of ``fact_types``), as a JSON-ready dict.

    Raises:
        UnknownFactType: a named fact type was never declared.
        InvalidInput: ``since`` after ``until``.
    """
    reader = FactReader(store, catalog=catalog)
    cfg = config or StatsConfig()
    names = list(fact_types) if fact_types else reader.catalog.names()
    return {
        "since": None if since_us is None else format_timestamp(since_us),
        "until": None if until_us is None else format_timestamp(until_us),
        "late_threshold_s": cfg.late_threshold_us / US_PER_S,
        "import_threshold_s": cfg.import_threshold_us / US_PER_S,
        "fact_types": [_one(reader, n, since_us, until_us, cfg) for n in names],
    }


def _one(
    reader: FactReader, name: str, since_us: int | None, until_us: int | None, cfg: StatsConfig
) -> dict[str, Any]:
    ft = reader.fact_type(name)
    schema = ft.arrow_schema().remove_metadata()
    parts = reader.partitions(name, start_us=since_us, end_us=until_us)
    copies = _bounds(read_files(reader.store, [f for p in parts for f in p.live], schema),
                     since_us, until_us, None)
    res = dedup_table(copies, entity=ft.entity_name, fields=list(ft.fields),
                      json_fields=[f for f, t in ft.fields.items() if t == "json"])
    facts = res.table
    n = facts.num_rows

    days: dict[int, dict[str, Any]] = {}
    for p in parts:
        days[p.day] = {"date": p.date, "facts": 0, "copies": 0, "live_files": len(p.live),
                       "files_awaiting_deletion": len(p.replaced),
                       "duplicates_removed_by_compaction":
                           sum(r.duplicates_removed for r in p.records)}
    for col, what in ((facts, "facts"), (copies, "copies")):
        d, c = _per_day(col)
        for day, count in zip(d, c, strict=True):
            days.setdefault(int(day), {"date": day_to_date(int(day)), "facts": 0, "copies": 0})
            days[int(day)][what] = int(count)

    as_int = ft.entity_type == "int64"
    conflicts = {(_key(e, as_int), f) for e, f in zip(res.conflict_entities.to_pylist(),
                                                      res.conflict_fact_ids.to_pylist(),
                                                      strict=True)}
    for p in parts:
        for r in p.records:
            conflicts.update((_key(c["entity"], as_int), c["fact_id"])
                             for c in r.conflict_facts)
    compacted_dups = sum(r.duplicates_removed for p in parts for r in p.records)
    # A record that listed fewer conflicts than it counted still counts them all.
    extra = sum(max(0, r.conflicts - len(r.conflict_facts)) for p in parts for r in p.records)

    logged = facts.column("logged_at").cast(pa.int64()).to_numpy()
    event = facts.column("event_time").cast(pa.int64()).to_numpy()
    ingested = facts.column("ingested_at").cast(pa.int64()).to_numpy()
    lateness = logged - event
    imports = int(np.count_nonzero(ingested - logged > cfg.import_threshold_us))
    late = int(np.count_nonzero(lateness > cfg.late_threshold_us))
    listed = sorted(conflicts)
    return {
        "fact_type": name,
        "entity": {"name": ft.entity_name, "type": ft.entity_type},
        "facts": n,
        "copies": copies.num_rows,
        "days": [days[d] for d in sorted(days)],
        "null_rate": {f: (facts.column(f).null_count / n if n else None) for f in ft.fields},
        "lateness": {
            "p50_s": _pct(lateness, 50),
            "p99_s": _pct(lateness, 99),
            "max_s": float(lateness.max()) / US_PER_S if n else None,
            "late": late,
            "late_share": late / n if n else None,
        },
        "imports": {"count": imports, "share": imports / n if n else None},
        "duplicates": {
            "live": res.duplicates_removed,
            "removed_by_compaction": compacted_dups,
            "total": res.duplicates_removed + compacted_dups,
        },
        "conflicts": {
            "count": len(conflicts) + extra,
            "facts": [{"entity": entity_json(e), "fact_id": f}
                      for e, f in listed[: cfg.max_conflicts_listed]],
        },
    }


def _key(entity: Any, as_int: bool) -> Any:
    """Entity keys from Arrow and from JSON records compare equal (big ints come as strings)."""
    return int(entity) if as_int else str(entity)


def _per_day(table: pa.Table) -> tuple[np.ndarray, np.ndarray]:
    ev = table.column("event_time").cast(pa.int64()).to_numpy()
    return np.unique(np.floor_divide(ev, US_PER_DAY), return_counts=True)


def _pct(values: np.ndarray, q: float) -> float | None:
    """Nearest-rank percentile, in seconds: the smallest value with at least q% at or below."""
    if len(values) == 0:
        return None
    return float(np.percentile(values, q, method="inverted_cdf")) / US_PER_S


# -- CLI: timetravel facts stats ----------------------------------------------------------------
def _time_arg(value: str | None, *, field: str, end: bool) -> int | None:
    """RFC 3339, or a date ``YYYY-MM-DD`` (its first microsecond, or its last with ``end``)."""
    if value is None:
        return None
    if len(value) == 10 and value[4] == "-" and value[7] == "-":
        try:
            day = date_to_day(value)
        except ValueError:
            raise InvalidInput(f"{field}: {value!r} is not a date", field=field) from None
        return (day + 1) * US_PER_DAY - 1 if end else day * US_PER_DAY
    return parse_timestamp(value, field=field)


def register_cli(fsub: Any) -> None:
    """Add ``stats`` to the ``timetravel facts`` subcommands."""
    from ttstore import add_common_options  # noqa: PLC0415

    p = fsub.add_parser(
        "stats", help="counts per type and day; nulls, late and imported facts; duplicates; "
        "conflicts",
        description="Counts per fact type and UTC day, the null rate of each field, late "
        "arrivals (logged_at - event_time), imports (ingested_at - logged_at), duplicate copies "
        "and fact_id conflicts, including those compaction already resolved.",
    )
    add_common_options(p)
    p.add_argument("--fact-type", action="append", dest="fact_types", metavar="NAME",
                   help="only this fact type (repeatable)")
    p.add_argument("--since", metavar="TIME", help="event_time from (RFC 3339, or YYYY-MM-DD)")
    p.add_argument("--until", metavar="TIME",
                   help="event_time up to, inclusive (RFC 3339, or YYYY-MM-DD for the whole day)")
    p.add_argument("--late-threshold", default="1h", help="late when logged_at - event_time "
                   "exceeds this (default 1h)")
    p.add_argument("--import-threshold", default="1h", help="an import when ingested_at - "
                   "logged_at exceeds this (default 1h)")
    p.add_argument("--json", action="store_true", help="print JSON for machines")
    p.set_defaults(handler=_cli_stats)


def _cli_stats(args: Any) -> int:
    since = _time_arg(args.since, field="--since", end=False)
    until = _time_arg(args.until, field="--until", end=True)
    if since is not None and until is not None and since > until:
        raise InvalidInput("--since is after --until", field="--since")
    cfg = StatsConfig(
        late_threshold_us=parse_duration(args.late_threshold, field="--late-threshold"),
        import_threshold_us=parse_duration(args.import_threshold, field="--import-threshold"),
    )
    report = fact_stats(Store(args.store), fact_types=args.fact_types, since_us=since,
                        until_us=until, config=cfg)
    if args.json:
        json.dump(report, sys.stdout, indent=1)
        print()
    else:
        print_stats(report)
    return 0


def print_stats(report: dict[str, Any]) -> None:
    """The human form of :func:`fact_stats`: rich tables."""
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    if not report["fact_types"]:
        out.print("no fact types declared")
        return
    summary = Table("fact type", "facts", "copies", "duplicates", "conflicts", "late",
                    "late p50", "late p99", "imports", title="facts per type")
    for s in report["fact_types"]:
        lt, d = s["lateness"], s["duplicates"]
        summary.add_row(
            s["fact_type"], f"{s['facts']:,}", f"{s['copies']:,}",
            f"{d['total']:,} ({d['removed_by_compaction']:,} compacted)",
            f"{s['conflicts']['count']:,}", f"{lt['late']:,} ({_share(lt['late_share'])})",
            _secs(lt["p50_s"]), _secs(lt["p99_s"]),
            f"{s['imports']['count']:,} ({_share(s['imports']['share'])})",
        )
    out.print(summary)
    for s in report["fact_types"]:
        days = Table("date", "facts", "copies", "live files", "awaiting deletion",
                     "removed by compaction", title=f"{s['fact_type']} per day")
        for d in s["days"]:
            days.add_row(d["date"], f"{d['facts']:,}", f"{d['copies']:,}",
                         str(d.get("live_files", 0)), str(d.get("files_awaiting_deletion", 0)),
                         f"{d.get('duplicates_removed_by_compaction', 0):,}")
        out.print(days)
        if s["null_rate"]:
            nulls = Table("field", "null rate", title=f"{s['fact_type']} null rates")
            for f, r in s["null_rate"].items():
                nulls.add_row(f, _share(r))
            out.print(nulls)
        for c in s["conflicts"]["facts"]:
            out.print(f"conflict: {s['fact_type']} entity {c['entity']} fact_id {c['fact_id']}",
                      soft_wrap=True)


def _share(x: float | None) -> str:
    return "-" if x is None else f"{100 * x:.2f}%"


def _secs(x: float | None) -> str:
    if x is None:
        return "-"
    if abs(x) < 60:
        return f"{x:.3g}s"
    return f"{x / 60:.1f}m" if abs(x) < 3600 else f"{x / 3600:,.1f}h"
