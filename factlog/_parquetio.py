"""Reading fact files: footers cached, row groups chosen by their entity statistics.

Fact objects are immutable, so a file's Parquet footer (schema, row groups, statistics) is read
once per reader and kept: a repeated scan of the same files (the query service asking about one
entity after another) costs no footer requests. For a scan of some entities, the row groups whose
entity [min, max] holds none of them are skipped; compacted files are sorted by entity in modest
row groups, so that prunes most of a file. The entity filter itself is then one hash lookup in
memory, cheaper than pushing a long ``is_in`` into every row group.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ttstore import Store, StoreUnavailable

from ._partitions import FactFile

_PARQUET = ds.ParquetFileFormat()
DEFAULT_MAX_CACHED_FILES = 20_000


@dataclass(frozen=True)
class _Footer:
    fragment: ds.ParquetFileFragment
    mins: np.ndarray | None  # entity min per row group; None when statistics are missing
    maxs: np.ndarray | None


class FooterCache:
    """Parquet footers of fact files by store key, least recently used evicted. Thread-safe."""

    def __init__(self, *, max_files: int = DEFAULT_MAX_CACHED_FILES) -> None:
        self.max_files = max_files
        self._items: OrderedDict[tuple[str, str], _Footer] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fs: Any, path: str, key: str, entity: str) -> _Footer:
        with self._lock:
            hit = self._items.get((key, entity))
            if hit is not None:
                self._items.move_to_end((key, entity))
                return hit
        footer = _load(fs, path, entity)
        with self._lock:
            self._items[(key, entity)] = footer
            while len(self._items) > self.max_files:
                self._items.popitem(last=False)
        return footer


class RowGroupCache:
    """Decoded row groups of fact files, least recently used evicted beyond ``max_bytes``.

    Fact objects are immutable, so a row group once decoded can be kept for as long as memory
    allows; a new object (a flush, a compaction) has a new key and is read on first use, so the
    cache never hides new data. Listings are never cached here. Thread-safe.
    """

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, int, tuple[str, ...]], pa.Table] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fs: Any, footer: _Footer, key: str, group: int, schema: pa.Schema,
            columns: tuple[str, ...]) -> pa.Table:
        k = (key, group, columns)
        with self._lock:
            hit = self._items.get(k)
            if hit is not None:
                self._items.move_to_end(k)
                self.hits += 1
                return hit
            self.misses += 1
        frag = footer.fragment.subset(row_group_ids=[group])
        table = ds.FileSystemDataset([frag], schema, _PARQUET, fs).to_table(
            columns=list(columns), use_threads=False).combine_chunks()
        size = table.nbytes
        if size > self.max_bytes:
            return table
        with self._lock:
            if k not in self._items:
                self._items[k] = table
                self.bytes += size
            while self.bytes > self.max_bytes and self._items:
                _, old = self._items.popitem(last=False)
                self.bytes -= old.nbytes
        return table


def _cached_rows(
    fs: Any, files: Sequence[FactFile], schema: pa.Schema, cols: list[str], entity: str,
    entities: pa.Array, wanted: np.ndarray, cache: FooterCache, row_groups: RowGroupCache,
    root: str,
) -> pa.Table | None:
    """The rows of ``entities`` through the row-group cache; None if some file has no entity
    statistics (the caller reads those the usual way). Compacted files are sorted by entity, so
    only the slice between the smallest and largest wanted key is kept from each group."""
    read_cols = tuple(cols if entity in cols else [*cols, entity])
    sortable = pa.types.is_integer(schema.field(entity).type)
    pieces = []
    for f in files:
        footer = cache.get(fs, f"{root}/{f.key}", f.key, entity)
        if footer.mins is None or footer.maxs is None:
            return None
        lo = np.searchsorted(wanted, footer.mins, "left")
        hi = np.searchsorted(wanted, footer.maxs, "right")
        for g in np.flatnonzero(hi > lo).tolist():
            t = row_groups.get(fs, footer, f.key, g, schema, read_cols)
            if sortable and f.kind == "compacted" and t.num_rows:
                ent = t.column(entity).chunk(0).to_numpy(zero_copy_only=False)
                a = int(np.searchsorted(ent, wanted[0], "left"))
                b = int(np.searchsorted(ent, wanted[-1], "right"))
                t = t.slice(a, b - a)
            if t.num_rows:
                pieces.append(t)
    if not pieces:
        return schema.empty_table().select(list(cols))
    table = pa.concat_tables(pieces) if len(pieces) > 1 else pieces[0]
    if len(wanted) > 1 or not sortable:
        table = table.filter(pc.is_in(table.column(entity), value_set=entities))
    else:
        table = table.filter(pc.equal(table.column(entity), pa.scalar(wanted[0], table.column(
            entity).type)))
    return table.select(list(cols))


def _load(fs: Any, path: str, entity: str) -> _Footer:
    frag = _PARQUET.make_fragment(path, filesystem=fs)
    md = frag.metadata  # reads the footer
    j = md.schema.to_arrow_schema().get_field_index(entity)
    if j < 0:
        return _Footer(frag, None, None)
    mins, maxs = [], []
    for i in range(md.num_row_groups):
        st = md.row_group(i).column(j).statistics
        if st is None or not st.has_min_max:
            return _Footer(frag, None, None)
        mins.append(st.min)
        maxs.append(st.max)
    return _Footer(frag, np.array(mins), np.array(maxs))


def read_files(
    store: Store, files: Sequence[FactFile], schema: pa.Schema, *,
    columns: Sequence[str] | None = None, filter: pc.Expression | None = None,
    entity: str | None = None, entities: pa.Array | None = None,
    cache: FooterCache | None = None, row_groups: RowGroupCache | None = None,
) -> pa.Table:
    """Every row of ``files`` in ``schema`` (missing fields null), without deduplication.

    Args:
        columns: the columns to read (default: all).
        filter: a row filter pushed down to the scan.
        entity, entities: only rows whose ``entity`` column is in ``entities`` (row groups
            that cannot hold one are skipped).
        cache: keeps footers across calls.
        row_groups: keeps decoded row groups across calls (used for entity reads without a
            ``filter``).

    Raises:
        FileNotFoundError: a file is gone (deleted after its compaction's grace period).
        StoreUnavailable: the store could not be read.
    """
    cols = list(schema.names if columns is None else columns)
    if not files:
        return schema.empty_table().select(cols)
    fs, root = store.arrow_filesystem()
    try:
        if entities is None or entity is None:
            if cache is None:
                dataset = ds.FileSystemDataset.from_paths(
                    [f"{root}/{f.key}" for f in files], schema=schema, format=_PARQUET,
                    filesystem=fs)
            else:
                ent = entity or schema.names[1]  # the stored schema's entity column
                frags = [cache.get(fs, f"{root}/{f.key}", f.key, ent).fragment for f in files]
                dataset = ds.FileSystemDataset(frags, schema, _PARQUET, fs)
            return dataset.to_table(columns=cols, filter=filter, use_threads=True)
        wanted = np.sort(entities.to_numpy(zero_copy_only=False))
        cache = cache or FooterCache()
        if row_groups is not None and filter is None and len(wanted):
            cached = _cached_rows(fs, files, schema, cols, entity, entities, wanted, cache,
                                  row_groups, root)
            if cached is not None:
                return cached
        frags = []
        for f in files:
            footer = cache.get(fs, f"{root}/{f.key}", f.key, entity)
            if footer.mins is None or footer.maxs is None:
                frags.append(footer.fragment)
                continue
            lo = np.searchsorted(wanted, footer.mins, "left")
            hi = np.searchsorted(wanted, footer.maxs, "right")
            groups = np.flatnonzero(hi > lo)
            if len(groups) == len(footer.mins):
                frags.append(footer.fragment)
            elif len(groups):
                frags.append(footer.fragment.subset(row_group_ids=groups.tolist()))
        if not frags:
            return schema.empty_table().select(cols)
        read_cols = cols if entity in cols else [*cols, entity]
        table = ds.FileSystemDataset(frags, schema, _PARQUET, fs).to_table(
            columns=read_cols, filter=filter, use_threads=True)
        table = table.filter(pc.is_in(table.column(entity), value_set=entities))
        return table.select(cols)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _translate(exc) from exc


def undeclared_columns(
    store: Store, files: Sequence[FactFile], schema: pa.Schema, *,
    cache: FooterCache | None = None,
) -> list[str]:
    """Columns some of ``files`` have that ``schema`` lacks (from their footers)."""
    fs, root = store.arrow_filesystem()
    cache = cache or FooterCache()
    known = set(schema.names)
    extra: set[str] = set()
    try:
        for f in files:
            footer = cache.get(fs, f"{root}/{f.key}", f.key, schema.names[1])
            extra.update(n for n in footer.fragment.physical_schema.names if n not in known)
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _translate(exc) from exc
    return sorted(extra)


def _translate(exc: OSError) -> Exception:
    if "NoSuchKey" in str(exc) or "does not exist" in str(exc) or "Not Found" in str(exc):
        return FileNotFoundError(str(exc))
    return StoreUnavailable(f"store unavailable while reading facts: {exc}")
