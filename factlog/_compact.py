"""Compaction: a partition's small files become a few deduplicated, sorted ones.

For one partition (fact type, UTC date) it reads the live files (raw, and earlier compacted ones),
keeps the counting copy of every fact with the reader's own rule, sorts by
(entity, event_time, logged_at, fact_id), and writes ``c-<compaction_id>-<part>.parquet`` with
modest row groups, so a scan for a few entities reads a few row groups. Then it commits by
creating ``_compactions/<seq:010d>.json`` with a conditional put:

- ``seq`` is the last committed one plus one, so of two compactors that read the same state only
  one can commit (optimistic concurrency); the other deletes its own outputs, which nothing ever
  referenced, and looks again.
- The record lists ``replaces`` (the input files) and ``outputs``: readers switch from the one to
  the other at that instant, and a raw file uploaded meanwhile is not in ``replaces``, so it stays
  live.
- A file replaced by a record committed more than the grace period ago is deleted (readers that
  listed before the commit are long done); so is a ``c-`` file no record names (a crashed
  compaction), once it is older than ``orphan_age_us``.

It never changes a scan's answer: the counting copy is chosen by a total order, and the minimum
over a partition's files is the minimum over the minima of any grouping of them.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa

from ttstore import (
    US_PER_S,
    Clock,
    InvalidInput,
    ObjectExists,
    ObjectNotFound,
    Store,
    StoreError,
    SystemClock,
    date_to_day,
    key,
)

from ._dedup import dedup_table
from ._facttypes import FactTypeCatalog
from ._ids import uuid7_array
from ._parquetio import FooterCache, read_files, undeclared_columns
from ._partitions import (
    CompactionRecord,
    FactFile,
    Partition,
    RecordCache,
    compacted_name,
    compaction_id_time_us,
    list_partitions,
    read_partition,
)
from ._reader import sort_facts

DEFAULT_GRACE_US = 3600 * US_PER_S
_log = logging.getLogger(__name__)
_ATTEMPTS = 5
_INT_JSON_EXACT = 2**53


@dataclass(frozen=True, kw_only=True)
class CompactionConfig:
    """How compaction behaves.

    Args:
        grace_us: how long files replaced by a commit stay in place for readers that listed
            before it (default 1h).
        orphan_age_us: a compacted file no commit names is deleted once this old (default 1h);
            a compaction that took more than half of it abandons its commit.
        row_group_rows: rows per Parquet row group of compacted files.
        max_file_rows: rows per compacted file; a larger partition gets several.
        min_files: a partition is eligible with at least this many live files.
        max_conflicts_recorded: conflicting fact ids listed in a commit record (all are counted).

    Raises:
        InvalidInput: a negative duration or a size below 1.
    """

    grace_us: int = DEFAULT_GRACE_US
    orphan_age_us: int = 3600 * US_PER_S
    row_group_rows: int = 8_192
    max_file_rows: int = 4_000_000
    min_files: int = 2
    max_conflicts_recorded: int = 10_000

    def __post_init__(self) -> None:
        for name in ("grace_us", "orphan_age_us", "max_conflicts_recorded"):
            if getattr(self, name) < 0:
                raise InvalidInput(f"{name} must be >= 0", field=name)
        for name in ("row_group_rows", "max_file_rows", "min_files"):
            if getattr(self, name) < 1:
                raise InvalidInput(f"{name} must be >= 1", field=name)


@dataclass
class PartitionCompaction:
    """What compaction did to one partition.

    ``status``: ``committed``; ``would_compact`` (dry run); ``skipped`` (fewer than
    ``min_files`` live files); ``lost_race`` (another compactor committed first and left too
    little to do); ``schema_mismatch`` (a file has columns no declared version has: left as
    is, since rewriting would drop them).
    """

    fact_type: str
    date: str
    status: str
    files_in: int = 0
    files_out: int = 0
    rows_in: int = 0
    rows_out: int = 0
    duplicates_removed: int = 0
    conflicts: int = 0
    record: str | None = None
    deleted: list[str] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class CompactionReport:
    """Everything one run did, with totals."""

    partitions: list[PartitionCompaction] = field(default_factory=list)
    dry_run: bool = False

    @property
    def deleted(self) -> list[str]:
        return [k for p in self.partitions for k in p.deleted]

    def totals(self) -> dict[str, int]:
        done = [p for p in self.partitions if p.status in ("committed", "would_compact")]
        return {
            "partitions_compacted": len(done),
            "files_in": sum(p.files_in for p in done),
            "files_out": sum(p.files_out for p in done),
            "rows_in": sum(p.rows_in for p in done),
            "rows_out": sum(p.rows_out for p in done),
            "duplicates_removed": sum(p.duplicates_removed for p in done),
            "conflicts": sum(p.conflicts for p in done),
            "files_deleted": len(self.deleted),
        }

    def to_json(self) -> dict[str, Any]:
        return {"dry_run": self.dry_run, **self.totals(),
                "partitions": [p.to_json() for p in self.partitions],
                "deleted": self.deleted}


class Compactor:
    """Compacts fact partitions and deletes what commits replaced, after the grace period.

    Args:
        store: where the facts are.
        catalog: the fact type catalog (one on ``store`` by default).
        clock: "now", for ``committed_at`` and the grace period.
        config: see :class:`CompactionConfig`.
    """

    def __init__(
        self, store: Store, *, catalog: FactTypeCatalog | None = None,
        clock: Clock | None = None, config: CompactionConfig | None = None,
    ) -> None:
        self.store = store
        self.catalog = catalog or FactTypeCatalog(store)
        self.clock = clock or SystemClock()
        self.config = config or CompactionConfig()
        self._records = RecordCache()
        self._footers = FooterCache()

    def run(
        self, *, fact_types: Sequence[str] | None = None, dates: Sequence[str] | None = None,
        dry_run: bool = False,
        on_plan: Callable[[int], None] | None = None,
        on_partition: Callable[[PartitionCompaction], None] | None = None,
    ) -> CompactionReport:
        """Compact every eligible partition (of ``fact_types`` and ``dates`` if given), then
        delete the files whose grace period is over. Returns once everything is committed.

        Raises:
            UnknownFactType: a named fact type was never declared.
            InvalidInput: a malformed date.
        """
        names = list(fact_types) if fact_types else self.catalog.names()
        days = sorted({_day(d) for d in dates}) if dates else None
        plan: list[Partition] = []
        for name in names:
            self.catalog.get(name, refresh=True)
            for day_range in _ranges(days):
                plan.extend(list_partitions(self.store, name, first_day=day_range[0],
                                            last_day=day_range[1], cache=self._records))
        if on_plan is not None:
            on_plan(len(plan))
        report = CompactionReport(dry_run=dry_run)
        for part in plan:
            if len(part.live) >= self.config.min_files:
                res = self.compact_partition(part.fact_type, part.date, dry_run=dry_run)
            else:
                res = PartitionCompaction(part.fact_type, part.date, "skipped",
                                          files_in=len(part.live))
            res.deleted = self.delete_expired(part.fact_type, part.date, dry_run=dry_run)
            report.partitions.append(res)
            if on_partition is not None:
                on_partition(res)
        return report

    def compact_partition(
        self, fact_type: str, date: str, *, dry_run: bool = False
    ) -> PartitionCompaction:
        """Compact one partition and commit. Retries when another compactor commits first.

        Raises:
            StoreUnavailable: the store failed; outputs of an unproven commit are left for the
                orphan cleanup.
        """
        version, ft = self.catalog.get_versioned(fact_type, refresh=True)
        for attempt in range(_ATTEMPTS):
            part = read_partition(self.store, fact_type, date, cache=self._records)
            if len(part.live) < self.config.min_files:
                return PartitionCompaction(fact_type, date, "lost_race" if attempt else "skipped",
                                           files_in=len(part.live))
            started_us = self.clock.now_us()
            try:
                extra = undeclared_columns(self.store, part.live, ft.arrow_schema(),
                                           cache=self._footers)
                if extra:  # written under a version declared since we looked: look again
                    version, ft = self.catalog.get_versioned(fact_type, refresh=True)
                    extra = undeclared_columns(self.store, part.live, ft.arrow_schema(),
                                               cache=self._footers)
                if extra:
                    # Rewriting would drop columns no declaration knows: leave the files be.
                    _log.warning("fact type %r, date %s: not compacted, files have undeclared "
                                 "columns %s", fact_type, date, extra)
                    return PartitionCompaction(fact_type, date, "schema_mismatch",
                                               files_in=len(part.live))
                schema = ft.arrow_schema().remove_metadata()
                table = read_files(self.store, part.live, schema, cache=self._footers)
            except FileNotFoundError:
                continue  # a concurrent compaction's grace deletion; look again
            fields = list(ft.fields)
            json_fields = [f for f, t in ft.fields.items() if t == "json"]
            res = dedup_table(table, entity=ft.entity_name, fields=fields,
                              json_fields=json_fields)
            out = sort_facts(res.table, ft.entity_name)
            result = PartitionCompaction(
                fact_type, date, "would_compact" if dry_run else "committed",
                files_in=len(part.live), rows_in=res.copies, rows_out=out.num_rows,
                duplicates_removed=res.duplicates_removed, conflicts=len(res.conflict_fact_ids),
            )
            if dry_run:
                result.files_out = _n_outputs(out.num_rows, self.config.max_file_rows)
                return result
            cid = str(uuid7_array(np.array([started_us])).to_pylist()[0])
            outputs = self._write_outputs(part, cid, out)
            record = CompactionRecord(
                seq=part.next_seq, fact_type=fact_type, date=date, compaction_id=cid,
                committed_at_us=self.clock.now_us(),
                replaces=tuple(f.name for f in part.live), outputs=tuple(outputs),
                rows_in=res.copies, rows_out=out.num_rows,
                duplicates_removed=res.duplicates_removed,
                conflicts=len(res.conflict_fact_ids),
                conflict_facts=_conflict_list(res.conflict_entities, res.conflict_fact_ids,
                                              self.config.max_conflicts_recorded),
                schema_version=version,
            )
            if record.committed_at_us - started_us > self.config.orphan_age_us // 2:
                # Too slow: the orphan cleanup may already take our outputs for a crash.
                self._delete(part, outputs)
                continue
            if self._commit(record):
                result.files_out = len(outputs)
                result.record = record.key
                return result
            self._delete(part, outputs)  # never referenced: the other commit won
        return PartitionCompaction(fact_type, date, "lost_race")

    def _write_outputs(self, part: Partition, cid: str, out: pa.Table) -> list[str]:
        outputs: list[str] = []
        try:
            for i, off in enumerate(range(0, out.num_rows, self.config.max_file_rows)):
                name = compacted_name(cid, i)
                self.store.write_parquet(
                    key(part.prefix, name), out.slice(off, self.config.max_file_rows),
                    row_group_size=self.config.row_group_rows,
                )
                outputs.append(name)
        except BaseException:
            self._delete(part, outputs)  # no commit was attempted: nothing references them
            raise
        return outputs

    def _commit(self, record: CompactionRecord) -> bool:
        """Create the record. False if another compactor committed this ``seq`` first."""
        try:
            self.store.put_if_absent(
                record.key, json.dumps(record.to_json(), indent=1).encode()
            )
        except ObjectExists:
            # Our own put, retried by the client after a lost response, also lands here.
            try:
                theirs = json.loads(self.store.get(record.key))
            except ObjectNotFound:
                return False
            return bool(theirs.get("compaction_id") == record.compaction_id)
        return True

    def _delete(self, part: Partition, names: Iterable[str]) -> None:
        for name in names:
            try:
                self.store.delete(key(part.prefix, name))
            except StoreError:
                pass  # left as an orphan; the cleanup after the grace period removes it

    def delete_expired(self, fact_type: str, date: str, *, dry_run: bool = False) -> list[str]:
        """Delete the files of a partition that commits replaced more than ``grace_us`` ago, and
        compacted files no commit names that are older than ``orphan_age_us``.

        Returns:
            The deleted keys (with ``dry_run``, those that would be).
        """
        part = read_partition(self.store, fact_type, date, cache=self._records)
        now = self.clock.now_us()
        expired = {n for r in part.records if r.committed_at_us + self.config.grace_us <= now
                   for n in r.replaces}
        doomed: list[FactFile] = [f for f in part.replaced if f.name in expired]
        for f in part.orphans:
            cid = f.name[2:-len("-0000.parquet")]
            if compaction_id_time_us(cid) + self.config.orphan_age_us <= now:
                doomed.append(f)
        if not dry_run:
            for f in doomed:
                self.store.delete(f.key)
        return sorted(f.key for f in doomed)


def _n_outputs(rows: int, per_file: int) -> int:
    return -(-rows // per_file)


def _conflict_list(entities: pa.Array, fact_ids: pa.Array, limit: int) -> tuple[dict[str, Any],
                                                                                ...]:
    out = []
    for e, f in zip(entities[:limit].to_pylist(), fact_ids[:limit].to_pylist(), strict=True):
        out.append({"entity": entity_json(e), "fact_id": f})
    return tuple(out)


def entity_json(value: Any) -> Any:
    """An entity key for JSON: int64 keys beyond 2^53 as decimal strings (SPEC §2)."""
    if isinstance(value, int) and abs(value) > _INT_JSON_EXACT:
        return str(value)
    return value


def _day(date: str) -> int:
    try:
        return date_to_day(date)
    except (TypeError, ValueError):
        raise InvalidInput(f"{date!r} is not a date like 2026-11-20", field="date") from None


def _ranges(days: Sequence[int] | None) -> list[tuple[int | None, int | None]]:
    if days is None:
        return [(None, None)]
    return [(d, d) for d in days]


# -- CLI: timetravel facts compact ------------------------------------------------------------
def parse_grace(value: str) -> int:
    """``--grace``: a duration (``1h``, ``30m``), or ``0`` for no grace at all."""
    if value.strip() in ("0", "0s", "0m", "0h", "0d"):
        return 0
    from ttstore import parse_duration  # noqa: PLC0415

    return parse_duration(value, field="--grace")


def register_cli(fsub: Any) -> None:
    """Add ``compact`` to the ``timetravel facts`` subcommands."""
    from ttstore import add_common_options  # noqa: PLC0415

    p = fsub.add_parser(
        "compact", help="merge each partition's small files into deduplicated, sorted ones",
        description="Compact fact partitions (fact type, UTC date): merge the live files into "
        "deduplicated files sorted by (entity, event_time), commit atomically, then delete the "
        "files that commits older than the grace period replaced. With no options it compacts "
        "everything eligible (partitions with 2 or more live files) and returns once committed. "
        "It never changes a query result.",
    )
    add_common_options(p, now=True)
    p.add_argument("--fact-type", action="append", dest="fact_types", metavar="NAME",
                   help="only this fact type (repeatable)")
    p.add_argument("--date", action="append", dest="dates", metavar="YYYY-MM-DD",
                   help="only this UTC date partition (repeatable)")
    p.add_argument("--grace", default="1h",
                   help="keep replaced files this long after their commit (default 1h; 0 = none)")
    p.add_argument("--dry-run", action="store_true",
                   help="say what would be compacted and deleted; change nothing")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(handler=_cli_compact)


def _cli_compact(args: Any) -> int:
    import sys  # noqa: PLC0415

    from rich.console import Console  # noqa: PLC0415
    from rich.progress import Progress  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    from ttstore import clock_from_now  # noqa: PLC0415

    store = Store(args.store)
    compactor = Compactor(store, clock=clock_from_now(args.now),
                          config=CompactionConfig(grace_us=parse_grace(args.grace)))
    err = Console(stderr=True)
    with Progress(console=err, disable=not sys.stderr.isatty(), transient=True) as progress:
        task = progress.add_task("compacting", total=None)
        report = compactor.run(
            fact_types=args.fact_types, dates=args.dates, dry_run=args.dry_run,
            on_plan=lambda n: progress.update(task, total=n),
            on_partition=lambda r: progress.update(
                task, advance=1, description=f"{r.fact_type} {r.date}"),
        )
    if args.json:
        print(json.dumps(report.to_json(), indent=1))
        return 0
    out = Console(highlight=False, width=None if sys.stdout.isatty() else 140)
    t = report.totals()
    done = [p for p in report.partitions if p.status in ("committed", "would_compact")]
    if done:
        table = Table("fact type", "date", "status", "files", "rows", "duplicates", "conflicts")
        for p in done:
            table.add_row(p.fact_type, p.date, p.status, f"{p.files_in} → {p.files_out}",
                          f"{p.rows_in:,} → {p.rows_out:,}", f"{p.duplicates_removed:,}",
                          f"{p.conflicts:,}")
        out.print(table)
    verb = "would compact" if args.dry_run else "compacted"
    out.print(
        f"{verb} {t['partitions_compacted']} of {len(report.partitions)} partitions: "
        f"{t['files_in']} files → {t['files_out']}, {t['rows_in']:,} rows → {t['rows_out']:,} "
        f"({t['duplicates_removed']:,} duplicates removed, {t['conflicts']:,} conflicts); "
        f"{'would delete' if args.dry_run else 'deleted'} {t['files_deleted']} files",
        soft_wrap=True,  # one line however long: scripts grep it
    )
    for k in report.deleted:
        out.print(f"{'would delete' if args.dry_run else 'deleted'} {k}", soft_wrap=True)
    return 0
