"""Reading facts back: the scan the time-travel engine is built on.

A scan lists the live files of the partitions (UTC dates of ``event_time``) its time range
touches, reads them with ``pyarrow.dataset`` (footers cached, row groups chosen by their entity
statistics; compacted files are sorted by entity, so that pruning bites: see ``_parquetio``),
keeps the counting copy of every fact (SPEC §3, see ``_dedup``), then applies the ``event_time``
and ``logged_at`` bounds and sorts by (entity, event_time, logged_at, fact_id), with one ``take``
at the end. No Python loop runs per fact, except for the canonical JSON of copies whose smallest
``logged_at`` ties.

The time bounds are applied *after* deduplication: which copy of a fact counts is decided over all
copies the scan read, so an answer never depends on the query time or on compaction.

Known limitation: copies of one ``fact_id`` whose ``event_time`` fall on different UTC dates live
in different partitions. A scan that reads only one of those partitions cannot see the other copy,
and compaction (one partition at a time) cannot merge them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttstore import US_PER_DAY, InvalidInput, Store, StoreUnavailable, timestamps_us

from ._dedup import (
    DuplicateGroups,
    choose_winners,
    dedup_table,
    find_duplicates,
    nulls_first,
)
from ._facttypes import FactType, FactTypeCatalog
from ._parquetio import FooterCache, RowGroupCache, read_files, warm_row_groups
from ._partitions import FactFile, Partition, PartitionCache, RecordCache, list_partitions
from ._scan_one import one_entity_rows

#: Columns a deduplicating scan always reads, whatever was asked for.
KEY_COLUMNS = ("fact_id", "event_time", "logged_at", "ingested_at", "producer")
DEFAULT_SCHEMA_REFRESH_S = 5.0


class FactReader:
    """Scans facts from a store, deduplicated, as Arrow.

    Args:
        store: where the facts are.
        catalog: the fact type catalog (one on ``store`` by default).
        schema_refresh_s: how long a fact type's latest schema is trusted before it is re-read,
            so a long-lived reader sees fields added later.

    Thread-safe.
    """

    def __init__(
        self, store: Store, *, catalog: FactTypeCatalog | None = None,
        schema_refresh_s: float = DEFAULT_SCHEMA_REFRESH_S,
    ) -> None:
        self.store = store
        self.catalog = catalog or FactTypeCatalog(store)
        self.schema_refresh_s = schema_refresh_s
        self._records = RecordCache()
        self._partitions = PartitionCache()
        self._footers = FooterCache()
        #: Set a :class:`~factlog._parquetio.RowGroupCache` to keep decoded row groups between
        #: scans (the query server does); None reads them every time.
        self.row_groups: RowGroupCache | None = None
        self._schema_at: dict[str, float] = {}
        self._schemas: dict[str, tuple[FactType, pa.Schema]] = {}
        self._fresh: dict[str, tuple[float, FactType]] = {}  # read from the store at that time
        self._columns: dict[tuple[int, tuple[str, ...] | None], list[str]] = {}

    # -- listing ---------------------------------------------------------------------------------
    def fact_type(self, name: str) -> FactType:
        """The latest declared version of ``name`` (re-read every ``schema_refresh_s``).

        Raises:
            UnknownFactType: it was never declared.
        """
        now = time.monotonic()
        fresh = self._fresh.get(name)
        if fresh is not None and now - fresh[0] <= self.schema_refresh_s:
            return fresh[1]
        stale = now - self._schema_at.get(name, -np.inf) > self.schema_refresh_s
        ft = self.catalog.get(name, refresh=stale)
        if stale:
            self._schema_at[name] = now
            self._fresh[name] = (now, ft)
        return ft

    def _stored_schema(self, ft: FactType) -> pa.Schema:
        """``ft``'s stored schema without metadata (built once per declaration read)."""
        hit = self._schemas.get(ft.name)
        if hit is None or hit[0] is not ft:
            hit = self._schemas[ft.name] = (ft, ft.arrow_schema().remove_metadata())
        return hit[1]

    def partitions(
        self, fact_type: str, *, start_us: int | None = None, end_us: int | None = None
    ) -> list[Partition]:
        """The partitions of ``fact_type`` that can hold an ``event_time`` in the range."""
        _check_range(start_us, end_us)
        return list_partitions(
            self.store, fact_type,
            first_day=None if start_us is None else start_us // US_PER_DAY,
            last_day=None if end_us is None else end_us // US_PER_DAY,
            cache=self._records, partitions=self._partitions,
        )

    def live_files(
        self, fact_type: str, *, start_us: int | None = None, end_us: int | None = None
    ) -> list[FactFile]:
        """The files a scan of this range would read: in the date partitions the range touches,
        the raw files no committed compaction replaced, plus the committed compacted files."""
        self.fact_type(fact_type)
        return [f for p in self.partitions(fact_type, start_us=start_us, end_us=end_us)
                for f in p.live]

    def warm(self, *, fill: float = 0.9, stop: Callable[[], bool] = lambda: False) -> int:
        """Decode row groups of every declared fact type into :attr:`row_groups` ahead of the
        first lookups, newest date partitions first (the dates online lookups read most), all
        fact types of one date before the next older date, until the cache is ``fill`` full or
        ``stop()``. Returns how many row groups it decoded (0 without a row-group cache).

        Raises:
            StoreUnavailable: the store could not be read.
        """
        cache = self.row_groups
        if cache is None or cache.max_bytes <= 0:
            return 0
        work = []
        for name in self.catalog.names():
            ft = self.fact_type(name)
            for p in self.partitions(name):
                work.append((p.day, name, ft, p.live))
        work.sort(key=lambda w: (-w[0], w[1]))
        full_at = int(fill * cache.max_bytes)
        loaded = 0
        for _, _, ft, files in work:
            if stop() or cache.bytes >= full_at:
                break
            try:
                loaded += warm_row_groups(
                    self.store, files, self._stored_schema(ft), ft.entity_name,
                    cache=self._footers, row_groups=cache, full_at=full_at, stop=stop)
            except FileNotFoundError:  # replaced and deleted since the listing: skip it
                continue
        return loaded

    def conflicts(
        self, fact_type: str, *, start_us: int | None = None, end_us: int | None = None
    ) -> pa.Table:
        """The facts whose live copies conflict (same entity and fact_id, different payload or
        ``event_time``), in the partitions of the range: columns (entity, ``fact_id``), sorted.
        Conflicts that compaction already resolved are in its commit records (``facts stats``
        reports both)."""
        ft = self.fact_type(fact_type)
        schema = ft.arrow_schema().remove_metadata()
        table = self._read(self.live_files(fact_type, start_us=start_us, end_us=end_us),
                           schema, schema.names, None)
        res = dedup_table(table, entity=ft.entity_name, fields=list(ft.fields),
                          json_fields=[f for f, t in ft.fields.items() if t == "json"])
        out = pa.table({ft.entity_name: res.conflict_entities, "fact_id": res.conflict_fact_ids})
        return out.sort_by([(ft.entity_name, "ascending"), ("fact_id", "ascending")])

    # -- scanning --------------------------------------------------------------------------------
    def scan(
        self,
        fact_type: str,
        *,
        entities: Sequence[Any] | pa.Array | pa.ChunkedArray | None = None,
        start_us: int | None = None,
        end_us: int | None = None,
        logged_before_us: int | None = None,
        columns: Sequence[str] | None = None,
        dedup: bool = True,
        files: Sequence[FactFile] | None = None,
    ) -> pa.Table:
        """The facts of ``fact_type``, one row per fact.

        Args:
            fact_type: a declared fact type.
            entities: only these entity keys (of the declared key type; int64 keys may be given
                as decimal strings). None: every entity.
            start_us: only ``event_time >= start_us``.
            end_us: only ``event_time <= end_us``.
            logged_before_us: only ``logged_at <= logged_before_us`` (the knowledge time),
                applied after deduplication.
            columns: the output columns, in this order (default: the whole latest schema).
            dedup: keep one copy per (entity, fact_id) (SPEC §3). False returns every live copy.
            files: the live files of this range, from a :meth:`live_files` call the caller just
                made for the same range (saves listing them again); see :meth:`scan_with_files`.

        Returns:
            A table in the latest schema of the fact type (fields that older files lack are
            null), sorted by (entity, event_time, logged_at, fact_id).

        Raises:
            UnknownFactType: the fact type was never declared.
            InvalidInput: an unknown column, a malformed entity key, or start after end.
            StoreUnavailable: the store could not be read.
        """
        return self.scan_with_files(
            fact_type, entities=entities, start_us=start_us, end_us=end_us,
            logged_before_us=logged_before_us, columns=columns, dedup=dedup, files=files)[0]

    def scan_with_files(
        self,
        fact_type: str,
        *,
        entities: Sequence[Any] | pa.Array | pa.ChunkedArray | None = None,
        start_us: int | None = None,
        end_us: int | None = None,
        logged_before_us: int | None = None,
        columns: Sequence[str] | None = None,
        dedup: bool = True,
        files: Sequence[FactFile] | None = None,
    ) -> tuple[pa.Table, list[FactFile]]:
        """As :meth:`scan`, and the live files the answer was read from (for lineage).

        ``files``, when given, must be what :meth:`live_files` returned for the same fact type
        and range within the caller's current request: they are read instead of listing the
        partitions again (a listing made earlier in the same request shows every object flushed
        or committed before the request). When one of them has disappeared since (a replaced
        file deleted after its compaction's grace period), the scan lists again, and returns
        the files it actually read.
        """
        ft = self.fact_type(fact_type)
        schema = self._stored_schema(ft)
        ck = (id(schema), None if columns is None else tuple(columns))
        out_cols = self._columns.get(ck)
        if out_cols is None:
            out_cols = _output_columns(schema, columns)
            if len(self._columns) < 4096:  # schemas are kept in _schemas, so ids stay theirs
                self._columns[ck] = out_cols
        ent = None if entities is None else _entity_array(entities, schema.field(ft.entity_name))
        _check_range(start_us, end_us)
        if ent is not None and len(ent) == 0:
            return schema.empty_table().select(out_cols), list(files or ())
        read_cols = list(out_cols)
        for c in (ft.entity_name, *KEY_COLUMNS):
            if c not in read_cols:
                read_cols.append(c)

        listed = None if files is None else list(files)
        read: list[FactFile] = []
        for attempt in range(2):
            if attempt == 0 and listed is not None:
                read = listed
            else:
                read = self.live_files(fact_type, start_us=start_us, end_us=end_us)
            try:
                table = self._read(read, schema, read_cols, ent).combine_chunks()
                keep = None
                if dedup and ent is not None and len(ent) == 1:
                    one = one_entity_rows(table, start_us, end_us, logged_before_us)
                    if one is not None:  # the same rows, without the general machinery
                        return table.select(out_cols).take(pa.array(one)), read
                if dedup:
                    table, keep = self._dedup(ft, schema, read, table, read_cols, ent)
                break
            except FileNotFoundError:
                # A file listed and then deleted after its compaction's grace period: the
                # compacted file is live now, a fresh listing finds it.
                if attempt:
                    raise StoreUnavailable(
                        f"fact type {fact_type!r}: files kept disappearing during the scan"
                    ) from None
        mask = _bounds_mask(table, start_us, end_us, logged_before_us)
        if keep is not None:
            mask = keep if mask is None else mask & keep
        rows = None if mask is None else np.flatnonzero(mask)
        order = sorted_rows(table, ft.entity_name, rows=rows, tiebreak=not dedup,
                            runs_sorted=all(f.kind == "compacted" for f in read))
        # always a take, even of rows already in order: fresh arrays, so the answer's bytes
        # (Arrow IPC included) never depend on which files or slices it came from
        return table.select(out_cols).take(order), read

    def _read(
        self, files: Sequence[FactFile], schema: pa.Schema, columns: Sequence[str],
        entities: pa.Array | None, filt: pc.Expression | None = None,
    ) -> pa.Table:
        return read_files(self.store, files, schema, columns=columns, filter=filt,
                          entity=schema.names[1], entities=entities, cache=self._footers,
                          row_groups=self.row_groups)

    def _dedup(
        self, ft: FactType, schema: pa.Schema, files: Sequence[FactFile], table: pa.Table,
        read_cols: Sequence[str], entities: pa.Array | None,
    ) -> tuple[pa.Table, np.ndarray | None]:
        """The rows to keep (None: all), and the table they index (replaced when the payload
        had to be read again)."""
        entity = ft.entity_name
        dups = find_duplicates(table, entity)
        if dups.empty:
            return table, None
        # The smallest logged_at decides every group where it is unique; no payload needed.
        w = choose_winners(table, dups, fields=None)
        keep = np.ones(table.num_rows, dtype=bool)
        keep[dups.rows] = False
        keep[w.rows[~w.tied]] = True
        if not w.tied.any():
            return table, keep
        fields = list(ft.fields)
        json_fields = [f for f, t in ft.fields.items() if t == "json"]
        if all(f in read_cols for f in fields):
            tied = w.tied[dups.group]
            _, group = np.unique(dups.group[tied], return_inverse=True)
            sub = DuplicateGroups(dups.rows[tied], group.astype(np.int64), int(w.tied.sum()))
            keep[choose_winners(table, sub, fields=fields, json_fields=json_fields).rows] = True
            return table, keep
        # The rest need the payload: read every column of the rows with those fact ids again,
        # and let them replace every row with those ids (other entities' included).
        tied_ids = _tied_ids(table, dups, w.tied)
        keep &= ~pc.is_in(table.column("fact_id"), value_set=tied_ids).to_numpy(
            zero_copy_only=False)
        full = self._read(files, schema, schema.names, entities,
                          pc.field("fact_id").isin(tied_ids))
        resolved = dedup_table(full, entity=entity, fields=fields, json_fields=json_fields).table
        merged = pa.concat_tables([table.filter(pa.array(keep)),
                                   resolved.select(list(read_cols))]).combine_chunks()
        return merged, None


def _tied_ids(table: pa.Table, dups: DuplicateGroups, tied: np.ndarray) -> pa.Array:
    rows = dups.rows[tied[dups.group]]
    return pc.unique(table.column("fact_id").take(pa.array(rows)).combine_chunks())


def sorted_rows(
    table: pa.Table, entity: str, *, rows: np.ndarray | None = None, tiebreak: bool = False,
    runs_sorted: bool = False,
) -> pa.Array:
    """Indices of ``rows`` (default: all) of ``table`` in (entity, event_time, logged_at,
    fact_id) order; with ``tiebreak`` then (ingested_at, producer), for tables that still hold
    several copies of a fact.

    ``runs_sorted`` says the table is likely a concatenation of compacted files in date order:
    then a stable sort by entity alone may already give the full order, which is checked in
    one vectorized pass (falling back to the full sort when it does not hold).
    """
    if runs_sorted and not tiebreak and table.num_rows > 1:
        order = _entity_stable_order(table, entity, rows)
        if order is not None:
            return order
    keys = {k: table.column(k) for k in (entity, "event_time", "logged_at", "fact_id")}
    if tiebreak:
        if "ingested_at" in table.column_names:
            keys["~ingested"] = table.column("ingested_at")
        if "producer" in table.column_names:
            keys["~producer_set"], keys["~producer"] = nulls_first(table.column("producer"))
    kt = pa.table(keys)
    if rows is not None:
        kt = kt.take(pa.array(rows))
    order = pc.sort_indices(kt, [(k, "ascending") for k in keys])
    return order if rows is None else pa.array(rows[order.to_numpy()])


def _entity_stable_order(
    table: pa.Table, entity: str, rows: np.ndarray | None
) -> pa.Array | None:
    col = table.column(entity)
    if pa.types.is_integer(col.type):
        ek = col.to_numpy()
    else:
        ek = pc.rank(col.combine_chunks(), sort_keys="ascending", tiebreaker="dense").to_numpy()
    idx = np.arange(table.num_rows) if rows is None else rows
    if len(idx) and ek[idx[0]] == ek[idx[-1]] and bool(np.all(ek[idx] == ek[idx[0]])):
        order = idx  # one entity (an online lookup): nothing to sort by entity
    else:
        order = idx[np.argsort(ek[idx], kind="stable")]
    e = ek[order]
    ev = timestamps_us(table.column("event_time"))[order]
    lg = timestamps_us(table.column("logged_at"))[order]
    same_e = e[1:] == e[:-1]
    bad = same_e & ((ev[1:] < ev[:-1]) | ((ev[1:] == ev[:-1]) & (lg[1:] < lg[:-1])))
    if bad.any():
        return None
    ties = np.flatnonzero(same_e & (ev[1:] == ev[:-1]) & (lg[1:] == lg[:-1]))
    if len(ties):
        ids = table.column("fact_id")
        nxt = ids.take(pa.array(order[ties + 1]))
        prev = ids.take(pa.array(order[ties]))
        if pc.any(pc.less(nxt, prev)).as_py():
            return None
    return pa.array(order)


def sort_facts(table: pa.Table, entity: str, *, tiebreak: bool = False) -> pa.Table:
    """``table`` sorted as :func:`sorted_rows` says."""
    return table.take(sorted_rows(table, entity, tiebreak=tiebreak))


def _bounds_mask(
    table: pa.Table, start_us: int | None, end_us: int | None, logged_before_us: int | None
) -> np.ndarray | None:
    if start_us is None and end_us is None and logged_before_us is None:
        return None
    mask = np.ones(table.num_rows, dtype=bool)
    if start_us is not None or end_us is not None:
        ev = timestamps_us(table.column("event_time"))
        if start_us is not None:
            mask &= ev >= start_us
        if end_us is not None:
            mask &= ev <= end_us
    if logged_before_us is not None:
        mask &= timestamps_us(table.column("logged_at")) <= logged_before_us
    return mask


def _bounds(
    table: pa.Table, start_us: int | None, end_us: int | None, logged_before_us: int | None
) -> pa.Table:
    mask = _bounds_mask(table, start_us, end_us, logged_before_us)
    return table if mask is None or mask.all() else table.filter(pa.array(mask))


def _check_range(start_us: int | None, end_us: int | None) -> None:
    if start_us is not None and end_us is not None and start_us > end_us:
        raise InvalidInput("start is after end", field="start_us")


def _output_columns(schema: pa.Schema, columns: Sequence[str] | None) -> list[str]:
    if columns is None:
        return list(schema.names)
    cols = list(columns)
    unknown = [c for c in cols if c not in schema.names]
    if unknown:
        raise InvalidInput(f"unknown columns {unknown}; known: {schema.names}", field="columns")
    if len(set(cols)) != len(cols):
        raise InvalidInput("a column is named twice", field="columns")
    return cols


def _entity_array(values: Any, field: pa.Field) -> pa.Array:
    """Entity keys in the declared type; int64 keys also from decimal strings (exact > 2^53)."""
    try:
        if isinstance(values, pa.ChunkedArray):
            values = values.combine_chunks()
        if isinstance(values, pa.Array):
            arr = values
        elif isinstance(values, np.ndarray):
            arr = pa.array(values)
        else:
            arr = _python_keys(list(values), field.type)
        if len(arr) == 0:
            return pa.array([], field.type)
        if arr.type != field.type:
            # Only decimal strings may become int64 keys; nothing else is converted, so "007"
            # stays a string key and a float never silently becomes an int.
            if not (pa.types.is_integer(field.type)
                    and (pa.types.is_string(arr.type) or pa.types.is_integer(arr.type))):
                raise pa.ArrowInvalid(f"got {arr.type}")
            arr = arr.cast(field.type, safe=True)
    except (pa.ArrowInvalid, pa.ArrowTypeError, pa.ArrowNotImplementedError, TypeError,
            ValueError, OverflowError) as exc:
        raise InvalidInput(
            f"entity keys must be {field.type} ({field.name}): {exc}", field="entities"
        ) from exc
    if arr.null_count:
        raise InvalidInput("entity keys must not be null", field="entities")
    return arr if len(arr) == 1 else pc.unique(arr)


def _python_keys(values: list[Any], typ: pa.DataType) -> pa.Array:
    if any(isinstance(v, bool | float) for v in values):
        raise TypeError("entity keys are int64 or string, not bool or float")
    try:
        return pa.array(values, typ)
    except (pa.ArrowInvalid, pa.ArrowTypeError):
        if not pa.types.is_integer(typ):
            raise
    # int64 keys given as a mix of ints and decimal strings (JSON clients above 2^53)
    return pa.array([v if isinstance(v, int) else int(str(v), 10) for v in values], typ)
