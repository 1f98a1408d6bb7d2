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
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds

from ttstore import Store, StoreUnavailable

from ._partitions import FactFile

_PARQUET = ds.ParquetFileFormat()
DEFAULT_MAX_CACHED_FILES = 20_000
#: Lists of files whose combined row-group statistics are memoized (a query server asks about
#: the same few ranges of partitions over and over).
_MAX_FILE_INDEXES = 256


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
        self.lock = threading.Lock()
        self.indexes: OrderedDict[tuple[tuple[str, ...], str], _FilesIndex] = OrderedDict()

    def get(self, fs: Any, path: str, key: str, entity: str) -> _Footer:
        with self.lock:
            hit = self._items.get((key, entity))
            if hit is not None:
                self._items.move_to_end((key, entity))
                return hit
        footer = _load(fs, path, entity)
        with self.lock:
            self._items[(key, entity)] = footer
            while len(self._items) > self.max_files:
                self._items.popitem(last=False)
        return footer


@dataclass(frozen=True)
class IndexedGroup:
    """One decoded row group with its rows sorted by entity (file order within a key), and
    where each key's rows start: ``take`` is a binary search and a zero-copy slice.

    Attributes:
        batch: the rows, sorted by entity (a record batch: slicing one is cheaper than a table).
        keys: the distinct entity keys, sorted (int64, or an object array of str).
        starts: ``starts[i]:starts[i + 1]`` are the rows of ``keys[i]``.
        nbytes: what it holds in memory, for the cache budget.
        names: the columns it holds.
    """

    batch: pa.RecordBatch
    keys: np.ndarray
    starts: np.ndarray
    nbytes: int
    names: tuple[str, ...] = ()
    #: column subsets of ``batch`` asked for so far (zero-copy: they share its buffers)
    _views: dict[tuple[str, ...], pa.RecordBatch] = field(
        default_factory=dict, compare=False, repr=False)

    def covers(self, columns: Sequence[str]) -> bool:
        return all(c in self.names for c in columns)

    def view(self, columns: tuple[str, ...]) -> IndexedGroup:
        """The same rows with only ``columns``, in that order (memoized; thread-safe enough:
        a race builds the same view twice)."""
        if columns == self.names:
            return self
        hit = self._views.get(columns)
        if hit is None:
            if len(self._views) >= 16:
                self._views.clear()
            hit = self._views[columns] = self.batch.select(list(columns))
        return IndexedGroup(hit, self.keys, self.starts, 0, columns)

    @classmethod
    def build(cls, table: pa.Table, entity: str) -> IndexedGroup:
        table = table.combine_chunks()
        col = table.column(entity).combine_chunks()
        ent = np.asarray(col.to_numpy(zero_copy_only=False))
        n = len(ent)
        if n > 1 and not bool(np.all(ent[1:] >= ent[:-1])):
            # raw files are in logging order; a stable sort keeps file order within a key
            order = (np.argsort(ent, kind="stable") if ent.dtype != object
                     else np.asarray(pc.sort_indices(col).to_numpy()))
            table, ent = table.take(pa.array(order)).combine_chunks(), ent[order]
        change = np.flatnonzero(ent[1:] != ent[:-1]) + 1 if n > 1 else np.zeros(0, np.int64)
        starts = np.concatenate([[0], change, [n]]).astype(np.int64) if n else np.zeros(1, np.int64)
        keys = ent[starts[:-1]]
        extra = keys.nbytes + starts.nbytes
        if keys.dtype == object:  # the str objects themselves
            extra += sum(len(k) for k in keys.tolist()) + 56 * len(keys)
        batches = table.to_batches()
        batch = batches[0] if batches else pa.RecordBatch.from_pylist([], schema=table.schema)
        return cls(batch, keys, starts, table.nbytes + extra, tuple(table.schema.names))

    def take(self, wanted: np.ndarray) -> pa.RecordBatch | None:
        """The rows of the ``wanted`` keys (sorted), in key order; None when it has none."""
        keys = self.keys
        if len(wanted) == 1:
            i = int(keys.searchsorted(wanted[0]))
            if i < len(keys) and keys[i] == wanted[0]:
                a = int(self.starts[i])
                return self.batch.slice(a, int(self.starts[i + 1]) - a)
            return None
        pos = np.searchsorted(keys, wanted)
        hit = pos < len(keys)
        hit[hit] = keys[pos[hit]] == wanted[hit]
        pos = pos[hit]
        if not len(pos):
            return None
        lo, hi = self.starts[pos], self.starts[pos + 1]
        if len(pos) == 1 or int(hi[-1] - lo[0]) == int((hi - lo).sum()):  # one run of rows
            return self.batch.slice(int(lo[0]), int(hi[-1] - lo[0]))
        lens = hi - lo
        rows = np.repeat(lo - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens) + np.arange(
            int(lens.sum()))
        return self.batch.take(pa.array(rows))


class RowGroupCache:
    """Decoded row groups of fact files, indexed by entity (:class:`IndexedGroup`), least
    recently used evicted beyond ``max_bytes``.

    Fact objects are immutable, so a row group once decoded can be kept for as long as memory
    allows; a new object (a flush, a compaction) has a new key and is read on first use, so the
    cache never hides new data. Listings are never cached here. Thread-safe.
    """

    def __init__(self, *, max_bytes: int) -> None:
        self.max_bytes = max_bytes
        self.bytes = 0
        self.hits = 0
        self.misses = 0
        self._items: OrderedDict[tuple[str, int], IndexedGroup] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, fs: Any, footer: _Footer, key: str, group: int, schema: pa.Schema,
            columns: tuple[str, ...], entity: str) -> IndexedGroup:
        """Row group ``group`` of ``key`` with at least ``columns`` (it may hold more: one
        decoded copy per row group serves every column set; a request for a column it lacks
        reads the group again with both sets and replaces it)."""
        k = (key, group)
        with self._lock:
            hit = self._items.get(k)
            if hit is not None and hit.covers(columns):
                self._items.move_to_end(k)
                self.hits += 1
                return hit
            self.misses += 1
        need = columns if hit is None else tuple(dict.fromkeys((*hit.names, *columns)))
        frag = footer.fragment.subset(row_group_ids=[group])
        table = ds.FileSystemDataset([frag], schema, _PARQUET, fs).to_table(
            columns=list(need), use_threads=False)
        grp = IndexedGroup.build(table, entity)
        if grp.nbytes > self.max_bytes:
            return grp
        with self._lock:
            old = self._items.get(k)
            if old is None or not old.covers(need):
                if old is not None:
                    self.bytes -= old.nbytes
                self._items[k] = grp
                self.bytes += grp.nbytes
            self._items.move_to_end(k)
            while self.bytes > self.max_bytes and self._items:
                _, evicted = self._items.popitem(last=False)
                self.bytes -= evicted.nbytes
        return grp

    def holds(self, key: str, group: int, columns: Sequence[str]) -> bool:
        """Whether row group ``group`` of ``key`` is kept with ``columns`` (not counted as a
        hit or a miss)."""
        with self._lock:
            hit = self._items.get((key, group))
            return hit is not None and hit.covers(columns)


@dataclass(frozen=True)
class _FilesIndex:
    """Entity statistics of every row group of a list of files, in one pair of arrays."""

    footers: tuple[_Footer, ...]
    file_of: np.ndarray  # per row group, its file's position in the list
    group_of: np.ndarray  # per row group, its number in its file
    mins: np.ndarray
    maxs: np.ndarray


def _files_index(fs: Any, files: Sequence[FactFile], entity: str, cache: FooterCache,
                 root: str) -> _FilesIndex | None:
    """The row-group statistics of ``files`` (None if some file has none), memoized per list
    of files."""
    memo_key = (tuple(f.key for f in files), entity)
    hit = cache.indexes.get(memo_key)
    if hit is not None:
        return hit
    footers = []
    for f in files:
        footer = cache.get(fs, f"{root}/{f.key}", f.key, entity)
        if footer.mins is None or footer.maxs is None:
            return None
        footers.append(footer)
    counts = [len(ft.mins) for ft in footers if ft.mins is not None]
    file_of = np.repeat(np.arange(len(footers)), counts)
    group_of = np.concatenate([np.arange(c) for c in counts]) if counts else np.zeros(0, int)
    mins = np.concatenate([ft.mins for ft in footers if ft.mins is not None]) if counts else (
        np.zeros(0))
    maxs = np.concatenate([ft.maxs for ft in footers if ft.maxs is not None]) if counts else (
        np.zeros(0))
    idx = _FilesIndex(tuple(footers), file_of, group_of, mins, maxs)
    with cache.lock:
        cache.indexes[memo_key] = idx
        while len(cache.indexes) > _MAX_FILE_INDEXES:
            cache.indexes.popitem(last=False)
    return idx


def _cached_rows(
    fs: Any, files: Sequence[FactFile], schema: pa.Schema, cols: list[str], entity: str,
    wanted: np.ndarray, cache: FooterCache, row_groups: RowGroupCache, root: str,
) -> pa.Table | None:
    """The rows of the ``wanted`` keys (sorted, distinct) through the row-group cache, in file
    order; None if some file has no entity statistics (the caller reads those the usual way).
    Only the row groups whose [min, max] holds a wanted key are touched, found in one
    vectorized search over every row group of the files."""
    idx = _files_index(fs, files, entity, cache, root)
    if idx is None:
        return None
    read_cols = tuple(cols if entity in cols else [*cols, entity])
    lo = np.searchsorted(wanted, idx.mins, "left")
    hi = np.searchsorted(wanted, idx.maxs, "right")
    pieces = []
    for j in np.flatnonzero(hi > lo).tolist():
        i, g = int(idx.file_of[j]), int(idx.group_of[j])
        grp = row_groups.get(fs, idx.footers[i], files[i].key, g, schema, read_cols, entity)
        # a group may hold more columns than asked for (see RowGroupCache.get)
        b = grp.view(read_cols).take(wanted[lo[j]:hi[j]])
        if b is not None and b.num_rows:
            pieces.append(b)
    if not pieces:
        return schema.empty_table().select(list(cols))
    batch = pa.concat_batches(pieces) if len(pieces) > 1 else pieces[0]
    return pa.Table.from_batches([batch]).select(list(cols))


def warm_row_groups(
    store: Store, files: Sequence[FactFile], schema: pa.Schema, entity: str, *,
    cache: FooterCache, row_groups: RowGroupCache, full_at: int,
    stop: Callable[[], bool] = lambda: False,
) -> int:
    """Decode every row group of ``files`` (every column of ``schema``) into ``row_groups``, in
    order, until it holds ``full_at`` bytes or ``stop()``; files without entity statistics are
    skipped (reads of those never use the cache). Returns how many groups it decoded."""
    fs, root = store.arrow_filesystem()
    columns = tuple(schema.names)
    loaded = 0
    try:
        for f in files:
            footer = cache.get(fs, f"{root}/{f.key}", f.key, entity)
            if footer.mins is None:
                continue
            for g in range(len(footer.mins)):
                if stop() or row_groups.bytes >= full_at:
                    return loaded
                if not row_groups.holds(f.key, g, columns):
                    row_groups.get(fs, footer, f.key, g, schema, columns, entity)
                    loaded += 1
    except FileNotFoundError:
        raise
    except OSError as exc:
        raise _translate(exc) from exc
    return loaded


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
            cached = _cached_rows(fs, files, schema, cols, entity, np.unique(wanted), cache,
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
