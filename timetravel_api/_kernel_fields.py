"""Per-field data and window reductions for the fact kernels (see ``_kernels``).

A field's non-null values are compacted, in fact order; ``FieldData.compact`` maps fact
positions to positions among them with a prefix count of non-null flags (exact integers). A
:class:`Visible` holds, per query row, the window as a range of those positions plus the as_known
corrections: for the few rows whose window holds a value logged after ``t``, the positions that
remain visible.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ._segments import (
    float_from_order_keys,
    float_order_keys,
    iter_expanded,
    segment_reduce,
    segment_starts,
)

_INT64_MIN = np.iinfo(np.int64).min
#: int64 window sums whose sum of magnitudes reaches this are recomputed with Python ints.
_EXACT_INT_LIMIT = float(1 << 62)


@dataclass(frozen=True)
class Visible:
    """Per (sorted) query row, a window ``[lo, hi)`` of positions, and for as_known the rows
    ``aff`` whose window holds entries logged after their ``t``: ``kept`` are the still visible
    positions of those rows, grouped by row in order, ``kept_counts`` how many per row."""

    lo: np.ndarray
    hi: np.ndarray
    aff: np.ndarray
    kept: np.ndarray
    kept_counts: np.ndarray

    def counts(self) -> np.ndarray:
        """Visible entries per row."""
        cnt: np.ndarray = (self.hi - self.lo).astype(np.int64)
        cnt[self.aff] = self.kept_counts
        return cnt

    def subset(self, rows: np.ndarray) -> Visible:
        """The same windows for ``rows`` (sorted indices) only, renumbered 0..len(rows)-1."""
        member = np.isin(self.aff, rows)
        owner = np.repeat(np.arange(len(self.aff)), self.kept_counts)
        return Visible(
            lo=self.lo[rows], hi=self.hi[rows],
            aff=np.searchsorted(rows, self.aff[member]),
            kept=self.kept[member[owner]], kept_counts=self.kept_counts[member],
        )


def visible_rows(
    lo: np.ndarray, hi: np.ndarray, logged: np.ndarray, at: np.ndarray | None
) -> Visible:
    """The windows ``[lo, hi)`` (event-mode ranges over entries with ``logged`` times), with the
    as_known corrections when ``at`` is given (None: event mode, nothing is hidden)."""
    empty = np.zeros(0, dtype=np.int64)
    if at is None or not len(lo):
        return Visible(lo, hi, empty, empty, empty)
    newest = segment_reduce(np.maximum, logged, lo, hi, empty=_INT64_MIN)
    aff = np.flatnonzero(newest > at)
    kept_parts: list[np.ndarray] = []
    counts = np.zeros(len(aff), dtype=np.int64)
    aff_at = at[aff]
    for start, stop, rows, pos in iter_expanded(lo[aff], hi[aff]):
        keep = logged[pos] <= aff_at[start + rows]
        kept_parts.append(pos[keep])
        counts[start:stop] = np.bincount(rows[keep], minlength=stop - start)
    kept = np.concatenate(kept_parts) if kept_parts else empty
    return Visible(lo, hi, aff, kept, counts)


def reduce_visible(
    vis: Visible, values: np.ndarray, ufunc: np.ufunc, *, empty: object
) -> tuple[np.ndarray, np.ndarray]:
    """``ufunc`` over each row's visible values (in order), and how many there were.

    ``values`` is indexed by the positions of ``vis``; rows with no visible value get
    ``empty``.
    """
    with np.errstate(all="ignore"):
        res = segment_reduce(ufunc, values, vis.lo, vis.hi, empty=empty)
        cnt = vis.counts()
        if len(vis.aff):
            starts = segment_starts(vis.kept_counts)
            sub = values[vis.kept]
            res[vis.aff] = segment_reduce(ufunc, sub, starts, starts + vis.kept_counts,
                                          empty=empty)
    return res, cnt


class FieldData:
    """One field's non-null values in fact order, and what the aggregations derive from them.

    Args:
        column: the field's column over all facts.
        logged: ``logged_at`` of every fact (int64 µs).
    """

    def __init__(self, column: pa.Array | pa.ChunkedArray, logged: np.ndarray) -> None:
        col = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
        self.column = col
        n = len(col)
        self._prefix: np.ndarray | None = None
        if col.null_count == 0:
            self.index = np.arange(n, dtype=np.int64)
            self.values = col
        else:
            valid = col.is_valid().to_numpy(zero_copy_only=False)
            self.index = np.flatnonzero(valid).astype(np.int64)
            prefix = np.zeros(n + 1, dtype=np.int64)
            np.cumsum(valid, out=prefix[1:])
            self._prefix = prefix
            self.values = pc.drop_null(col)
        self.logged = logged if self._prefix is None else logged[self.index]
        self._order_keys: np.ndarray | None = None
        self._representative: np.ndarray | None = None
        self._distinct: tuple[np.ndarray, int] | None = None

    def compact(self, pos: np.ndarray) -> np.ndarray:
        """Fact positions → positions among the non-null values (the count of non-null values
        before each fact position)."""
        return pos if self._prefix is None else self._prefix[pos]

    def _numpy(self) -> np.ndarray:
        vals = self.values
        if pa.types.is_timestamp(vals.type):
            vals = vals.cast(pa.int64())
        return np.asarray(vals.to_numpy(zero_copy_only=False))

    # -- sum / mean ------------------------------------------------------------------------------
    def sums(self, vis: Visible) -> tuple[np.ndarray, np.ndarray]:
        """float64 sums of each row's visible values and their counts. Floats sum with
        ``np.add.reduceat`` in fact order; int64 and bool sum exactly, then round once."""
        v = self._numpy()
        if v.dtype == np.float64:
            return reduce_visible(vis, v, np.add, empty=0.0)
        v = v.astype(np.int64)
        total, cnt = reduce_visible(vis, v, np.add, empty=0)
        out = total.astype(np.float64)
        if not len(v) or not len(cnt):
            return out, cnt
        magnitude = np.abs(v.astype(np.float64))
        if float(magnitude.max()) * float(cnt.max()) < _EXACT_INT_LIMIT:
            return out, cnt
        bound, _ = reduce_visible(vis, magnitude, np.add, empty=0.0)
        risky = np.flatnonzero(bound >= _EXACT_INT_LIMIT)
        if len(risky):
            exact, _ = reduce_visible(vis.subset(risky), v.astype(object),
                                      np.add, empty=0)
            out[risky] = exact.astype(np.float64)
        return out, cnt

    # -- min / max -------------------------------------------------------------------------------
    def order_keys(self) -> np.ndarray:
        """int64 keys ordered like the values (floats: NaN greatest, -0.0 < 0.0; strings:
        dense ranks in code point order)."""
        if self._order_keys is None:
            if pa.types.is_string(self.values.type) or pa.types.is_large_string(self.values.type):
                keys = self._string_ranks()
            else:
                v = self._numpy()
                keys = float_order_keys(v) if v.dtype == np.float64 else v.astype(np.int64)
            self._order_keys = keys
        return self._order_keys

    def from_order_keys(self, keys: np.ndarray) -> np.ndarray:
        """Values back from :meth:`order_keys` (not for strings: see :meth:`representative`)."""
        t = self.values.type
        if pa.types.is_floating(t):
            return float_from_order_keys(keys)
        if pa.types.is_boolean(t):
            return keys.astype(bool)
        return keys

    def representative(self, ranks: np.ndarray) -> np.ndarray:
        """A fact row holding each string rank (after :meth:`order_keys`)."""
        assert self._representative is not None
        if not len(self._representative):
            return np.zeros(len(ranks), dtype=np.int64)
        rep = self._representative[np.clip(ranks, 0, len(self._representative) - 1)]
        out: np.ndarray = self.index[rep]
        return out

    def _string_ranks(self) -> np.ndarray:
        vals = self.values
        k = len(vals)
        if k == 0:
            self._representative = np.zeros(0, dtype=np.int64)
            return np.zeros(0, dtype=np.int64)
        order = np.asarray(pc.sort_indices(vals).to_numpy(), dtype=np.int64)
        ordered = vals.take(pa.array(order))
        starts = np.ones(k, dtype=bool)
        starts[1:] = pc.not_equal(ordered.slice(1), ordered.slice(0, k - 1)).to_numpy(
            zero_copy_only=False)
        ranks = np.empty(k, dtype=np.int64)
        ranks[order] = np.cumsum(starts) - 1
        self._representative = order[starts]
        return ranks

    # -- distinct_count --------------------------------------------------------------------------
    def _distinct_codes(self) -> tuple[np.ndarray, int]:
        if self._distinct is None:
            vals = self.values
            if pa.types.is_string(vals.type) or pa.types.is_large_string(vals.type):
                enc = pc.dictionary_encode(vals)
                codes = np.asarray(enc.indices.to_numpy(), dtype=np.int64)
                size = len(enc.dictionary)
            else:
                v = self._numpy()
                if v.dtype == np.float64:
                    # == semantics: -0.0 is 0.0 (x + 0.0), and all NaNs are one value
                    with np.errstate(all="ignore"):
                        v = np.where(np.isnan(v), np.nan, v + 0.0).view(np.int64)
                uniq, inv = np.unique(v.astype(np.int64), return_inverse=True)
                codes, size = inv.astype(np.int64).reshape(-1), len(uniq)
            self._distinct = (codes, size)
        return self._distinct

    def distinct_counts(self, vis: Visible, at: np.ndarray | None) -> np.ndarray:
        """Distinct visible values per row (``at``: as_known times, None in event mode)."""
        codes, size = self._distinct_codes()
        out = np.zeros(len(vis.lo), dtype=np.int64)
        for start, stop, rows, pos in iter_expanded(vis.lo, vis.hi):
            if at is not None:
                keep = self.logged[pos] <= at[start + rows]
                rows, pos = rows[keep], pos[keep]
            c = codes[pos]
            if (stop - start) * max(size, 1) < (1 << 62):
                pairs = np.unique(rows * size + c)
                first_rows = pairs // size
            else:
                order = np.lexsort((c, rows))
                r, c = rows[order], c[order]
                new = np.ones(len(r), dtype=bool)
                new[1:] = (r[1:] != r[:-1]) | (c[1:] != c[:-1])
                first_rows = r[new]
            out[start:stop] = np.bincount(first_rows, minlength=stop - start)
        return out
