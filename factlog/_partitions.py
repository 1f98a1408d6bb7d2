"""The fact layout in the store, and which of a partition's files are live.

A partition is one fact type and one UTC date of ``event_time``::

    facts/<fact_type>/date=YYYY-MM-DD/<writer_id>-<segment:010d>.parquet   raw fact objects
    facts/<fact_type>/date=YYYY-MM-DD/c-<compaction_id>-<part:04d>.parquet  compacted objects
    facts/<fact_type>/date=YYYY-MM-DD/_compactions/<seq:010d>.json         commit records

A compacted object becomes visible only when a commit record naming it in ``outputs`` exists; the
record also names the files it ``replaces``, which stop being live at that instant. So the live
files of a partition are: the raw files no record replaces, plus the outputs of committed records
that no later record replaces. A ``c-`` file that no record names is the output of a compaction in
flight, or of one that crashed before its commit: it is never read, and compaction deletes it after
the grace period.

Records are immutable and cached by key. A listing is not a snapshot of the store, so one that shows
a record but not all of its still-live outputs is listed again (outputs are written before their
record, so a second listing sees them).
"""

from __future__ import annotations

import functools
import json
import re
import threading
from collections.abc import Hashable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ttstore import (
    ObjectNotFound,
    Store,
    date_to_day,
    day_to_date,
    format_timestamp,
    key,
    parse_timestamp,
)

from ._errors import PartitionInconsistent

FACTS_PREFIX = "facts"
COMPACTIONS_DIR = "_compactions"
RECORD_FORMAT = 1
#: A partition's date range is listed one date prefix at a time up to this many days; a longer
#: or unbounded range lists the whole fact type once.
MAX_DAYS_LISTED_SEPARATELY = 31
_LIST_ATTEMPTS = 3

_DATE_DIR = re.compile(r"^date=(\d{4}-\d{2}-\d{2})$")
_RECORD_NAME = re.compile(r"^(\d{10})\.json$")
_COMPACTED_NAME = re.compile(r"^c-([0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})"
                             r"-(\d{4})\.parquet$")


@functools.lru_cache(maxsize=65_536)
def partition_prefix(fact_type: str, date: str) -> str:
    """``facts/<fact_type>/date=YYYY-MM-DD`` (checked by ``key`` once per pair)."""
    return key(FACTS_PREFIX, fact_type, f"date={date}")


def record_key(fact_type: str, date: str, seq: int) -> str:
    return key(partition_prefix(fact_type, date), COMPACTIONS_DIR, f"{seq:010d}.json")


def compacted_name(compaction_id: str, part: int) -> str:
    return f"c-{compaction_id}-{part:04d}.parquet"


def compaction_id_time_us(compaction_id: str) -> int:
    """The creation time (ms precision) carried by a UUIDv7 compaction id."""
    return int(compaction_id.replace("-", "")[:12], 16) * 1000


@dataclass(frozen=True)
class FactFile:
    """One Parquet object of a partition."""

    key: str
    size: int
    fact_type: str
    date: str
    kind: Literal["raw", "compacted"]

    @property
    def name(self) -> str:
        return self.key.rsplit("/", 1)[-1]


@dataclass(frozen=True)
class CompactionRecord:
    """A committed compaction of one partition (the JSON at ``_compactions/<seq>.json``).

    ``replaces`` and ``outputs`` are file names inside the partition directory.
    ``conflict_facts`` lists the ``{"entity", "fact_id"}`` of the conflicts it resolved, so that
    ``facts stats`` still reports them after the losing copies are gone.
    """

    seq: int
    fact_type: str
    date: str
    compaction_id: str
    committed_at_us: int
    replaces: tuple[str, ...]
    outputs: tuple[str, ...]
    rows_in: int = 0
    rows_out: int = 0
    duplicates_removed: int = 0
    conflicts: int = 0
    conflict_facts: tuple[Mapping[str, Any], ...] = ()
    schema_version: int | None = None

    @property
    def key(self) -> str:
        return record_key(self.fact_type, self.date, self.seq)

    def to_json(self) -> dict[str, Any]:
        return {
            "format": RECORD_FORMAT,
            "seq": self.seq,
            "compaction_id": self.compaction_id,
            "fact_type": self.fact_type,
            "date": self.date,
            "committed_at": format_timestamp(self.committed_at_us),
            "schema_version": self.schema_version,
            "replaces": list(self.replaces),
            "outputs": list(self.outputs),
            "rows_in": self.rows_in,
            "rows_out": self.rows_out,
            "duplicates_removed": self.duplicates_removed,
            "conflicts": self.conflicts,
            "conflict_facts": [dict(c) for c in self.conflict_facts],
        }

    @classmethod
    def from_json(cls, body: Mapping[str, Any]) -> CompactionRecord:
        return cls(
            seq=int(body["seq"]),
            fact_type=str(body["fact_type"]),
            date=str(body["date"]),
            compaction_id=str(body["compaction_id"]),
            committed_at_us=parse_timestamp(body["committed_at"], field="committed_at"),
            replaces=tuple(body["replaces"]),
            outputs=tuple(body["outputs"]),
            rows_in=int(body.get("rows_in", 0)),
            rows_out=int(body.get("rows_out", 0)),
            duplicates_removed=int(body.get("duplicates_removed", 0)),
            conflicts=int(body.get("conflicts", 0)),
            conflict_facts=tuple(body.get("conflict_facts", ())),
            schema_version=body.get("schema_version"),
        )


@dataclass
class Partition:
    """What one listing showed of a partition, and what is live in it."""

    fact_type: str
    date: str
    records: list[CompactionRecord] = field(default_factory=list)
    live: list[FactFile] = field(default_factory=list)
    replaced: list[FactFile] = field(default_factory=list)  # awaiting deletion after the grace
    orphans: list[FactFile] = field(default_factory=list)  # compacted, never committed

    @property
    def prefix(self) -> str:
        return partition_prefix(self.fact_type, self.date)

    @property
    def day(self) -> int:
        return date_to_day(self.date)

    @property
    def next_seq(self) -> int:
        return (max(r.seq for r in self.records) + 1) if self.records else 1


class RecordCache:
    """Commit records are immutable, so each is fetched once per process. Thread-safe."""

    def __init__(self) -> None:
        self._records: dict[str, CompactionRecord] = {}
        self._lock = threading.Lock()

    def get(self, store: Store, k: str) -> CompactionRecord:
        with self._lock:
            hit = self._records.get(k)
        if hit is not None:
            return hit
        rec = CompactionRecord.from_json(json.loads(store.get(k)))
        with self._lock:
            self._records[k] = rec
        return rec


def _build(
    store: Store, fact_type: str, date: str, objects: Iterable[tuple[str, int]],
    cache: RecordCache,
) -> Partition | None:
    """One partition from its listed ``(key, size)``; None when the listing looks torn."""
    part = Partition(fact_type, date)
    files: dict[str, FactFile] = {}
    for k, size in objects:
        rest = k.split("/")[3:]
        if len(rest) == 2 and rest[0] == COMPACTIONS_DIR and _RECORD_NAME.match(rest[1]):
            try:
                part.records.append(cache.get(store, k))
            except ObjectNotFound:
                return None
        elif len(rest) == 1 and rest[0].endswith(".parquet") and rest[0][0] not in "_.":
            kind: Literal["raw", "compacted"] = (
                "compacted" if _COMPACTED_NAME.match(rest[0]) else "raw"
            )
            files[rest[0]] = FactFile(k, size, fact_type, date, kind)
    part.records.sort(key=lambda r: r.seq)
    replaced = {n for r in part.records for n in r.replaces}
    committed = {n for r in part.records for n in r.outputs}
    if any(n not in files for n in committed - replaced):
        return None  # a record without its outputs: the listing is not a snapshot
    for name in sorted(files):
        f = files[name]
        if name in replaced:
            part.replaced.append(f)
        elif f.kind == "compacted" and name not in committed:
            part.orphans.append(f)
        else:
            part.live.append(f)
    return part


class PartitionCache:
    """Partitions built from a listing that had a change token (a local store), reused for as
    long as a new listing of the same partition shows the same token. Thread-safe.

    The cached :class:`Partition` objects are shared: callers must not modify them.
    """

    def __init__(self, *, max_partitions: int = 100_000) -> None:
        self.max_partitions = max_partitions
        self._items: dict[str, tuple[Hashable, Partition]] = {}
        self.lock = threading.Lock()
        #: (fact type, first day, last day) -> (the tokens of every listing behind it, the
        #: partitions): a repeated range costs one ``stat`` per directory when nothing changed
        self.ranges: dict[tuple[str, int | None, int | None],
                          tuple[tuple[Hashable, ...], list[Partition]]] = {}

    def get(self, prefix: str, token: Hashable) -> Partition | None:
        with self.lock:
            hit = self._items.get(prefix)
        return hit[1] if hit is not None and hit[0] == token else None

    def put(self, prefix: str, token: Hashable, part: Partition) -> None:
        with self.lock:
            if len(self._items) >= self.max_partitions and prefix not in self._items:
                self._items.clear()  # rare: far more partitions than one reader touches
            self._items[prefix] = (token, part)


def list_partitions(
    store: Store, fact_type: str, *, first_day: int | None = None, last_day: int | None = None,
    cache: RecordCache | None = None, partitions: PartitionCache | None = None,
) -> list[Partition]:
    """The partitions of ``fact_type`` whose date (days since the epoch) is in
    ``[first_day, last_day]`` (either bound may be None), sorted by date.

    With ``partitions`` and a local store, each partition is listed on its own, with a change
    token, and a partition whose listing did not change since it was last built is reused (a
    repeated query costs a few ``stat`` calls per partition); otherwise the range is listed
    afresh.

    Raises:
        PartitionInconsistent: a record's outputs stayed missing over several listings.
    """
    cache = cache or RecordCache()
    base = key(FACTS_PREFIX, fact_type)
    if first_day is not None and last_day is not None and first_day > last_day:
        return []
    if partitions is not None and store.is_local:
        return _list_tokened(store, fact_type, first_day, last_day, cache, partitions)
    if (first_day is not None and last_day is not None
            and last_day - first_day < MAX_DAYS_LISTED_SEPARATELY):
        prefixes = [partition_prefix(fact_type, day_to_date(d)) + "/"
                    for d in range(first_day, last_day + 1)]
    else:
        prefixes = [base + "/"]
    out: dict[str, Partition] = {}
    for prefix in prefixes:
        for date, objs in _group_by_date(store.list(prefix), first_day, last_day).items():
            out[date] = _settle(store, fact_type, date, objs, cache)[0]
    return [out[d] for d in sorted(out)]


def _list_tokened(
    store: Store, fact_type: str, first_day: int | None, last_day: int | None,
    cache: RecordCache, partitions: PartitionCache,
) -> list[Partition]:
    range_key = (fact_type, first_day, last_day)
    memo = partitions.ranges.get(range_key)
    if memo is not None and store.unchanged(memo[0]):
        return memo[1]
    tokens: list[Hashable | None] = []
    if (first_day is not None and last_day is not None
            and last_day - first_day < MAX_DAYS_LISTED_SEPARATELY):
        dates = [day_to_date(d) for d in range(first_day, last_day + 1)]
    else:
        names, token = store.subdirs(key(FACTS_PREFIX, fact_type))
        tokens.append(token)
        dates = []
        for name in names:
            m = _DATE_DIR.match(name)
            if m is None:
                continue
            day = date_to_day(m.group(1))
            if (first_day is None or day >= first_day) and (last_day is None or day <= last_day):
                dates.append(m.group(1))
    out = []
    for date in dates:
        prefix = partition_prefix(fact_type, date)
        listing = store.listing(prefix)
        tokens.append(listing.token)
        if not listing.objects:
            continue
        part = None if listing.token is None else partitions.get(prefix, listing.token)
        if part is None:
            objs = [(o.key, o.size) for o in listing.objects]
            part, relisted = _settle(store, fact_type, date, objs, cache)
            if listing.token is not None and not relisted:
                partitions.put(prefix, listing.token, part)
            else:
                tokens.append(None)
        out.append(part)
    if all(t is not None for t in tokens):
        with partitions.lock:
            if len(partitions.ranges) >= 4096:
                partitions.ranges.clear()
            partitions.ranges[range_key] = (tuple(t for t in tokens if t is not None), out)
    return out


def _group_by_date(
    objects: Iterable[Any], first_day: int | None, last_day: int | None
) -> dict[str, list[tuple[str, int]]]:
    by_date: dict[str, list[tuple[str, int]]] = {}
    for o in objects:
        parts = o.key.split("/")
        if len(parts) < 4:
            continue
        m = _DATE_DIR.match(parts[2])
        if m is None:
            continue
        date = m.group(1)
        if first_day is not None or last_day is not None:
            day = date_to_day(date)
            if (first_day is not None and day < first_day) or (
                last_day is not None and day > last_day
            ):
                continue
        by_date.setdefault(date, []).append((o.key, o.size))
    return by_date


def _settle(
    store: Store, fact_type: str, date: str, objs: list[tuple[str, int]], cache: RecordCache
) -> tuple[Partition, bool]:
    """The partition of a listing, listing again while it looks torn; and whether it did."""
    for attempt in range(_LIST_ATTEMPTS):
        part = _build(store, fact_type, date, objs, cache)
        if part is not None:
            return part, attempt > 0
        objs = [(o.key, o.size) for o in store.list(partition_prefix(fact_type, date) + "/")]
    raise PartitionInconsistent(
        f"fact type {fact_type!r}, date {date}: a compaction record names outputs that are "
        "missing from the store", code="inconsistent_partition",
    )


def read_partition(
    store: Store, fact_type: str, date: str, *, cache: RecordCache | None = None
) -> Partition:
    """One partition, listed now (empty if it has no objects)."""
    day = date_to_day(date)
    parts = list_partitions(store, fact_type, first_day=day, last_day=day, cache=cache)
    return parts[0] if parts else Partition(fact_type, date)
