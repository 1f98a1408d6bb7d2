"""The fact kernels for exactly one query row: the online lookup's path.

:func:`row_feature_columns` answers what :func:`~timetravel_api._kernels.fact_feature_columns`
answers, for one (entity, ``at``), with a handful of numpy calls per feature on that entity's
facts instead of the batch machinery (entity blocks, position keys, segment reductions over
every row), whose fixed cost is what a single lookup would pay. The two are the same function:
the rules are SPEC §3/§4 as the module docstring of ``_kernels`` states them, and every
reduction goes through the same primitive (``segment_reduce`` for float sums, the same order
keys for min/max), so values agree bit for bit; ``tests/test_kernel_row.py`` checks it against
the batch kernel and the brute-force reference on random data.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._features import FeatureSpec
from ._kernel_fields import _EXACT_INT_LIMIT
from ._segments import float_from_order_keys, float_order_keys, segment_reduce

#: ``Visible`` ranges reach back to the start of history from this long on (``_kernels``).
_UNBOUNDED_US = 1 << 62
_OK = np.array(["ok"], dtype="<U7")
_MISSING = np.array(["missing"], dtype="<U7")
_ONE = np.zeros(1, dtype=np.int64)


def row_feature_columns(
    facts: pa.Table, specs: Sequence[FeatureSpec], entity: Any, at_us: int, *,
    as_known: bool, lookback_us: int | None, entity_col: str, ev: np.ndarray,
    logged: np.ndarray, provenance: bool,
) -> dict[str, Any]:
    """One query row's built-in fact features, as ``FeatureColumn``-shaped tuples
    ``(values, status, fact_index)`` (see ``_kernels.FeatureColumn``): with ``provenance``,
    ``first``, ``last``, ``T.F`` and ``time_since_last`` carry the fact's row (-1 for none),
    every other feature None, as in the batch kernel.

    Args:
        facts: as for ``fact_feature_columns`` (sorted; one entity's block is used).
        entity: the query's key (a Python value of the facts' key type).
        at_us: the query's time.
        ev, logged: ``event_time`` and ``logged_at`` of every fact, int64 µs.
    """
    lo_e, hi_e = _entity_block(facts.column(entity_col), entity, ev, entity_col)
    block_ev = ev[lo_e:hi_e]
    t = int(at_us)
    hi = lo_e + int(block_ev.searchsorted(t, "right"))
    out: dict[str, Any] = {}
    visible: dict[int | None, np.ndarray] = {}  # span -> visible fact positions, in order

    def positions(span: int | None) -> np.ndarray:
        key = None if span is None or span >= _UNBOUNDED_US else span
        hit = visible.get(key)
        if hit is None:
            lo = lo_e if key is None else lo_e + int(block_ev.searchsorted(t - key, "right"))
            hit = np.arange(lo, max(lo, hi), dtype=np.int64)
            if as_known and len(hit):
                hit = hit[logged[lo:hi] <= t]
            visible[key] = hit
        return hit

    for s in specs:
        span = s.window_us if s.window_us is not None else lookback_us
        pos = positions(span)
        if s.kind == "fact_count":
            out[s.name] = _count(len(pos))
        elif s.kind == "time_since_last":
            if len(pos):
                p = int(pos[-1])
                secs = np.array([t - int(ev[p])], dtype=np.int64).astype(np.float64) / 1e6
                out[s.name] = _value(secs, pa.float64(), p, provenance)
            else:
                out[s.name] = _none(pa.float64(), provenance)
        else:
            out[s.name] = _field_feature(facts, s, pos, t, provenance)
    return out


def _entity_block(
    col: pa.ChunkedArray | pa.Array, entity: Any, ev: np.ndarray, entity_col: str
) -> tuple[int, int]:
    """The rows of ``entity``'s facts (one block, in time order, as the batch kernel also
    requires; blocks need not be in key order).

    Raises:
        ValueError: the entity's facts are not one block in event_time order.
    """
    arr = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if pa.types.is_integer(arr.type):
        hits = np.flatnonzero(arr.to_numpy() == entity)
    else:
        hits = np.flatnonzero(pc.equal(arr, pa.scalar(entity, arr.type)).to_numpy(
            zero_copy_only=False))
    if not len(hits):
        return 0, 0
    lo, hi = int(hits[0]), int(hits[-1]) + 1
    if hi - lo != len(hits):
        raise ValueError(f"facts are not sorted by {entity_col}")
    block = ev[lo:hi]
    if len(block) > 1 and bool((block[1:] < block[:-1]).any()):
        raise ValueError("facts are not sorted by (entity, event_time)")
    return lo, hi


def _field_feature(
    facts: pa.Table, s: FeatureSpec, pos: np.ndarray, t: int, provenance: bool
) -> tuple[pa.Array, np.ndarray, np.ndarray | None]:
    assert s.field is not None and s.agg is not None and s.output_type is not None
    col = facts.column(s.field)
    column = col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col
    if column.null_count and len(pos):
        valid = column.is_valid().to_numpy(zero_copy_only=False)
        pos = pos[valid[pos]]
    agg, n = s.agg, len(pos)
    if agg in ("first", "last"):
        if not n:
            return _none(s.output_type, provenance, like=column)
        p = int(pos[0] if agg == "first" else pos[-1])
        return _take(column, p), _OK, np.array([p]) if provenance else None
    if agg == "count":
        return _count(n)
    if agg == "distinct_count":
        return _count(_distinct(column, pos))
    if not n:
        strings = pa.types.is_string(column.type) or pa.types.is_large_string(column.type)
        return _none(s.output_type, False, like=column if strings else None)
    if agg in ("sum", "mean"):
        with np.errstate(all="ignore"):  # inf - inf is NaN, a value (as in the batch kernel)
            total = _sum(_numpy(column)[pos])
            if agg == "mean":
                total = total / np.array([n], dtype=np.int64)
        return _value(total, pa.float64(), None, False)
    # min / max
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        py = column.take(pa.array(pos)).to_pylist()  # code point order: Arrow's byte order
        best = min(py) if agg == "min" else max(py)
        return _take(column, int(pos[py.index(best)])), _OK, None  # its first fact
    v = _numpy(column)[pos]
    if v.dtype == np.float64:
        keys = float_order_keys(v)
        k = keys.min() if agg == "min" else keys.max()
        res = float_from_order_keys(np.array([k], dtype=np.int64))
    else:
        ik = v.astype(np.int64)
        res = np.array([ik.min() if agg == "min" else ik.max()], dtype=np.int64)
        if v.dtype == np.bool_:
            res = res.astype(bool)
    return _value(res, s.output_type, None, False)


def _numpy(column: pa.Array) -> np.ndarray:
    """The column as numpy (timestamps as int64 µs); null slots hold anything, callers index
    only valid positions."""
    if pa.types.is_timestamp(column.type):
        column = column.cast(pa.int64())
    if column.null_count:  # keep the dtype (to_numpy would make ints float, bools object)
        column = pc.fill_null(column, pa.scalar(False if pa.types.is_boolean(column.type)
                                                else 0, column.type))
    return np.asarray(column.to_numpy(zero_copy_only=False))


def _sum(v: np.ndarray) -> np.ndarray:
    """As ``FieldData.sums``: floats through ``segment_reduce(np.add)`` in fact order; int64
    and bool exactly, rounded once to float64."""
    if v.dtype == np.float64:
        out: np.ndarray = segment_reduce(np.add, v, _ONE, np.array([len(v)]), empty=0.0)
        return out
    iv = v.astype(np.int64)
    if float(np.abs(iv.astype(np.float64)).sum()) < _EXACT_INT_LIMIT:
        return np.array([int(iv.sum())], dtype=np.int64).astype(np.float64)
    return np.array([sum(iv.tolist())], dtype=object).astype(np.float64)


def _distinct(column: pa.Array, pos: np.ndarray) -> int:
    """Distinct values at ``pos`` under ``==``: ``-0.0`` is ``0.0``, every NaN one value."""
    if not len(pos):
        return 0
    if pa.types.is_string(column.type) or pa.types.is_large_string(column.type):
        return len(set(column.take(pa.array(pos)).to_pylist()))
    v = _numpy(column)[pos]
    if v.dtype == np.float64:
        with np.errstate(all="ignore"):
            v = np.where(np.isnan(v), np.nan, v + 0.0).view(np.int64)
    return len(np.unique(v.astype(np.int64)))


_VALID = np.zeros(1, dtype=bool)
_NULL = np.ones(1, dtype=bool)


def _take(column: pa.Array, p: int) -> pa.Array:
    return column.slice(p, 1)


def _count(n: int) -> tuple[pa.Array, np.ndarray, None]:
    return pa.array(np.array([n], dtype=np.int64), pa.int64()), _OK, None


def _value(
    vals: np.ndarray, out_type: pa.DataType, fact: int | None, provenance: bool
) -> tuple[pa.Array, np.ndarray, np.ndarray | None]:
    if pa.types.is_timestamp(out_type):
        arr = pa.array(vals.astype(np.int64), mask=_VALID).cast(out_type)
    else:
        arr = pa.array(vals, mask=_VALID, type=out_type)
    return arr, _OK, (np.array([fact if fact is not None else -1]) if provenance else None)


def _none(
    out_type: pa.DataType, provenance: bool, *, like: pa.Array | None = None
) -> tuple[pa.Array, np.ndarray, np.ndarray | None]:
    """No value: null (over a zero, as the batch kernel leaves it), status ``missing``."""
    if like is not None:  # first/last: a null taken from the column, as the batch kernel does
        arr = like.take(pa.array([0], pa.int64(), mask=_NULL))
    elif pa.types.is_timestamp(out_type):
        arr = pa.array(np.zeros(1, dtype=np.int64), mask=_NULL).cast(out_type)
    else:
        dtype = np.float64 if pa.types.is_floating(out_type) else (
            np.bool_ if pa.types.is_boolean(out_type) else np.int64)
        arr = pa.array(np.zeros(1, dtype=dtype), mask=_NULL, type=out_type)
    return arr, _MISSING, (np.array([-1]) if provenance else None)
