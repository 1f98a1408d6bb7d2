"""Deduplication of fact copies (SPEC §3, Duplicates), vectorized.

Copies with the same (entity, ``fact_id``) are one fact. Which copy counts is fixed by one total
order, so the answer never depends on which files a scan happened to read together (before or
after compaction, whatever the order of the files): the first copy under

    (logged_at, canonical JSON of the fields, event_time, ingested_at, producer)

That is the SPEC rule (smallest ``logged_at``, then smallest canonical JSON of the payload), made
total by the columns that do not make a conflict. Copies that differ in ``event_time`` or in the
payload are a *conflict*; copies that differ only in ``producer``/``ingested_at`` (or
``logged_at``) are not.

Duplicates are rare, so the common case is one hash pass over ``fact_id`` (``count_distinct``);
only the rows of ``fact_id`` values seen more than once are sorted, and the canonical JSON is
computed only for rows inside duplicate groups.
"""

from __future__ import annotations

import json
from collections.abc import Collection, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttstore import format_timestamp

_EMPTY = np.zeros(0, dtype=np.int64)
#: Up to this many rows, repeated ids are found with a Python set.
_SMALL = 64


@dataclass(frozen=True)
class DuplicateGroups:
    """Rows of ``table`` that share (entity, fact_id) with another row.

    ``rows`` are row indices, grouped and ordered by (entity, fact_id); ``group[i]`` numbers the
    group of ``rows[i]`` from 0, non-decreasing.
    """

    rows: np.ndarray
    group: np.ndarray
    n_groups: int

    @property
    def empty(self) -> bool:
        return self.n_groups == 0


@dataclass(frozen=True)
class Winners:
    """The copy that counts in each duplicate group."""

    rows: np.ndarray  # one row index per group, in group order
    conflict: np.ndarray | None  # bool per group, when the payload was compared
    tied: np.ndarray  # bool per group: the smallest logged_at is shared by several copies


def find_duplicates(table: pa.Table, entity: str) -> DuplicateGroups:
    """The duplicate groups of ``table`` (which needs ``fact_id`` and the entity column)."""
    n = table.num_rows
    if n < 2:
        return DuplicateGroups(_EMPTY, _EMPTY, 0)
    cand = _repeated_id_rows(table.column("fact_id"))
    if len(cand) == 0:
        return DuplicateGroups(_EMPTY, _EMPTY, 0)
    sub = table.select([entity, "fact_id"]).take(pa.array(cand))
    order = pc.sort_indices(sub, [(entity, "ascending"), ("fact_id", "ascending")]).to_numpy()
    sub = sub.take(pa.array(order))
    e = sub.column(entity).combine_chunks()
    f = sub.column("fact_id").combine_chunks()
    same_prev = np.zeros(len(cand), dtype=bool)
    if len(cand) > 1:
        same = pc.and_(pc.equal(e[1:], e[:-1]), pc.equal(f[1:], f[:-1]))
        same_prev[1:] = same.to_numpy(zero_copy_only=False)
    same_next = np.zeros_like(same_prev)
    same_next[:-1] = same_prev[1:]
    in_group = same_prev | same_next
    group_all = np.cumsum(~same_prev) - 1
    _, group = np.unique(group_all[in_group], return_inverse=True)
    rows = cand[order][in_group].astype(np.int64)
    return DuplicateGroups(rows, group.astype(np.int64), int(group.max(initial=-1)) + 1)


_MIX = np.array([0x9E3779B97F4A7C15, 0xC2B2AE3D27D4EB4F, 0x165667B19E3779F9,
                 0x27D4EB2F165667C5], dtype=np.uint64)
_UUID_RECORD = np.dtype([("w", "<u8", (4,)), ("t", "<u4")])  # 36 bytes: one canonical UUID


def _repeated_id_rows(ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """Rows whose fact_id may occur more than once (a superset; exact equality is checked by
    the caller). Canonical UUIDs (36 bytes each) are hashed to 64 bits with numpy and sorted,
    which is several times faster than a hash table over strings; other ids take one
    ``dictionary_encode`` pass."""
    arr = ids.combine_chunks() if isinstance(ids, pa.ChunkedArray) else ids
    n = len(arr)
    if n <= _SMALL:  # an online lookup's few facts: a set beats the vectorized passes
        py = arr.to_pylist()
        if len(set(py)) == n:
            return _EMPTY
        seen: dict[Any, int] = {}
        for v in py:
            seen[v] = seen.get(v, 0) + 1
        return np.array([i for i, v in enumerate(py) if seen[v] > 1], dtype=np.int64)
    if pa.types.is_string(arr.type) and arr.null_count == 0:
        offsets = np.frombuffer(arr.buffers()[1], dtype=np.int32)[arr.offset:arr.offset + n + 1]
        if offsets[-1] - offsets[0] == 36 * n and bool(np.all(np.diff(offsets) == 36)):
            rec = np.frombuffer(arr.buffers()[2], dtype=_UUID_RECORD, count=n,
                                offset=int(offsets[0]))  # a view, no copy
            h = rec["t"].astype(np.uint64)
            for i in range(4):
                h ^= rec["w"][:, i] * _MIX[i]
            order = np.argsort(h)
            hs = h[order]
            eq = hs[1:] == hs[:-1]
            if not eq.any():
                return _EMPTY
            rep = np.zeros(n, dtype=bool)
            rep[1:] = eq
            rep[:-1] |= eq
            return np.sort(order[rep]).astype(np.int64)
    enc = pc.dictionary_encode(arr)
    codes = enc.indices.to_numpy(zero_copy_only=False)
    counts = np.bincount(codes, minlength=len(enc.dictionary))
    return np.flatnonzero(counts[codes] > 1).astype(np.int64)


def canonical_payloads(
    table: pa.Table, fields: Sequence[str], *, json_fields: Collection[str] = ()
) -> list[str]:
    """``json.dumps(fields, sort_keys=True, separators=(",", ":"))`` per row.

    Timestamps appear as RFC 3339 ``...Z`` strings with 6 fractional digits, ``json`` fields as
    their JSON value, lists as arrays, null as null.
    """
    cols: dict[str, list[Any]] = {}
    for name in fields:
        col = table.column(name)
        if pa.types.is_timestamp(col.type):
            cols[name] = [None if v is None else format_timestamp(v)
                          for v in col.cast(pa.int64()).to_pylist()]
        elif name in json_fields:
            cols[name] = [None if v is None else _json_value(v) for v in col.to_pylist()]
        else:
            cols[name] = col.to_pylist()
    return [
        json.dumps({name: cols[name][i] for name in fields}, sort_keys=True,
                   separators=(",", ":"))
        for i in range(table.num_rows)
    ]


def _json_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # not JSON after all: compare it as the string it is


def choose_winners(
    table: pa.Table, dups: DuplicateGroups, *, fields: Sequence[str] | None,
    json_fields: Collection[str] = (),
) -> Winners:
    """The copy that counts in each group of ``dups``.

    With ``fields=None`` the payload is not compared: the winner is exact only for groups that
    are not ``tied`` (a unique smallest ``logged_at``); ``conflict`` is None.
    """
    sub = table.take(pa.array(dups.rows))
    keys: dict[str, pa.Array] = {
        "g": pa.array(dups.group),
        "logged": sub.column("logged_at").cast(pa.int64()).combine_chunks(),
    }
    canon = None
    if fields is not None:
        canon = pa.array(canonical_payloads(sub, fields, json_fields=json_fields), pa.string())
        keys["canon"] = canon
    keys["event"] = sub.column("event_time").cast(pa.int64()).combine_chunks()
    if "ingested_at" in sub.column_names:
        keys["ingested"] = sub.column("ingested_at").cast(pa.int64()).combine_chunks()
    if "producer" in sub.column_names:
        keys["producer_set"], keys["producer"] = nulls_first(sub.column("producer"))
    kt = pa.table(keys)
    order = pc.sort_indices(kt, [(k, "ascending") for k in keys]).to_numpy()
    g = dups.group[order]
    first = np.ones(len(g), dtype=bool)
    first[1:] = g[1:] != g[:-1]
    winners = dups.rows[order][first]

    logged = keys["logged"].to_numpy(zero_copy_only=False)[order]
    second = np.zeros(len(g), dtype=bool)
    second[1:] = first[:-1] & ~first[1:]
    tied = np.zeros(dups.n_groups, dtype=bool)
    idx = np.flatnonzero(second)
    tied[g[idx]] = logged[idx] == logged[idx - 1]

    conflict = None
    if canon is not None:
        head = np.maximum.accumulate(np.where(first, np.arange(len(g)), 0))
        event = keys["event"].to_numpy(zero_copy_only=False)[order]
        canon_s = np.asarray(canon.to_pylist(), dtype=object)[order]
        differs = (event != event[head]) | (canon_s != canon_s[head])
        conflict = np.zeros(dups.n_groups, dtype=bool)
        conflict[g[differs]] = True
    return Winners(winners.astype(np.int64), conflict, tied)


def nulls_first(col: pa.Array | pa.ChunkedArray) -> tuple[pa.Array, pa.Array]:
    """Two sort keys that order a nullable string column with nulls first, on any pyarrow."""
    col = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    return pc.cast(pc.is_valid(col), pa.int8()), pc.fill_null(col, "")


@dataclass(frozen=True)
class DedupResult:
    """What :func:`dedup_table` found."""

    table: pa.Table  # one row per fact, in input order
    copies: int  # rows in
    duplicates_removed: int
    conflict_entities: pa.Array  # the (entity, fact_id) of each conflicting fact
    conflict_fact_ids: pa.Array


def dedup_table(
    table: pa.Table, *, entity: str, fields: Sequence[str], json_fields: Collection[str] = ()
) -> DedupResult:
    """Keep the counting copy of every fact in ``table`` (which has every stored column)."""
    dups = find_duplicates(table, entity)
    if dups.empty:
        empty = table.schema.field(entity).type
        return DedupResult(table, table.num_rows, 0, pa.array([], empty),
                           pa.array([], pa.string()))
    w = choose_winners(table, dups, fields=fields, json_fields=json_fields)
    keep = np.ones(table.num_rows, dtype=bool)
    keep[dups.rows] = False
    keep[w.rows] = True
    assert w.conflict is not None
    conflict_rows = pa.array(np.sort(w.rows[w.conflict]))
    return DedupResult(
        table.filter(pa.array(keep)),
        table.num_rows,
        int(table.num_rows - keep.sum()),
        table.column(entity).take(conflict_rows).combine_chunks(),
        table.column("fact_id").take(conflict_rows).combine_chunks(),
    )
