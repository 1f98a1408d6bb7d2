"""The as-of fact kernels: SPEC §3/§4 built-in fact features of one fact type, vectorized.

:func:`fact_feature_columns` is a pure function from Arrow to Arrow: facts of one fact type (the
stored schema, deduplicated and sorted by (entity, event_time, logged_at, fact_id), as
``factlog.FactReader.scan`` returns them) plus query rows (entity, ``at``) in, one value and one
status per feature and query row out. It holds no state and touches no store, so the same call
runs locally, per entity-hash partition in a process pool, or inside Spark's ``mapInArrow``.

How it works (no Python loop per fact or per query row):

1. *Entity blocks.* The facts of one entity are one contiguous block. Query entities are mapped to
   blocks with a hash lookup (``pc.index_in``; exact for int64 keys above 2^53 and for strings).
   Unknown entities get the empty-window values.
2. *Positions.* Each fact gets an int64 key ``block * S + rel(event_time)`` that is sorted in fact
   order (``rel`` is the offset from the smallest event_time, or, when that would overflow, the
   rank among the distinct event_times). ``np.searchsorted`` on these keys gives, for every query
   row, the end of its visible range (``event_time <= t``) and the start of each window
   (``event_time <= t - W``). Query rows are processed sorted by (block, t), so every range
   boundary is non-decreasing, then scattered back into request order.
3. *Field aggregations* look only at facts whose field is not null: the non-null values are
   compacted, and a prefix *count* of non-null flags (exact integers) maps fact positions to
   compacted positions. Windows reduce with ``ufunc.reduceat`` over exactly the values inside
   them, so a window's value never depends on facts outside it (no running totals).
4. *as_known.* The event-mode ranges are computed first. A range max of ``logged_at`` over each
   window finds the few rows whose window holds a fact logged after ``t``; only those rows are
   recomputed exactly, by expanding their (row, fact) pairs, dropping the invisible ones and
   reducing again, in fact order. ``first``/``last``/``time_since_last`` check the one
   candidate fact per row and search further only where it was logged after ``t``.

Value conventions (the brute-force reference in ``tests/reference.py`` follows them):

- ``sum`` of floats is ``np.add.reduceat`` over the window's non-null values in fact order (the
  first value plus numpy's pairwise sum of the rest); ``sum`` of int64/bool is the exact integer
  sum, rounded once to float64; ``mean`` is that sum divided by the count.
- ``min``/``max`` of floats use the total order ``-inf < ... < -0.0 < 0.0 < ... < inf < NaN``.
- ``distinct_count`` counts values equal under ``==``, with every NaN one value.
- ``time_since_last`` is ``float64(t - event_time) / 1e6``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttstore import InvalidInput, timestamps_us

from ._errors import EntityTypeMismatch
from ._features import FACT_KINDS, FeatureSpec
from ._kernel_fields import FieldData, Visible, reduce_visible, visible_rows
from ._kernel_row import row_feature_columns
from ._segments import last_visible

Knowledge = Literal["as_known", "event"]
KNOWLEDGE_MODES: tuple[str, ...] = ("as_known", "event")

#: numpy dtype of the status arrays (``"ok"`` / ``"missing"``).
STATUS_DTYPE = np.dtype("<U7")
#: Windows/lookbacks at least this long reach back to the start of every entity's history.
UNBOUNDED_US = 1 << 62
#: Above this ``blocks * event_time span`` the position keys use event_time ranks instead.
OFFSET_KEY_LIMIT = 1 << 62


@dataclass(frozen=True)
class FeatureColumn:
    """One feature's answers for all query rows, in query order.

    Attributes:
        values: the values, of the feature's output type (null where there is none).
        status: ``"ok"`` or ``"missing"`` per row (counts are always ``"ok"``).
        fact_index: with provenance, the row of ``facts`` that produced each value (``first``,
            ``last``, ``T.F`` and ``time_since_last``), -1 where none did; otherwise None.
    """

    values: pa.Array
    status: np.ndarray
    fact_index: np.ndarray | None = None


def fact_features(
    facts: pa.Table,
    specs: Sequence[FeatureSpec],
    entities: pa.Array | pa.ChunkedArray,
    at_us: np.ndarray,
    *,
    knowledge: Knowledge,
    lookback_us: int | None,
    entity_col: str,
) -> dict[str, tuple[pa.Array, np.ndarray]]:
    """Built-in fact features of one fact type, as-of each query row.

    The same as :func:`fact_feature_columns` without provenance, as ``name → (values, status)``.
    """
    cols = fact_feature_columns(
        facts, specs, entities, at_us, knowledge=knowledge, lookback_us=lookback_us,
        entity_col=entity_col,
    )
    return {name: (c.values, c.status) for name, c in cols.items()}


def fact_feature_columns(
    facts: pa.Table,
    specs: Sequence[FeatureSpec],
    entities: pa.Array | pa.ChunkedArray,
    at_us: np.ndarray,
    *,
    knowledge: Knowledge,
    lookback_us: int | None,
    entity_col: str,
    provenance: bool = False,
) -> dict[str, FeatureColumn]:
    """Built-in fact features (``T.F``, ``T.F.AGG.W``, ``T.count.W``, ``T.time_since_last``)
    of one fact type, as-of each query row (SPEC §3, §4).

    Args:
        facts: facts of one fact type in the stored schema (at least ``entity_col``,
            ``event_time``, ``logged_at`` and the fields the specs name), deduplicated and
            sorted by (entity, event_time, logged_at, fact_id). Facts outside the needed time
            range may be left out; facts inside it must not be.
        specs: parsed features of this fact type (kinds ``fact_field``, ``fact_count``,
            ``time_since_last``).
        entities: the query rows' entity keys, of the facts' entity key type.
        at_us: the query rows' times, int64 microseconds since the epoch (UTC).
        knowledge: ``"as_known"`` (a fact is visible only once ``logged_at <= t``) or
            ``"event"``.
        lookback_us: the fact type's lookback, for the unwindowed forms; None is unbounded.
        entity_col: the entity key column of ``facts``.
        provenance: also return, per value of ``first``/``last``/``time_since_last``, the row
            of ``facts`` it came from.

    Returns:
        Feature name → :class:`FeatureColumn`, each of length ``len(at_us)``, in query order.

    Raises:
        InvalidInput: an unknown knowledge mode, mismatched lengths, or ``at`` out of range.
        EntityTypeMismatch: the query entity keys are not of the facts' key type.
        ValueError: ``specs`` are not fact features, or ``facts`` is not sorted as required.
    """
    if knowledge not in KNOWLEDGE_MODES:
        raise InvalidInput(
            f"knowledge must be one of {', '.join(KNOWLEDGE_MODES)}, not {knowledge!r}",
            field="knowledge",
        )
    bad = [s.name for s in specs if s.kind not in FACT_KINDS]
    if bad:
        raise ValueError(f"not built-in fact features: {bad}")
    if len(at_us) == 1 and facts.num_rows:
        at = _as_int64(at_us)
        query_ent = _query_entities(entities, facts.schema.field(entity_col), entity_col)
        if len(query_ent) == 1 and abs(int(at[0])) < UNBOUNDED_US:
            cols = row_feature_columns(
                facts, specs, query_ent[0].as_py(), int(at[0]), as_known=knowledge == "as_known",
                lookback_us=lookback_us, entity_col=entity_col,
                ev=_as_int64(facts.column("event_time")),
                logged=_as_int64(facts.column("logged_at")), provenance=provenance)
            return {name: FeatureColumn(*c) for name, c in cols.items()}
    kernel = _Kernel(facts, entities, at_us, as_known=knowledge == "as_known",
                     lookback_us=lookback_us, entity_col=entity_col)
    return {s.name: kernel.column(s, provenance=provenance) for s in specs}


class _Kernel:
    """The query rows located in the facts; computes one feature at a time, with caches shared
    between the features of one call."""

    def __init__(
        self, facts: pa.Table, entities: pa.Array | pa.ChunkedArray, at_us: np.ndarray, *,
        as_known: bool, lookback_us: int | None, entity_col: str,
    ) -> None:
        at = _as_int64(at_us)
        query_ent = _query_entities(entities, facts.schema.field(entity_col), entity_col)
        if len(query_ent) != len(at):
            raise InvalidInput(
                f"{len(query_ent)} entities but {len(at)} times", field="at"
            )
        if len(at) and int(np.abs(at).max()) >= UNBOUNDED_US:
            raise InvalidInput("at is out of range", field="at")
        self.facts = facts
        self.m = len(at)
        self.as_known = as_known
        self.lookback_us = lookback_us
        n = facts.num_rows
        self.n = n
        self.ev = _as_int64(facts.column("event_time"))
        self.logged = _as_int64(facts.column("logged_at"))
        self._lo: dict[int | None, np.ndarray] = {}
        self._fields: dict[str, FieldData] = {}
        self._visible: dict[tuple[str | None, int | None], Visible] = {}
        if n == 0:
            self._no_queries()
            return
        ent = facts.column(entity_col).combine_chunks()
        starts = _block_starts(ent)
        nb = len(starts)
        qb = _block_of_queries(ent, starts, query_ent, entity_col)
        block_of_fact = np.repeat(np.arange(nb, dtype=np.int64), np.diff(np.append(starts, n)))
        self.block_lo = starts
        self.loc = _Locator(block_of_fact, self.ev, nb)
        known = np.flatnonzero(qb >= 0)
        qkeys = self.loc.key(qb[known].astype(np.int64), at[known])
        order = np.argsort(qkeys, kind="stable")
        self.rows = known[order]
        self.t = at[self.rows]
        self.block = qb[self.rows].astype(np.int64)
        self.hi = np.searchsorted(self.loc.keys, qkeys[order], side="right")

    def _no_queries(self) -> None:
        self.rows = np.zeros(0, dtype=np.int64)
        self.t = np.zeros(0, dtype=np.int64)
        self.block = np.zeros(0, dtype=np.int64)
        self.hi = np.zeros(0, dtype=np.int64)
        self.block_lo = np.zeros(0, dtype=np.int64)

    # -- ranges ----------------------------------------------------------------------------------
    def lo(self, span_us: int | None) -> np.ndarray:
        """Per sorted query row, the first fact position with ``event_time > t - span``."""
        key = None if span_us is None or span_us >= UNBOUNDED_US else span_us
        hit = self._lo.get(key)
        if hit is None:
            if key is None or not len(self.t):
                hit = self.block_lo[self.block]
            else:
                hit = self.loc.pos(self.block, self.t - key)
            self._lo[key] = hit
        return hit

    def field(self, name: str) -> FieldData:
        fd = self._fields.get(name)
        if fd is None:
            fd = FieldData(self.facts.column(name), self.logged)
            self._fields[name] = fd
        return fd

    def visible(self, field: str | None, span_us: int | None) -> Visible:
        """The rows' windows ``(t - span, t]`` over the facts (``field`` None) or over the
        non-null values of ``field``, with the as_known corrections."""
        ck = (field, span_us)
        vis = self._visible.get(ck)
        if vis is None:
            lo, hi = self.lo(span_us), self.hi
            if field is not None:
                fd = self.field(field)
                lo, hi, logged = fd.compact(lo), fd.compact(hi), fd.logged
            else:
                logged = self.logged
            vis = visible_rows(lo, hi, logged, self.t if self.as_known else None)
            self._visible[ck] = vis
        return vis

    def span(self, spec: FeatureSpec) -> int | None:
        return spec.window_us if spec.window_us is not None else self.lookback_us

    # -- features --------------------------------------------------------------------------------
    def column(self, spec: FeatureSpec, *, provenance: bool) -> FeatureColumn:
        span = self.span(spec)
        if spec.kind == "fact_count":
            vis = self.visible(None, span)
            return self._numeric(spec, vis.counts(), None, pa.int64())
        if spec.kind == "time_since_last":
            idx = self._last(self.lo(span), self.hi, self.logged, first=False)
            has = idx >= 0
            secs = (self.t - self.ev[np.where(has, idx, 0)]).astype(np.float64) / 1e6
            return self._numeric(spec, secs, has, pa.float64(), fact_index=idx,
                                 provenance=provenance)
        assert spec.field is not None and spec.agg is not None and spec.field_type is not None
        fd = self.field(spec.field)
        agg = spec.agg
        if agg in ("first", "last"):
            p = self._last(fd.compact(self.lo(span)), fd.compact(self.hi), fd.logged,
                           first=agg == "first")
            idx = np.where(p >= 0, fd.index[np.maximum(p, 0)] if len(fd.index) else 0, -1)
            return self._take(spec, fd.column, idx, provenance=provenance)
        vis = self.visible(spec.field, span)
        if agg == "count":
            return self._numeric(spec, vis.counts(), None, pa.int64())
        if agg == "distinct_count":
            dc = fd.distinct_counts(vis, self.t if self.as_known else None)
            return self._numeric(spec, dc, None, pa.int64())
        if agg in ("sum", "mean"):
            total, cnt = fd.sums(vis)
            has = cnt > 0
            with np.errstate(all="ignore"):
                vals = total if agg == "sum" else total / np.where(has, cnt, 1)
            return self._numeric(spec, vals, has, pa.float64())
        # min / max
        ufunc = np.minimum if agg == "min" else np.maximum
        keys = fd.order_keys()
        best, cnt = reduce_visible(vis, keys, ufunc, empty=0)
        has = cnt > 0
        if spec.field_type == "string":
            idx = np.where(has, fd.representative(best), -1)
            return self._take(spec, fd.column, idx, provenance=False)
        return self._numeric(spec, fd.from_order_keys(best), has, spec.output_type)

    def _last(
        self, lo: np.ndarray, hi: np.ndarray, logged: np.ndarray, *, first: bool
    ) -> np.ndarray:
        if self.as_known:
            return last_visible(logged, lo, hi, self.t, first=first)
        return np.where(hi > lo, lo if first else hi - 1, -1)

    # -- output ----------------------------------------------------------------------------------
    def _numeric(
        self, spec: FeatureSpec, vals: np.ndarray, has: np.ndarray | None,
        out_type: pa.DataType | None, *, fact_index: np.ndarray | None = None,
        provenance: bool = False,
    ) -> FeatureColumn:
        assert out_type is not None
        full = np.zeros(self.m, dtype=vals.dtype)
        full[self.rows] = vals
        if has is None:  # counts: 0 for unknown entities, always ok
            arr = pa.array(full, type=pa.int64())
            return FeatureColumn(arr, np.full(self.m, "ok", dtype=STATUS_DTYPE))
        valid = np.zeros(self.m, dtype=bool)
        valid[self.rows] = has
        if pa.types.is_timestamp(out_type):
            arr = pa.array(full.astype(np.int64), mask=~valid).cast(out_type)
        else:
            arr = pa.array(full, mask=~valid, type=out_type)
        return FeatureColumn(arr, np.where(valid, "ok", "missing").astype(STATUS_DTYPE),
                             self._scatter_index(fact_index) if provenance else None)

    def _take(
        self, spec: FeatureSpec, column: pa.Array, idx: np.ndarray, *, provenance: bool
    ) -> FeatureColumn:
        full = self._scatter_index(idx)
        missing = full < 0
        vals = column.take(pa.array(full, mask=missing))
        return FeatureColumn(vals, np.where(missing, "missing", "ok").astype(STATUS_DTYPE),
                             full if provenance else None)

    def _scatter_index(self, idx: np.ndarray | None) -> np.ndarray:
        full = np.full(self.m, -1, dtype=np.int64)
        if idx is not None:
            full[self.rows] = idx
        return full


class _Locator:
    """Sortable int64 keys for (entity block, time): ``block * span + rel(time)``.

    ``rel`` is the offset from the smallest event_time when every key fits in int64, else the
    rank among the distinct event_times (exact either way). ``pos(block, x)`` is the fact
    position after the last fact of ``block`` with ``event_time <= x``.
    """

    def __init__(self, block_of_fact: np.ndarray, ev: np.ndarray, nb: int) -> None:
        self._min = int(ev.min())
        self._max = int(ev.max())
        span = self._max - self._min + 2
        self._uniq: np.ndarray | None = None
        if nb * span < OFFSET_KEY_LIMIT:
            rel = ev - (self._min - 1)
        else:
            self._uniq = np.unique(ev)
            span = len(self._uniq) + 1
            rel = np.searchsorted(self._uniq, ev, side="left") + 1
        self.span = span
        self.keys = block_of_fact * span + rel
        if len(ev) > 1 and bool((self.keys[1:] < self.keys[:-1]).any()):
            raise ValueError("facts are not sorted by (entity, event_time)")

    def rel(self, x: np.ndarray) -> np.ndarray:
        out: np.ndarray
        if self._uniq is not None:
            out = np.searchsorted(self._uniq, x, side="right").astype(np.int64)
        else:
            out = np.clip(x, self._min - 1, self._max) - (self._min - 1)
        return out

    def key(self, block: np.ndarray, x: np.ndarray) -> np.ndarray:
        out: np.ndarray = block * self.span + self.rel(x)
        return out

    def pos(self, block: np.ndarray, x: np.ndarray) -> np.ndarray:
        return np.searchsorted(self.keys, self.key(block, x), side="right")


def _block_starts(ent: pa.Array) -> np.ndarray:
    n = len(ent)
    if pa.types.is_integer(ent.type):
        e = ent.to_numpy()
        change = e[1:] != e[:-1]
    else:
        change = pc.not_equal(ent.slice(1), ent.slice(0, n - 1)).to_numpy(zero_copy_only=False)
    return np.concatenate([[0], np.flatnonzero(change) + 1]).astype(np.int64)


def _block_of_queries(
    ent: pa.Array, starts: np.ndarray, query_ent: pa.Array, entity_col: str
) -> np.ndarray:
    """Per query row, the block of its entity's facts, or -1 (exact for int64 keys above
    2^53 and for strings). Blocks in key order (what the reader returns) take a binary
    search; any other order a hash lookup.

    Raises:
        ValueError: the facts are not sorted by entity (a key has two blocks).
    """
    if pa.types.is_integer(ent.type):
        keys = ent.to_numpy()[starts]
        if len(keys) < 2 or bool(np.all(keys[1:] > keys[:-1])):  # blocks in key order
            q = np.asarray(query_ent.to_numpy(zero_copy_only=False), dtype=np.int64)
            pos = np.minimum(np.searchsorted(keys, q), len(keys) - 1)
            out: np.ndarray = np.where(keys[pos] == q, pos, -1).astype(np.int64)
            return out
    skeys = ent.take(pa.array(starts))
    if len(pc.unique(skeys)) != len(starts):
        raise ValueError(f"facts are not sorted by {entity_col}")
    return np.asarray(pc.fill_null(pc.index_in(query_ent, value_set=skeys), -1).to_numpy(),
                      dtype=np.int64)


def _as_int64(values: object) -> np.ndarray:
    if isinstance(values, pa.ChunkedArray):
        values = values.combine_chunks()
    if not isinstance(values, pa.Array):
        return np.asarray(values, dtype=np.int64)
    arr: pa.Array = values
    if arr.null_count:
        raise InvalidInput("times must not be null", field="at")
    if pa.types.is_timestamp(arr.type) or arr.type == pa.int64():
        return timestamps_us(arr)
    return np.asarray(arr.to_numpy(zero_copy_only=False), dtype=np.int64)


def _query_entities(
    entities: pa.Array | pa.ChunkedArray, field: pa.Field, entity_col: str
) -> pa.Array:
    arr = entities.combine_chunks() if isinstance(entities, pa.ChunkedArray) else entities
    want = field.type
    if arr.type == want:
        return arr
    same_kind = (
        (pa.types.is_integer(want) and pa.types.is_integer(arr.type))
        or (_is_string(want) and _is_string(arr.type))
        or pa.types.is_null(arr.type)
    )
    if not same_kind:
        raise EntityTypeMismatch(
            {str(want): [entity_col], str(arr.type): ["query entities"]},
            message=f"entity keys of {entity_col!r} are {want}, the query gave {arr.type}",
        )
    try:
        return arr.cast(want)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidInput(f"entity keys do not fit {want}: {exc}", field="entity_id") from exc


def _is_string(t: pa.DataType) -> bool:
    return bool(pa.types.is_string(t) or pa.types.is_large_string(t))
