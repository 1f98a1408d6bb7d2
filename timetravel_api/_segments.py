"""Vectorized segment primitives the fact kernels are built from.

A *segment* is a half-open range ``[lo, hi)`` of positions in an array; a batch of segments is two
equal-length integer arrays. The kernels sort their query rows so that ``lo`` and ``hi`` are
non-decreasing, which keeps :func:`segment_reduce` linear in (array length + total segment
length).

No function here keeps a running total of values: every reduction reads only the values inside
its segment (prefix *counts* of non-null flags are integers and exact).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np

#: Upper bound on (row, position) pairs materialized at once by :func:`iter_expanded`.
MAX_PAIRS = 1 << 23

_INT64_LOW63 = np.int64(0x7FFF_FFFF_FFFF_FFFF)
_NO_POSITION = np.iinfo(np.int64).max


def segment_reduce(
    ufunc: np.ufunc, values: np.ndarray, lo: np.ndarray, hi: np.ndarray, *, empty: object
) -> np.ndarray:
    """``ufunc.reduce(values[lo[i]:hi[i]])`` for every i, ``empty`` where ``lo[i] >= hi[i]``.

    Uses ``ufunc.reduceat``: each segment's result depends only on the values inside it, in
    order (for ``np.add`` on floats: the first value plus numpy's pairwise sum of the rest).
    Cost is linear in ``len(values)`` plus the total segment length when ``lo`` and ``hi`` are
    non-decreasing; unsorted segments are correct but can be slow.
    """
    n = len(values)
    out = np.full(len(lo), empty, dtype=values.dtype)
    rows = np.flatnonzero(hi > lo)
    if not rows.size:
        return out
    # reduceat takes only indices < n, so segments that end at n reduce over a copy of the
    # array's tail with one spare slot (with sorted segments, the tail is one entity's facts).
    to_end = hi[rows] >= n
    inner, tail = rows[~to_end], rows[to_end]
    if inner.size:
        out[inner] = _reduceat(ufunc, values, lo[inner], hi[inner])
    if tail.size:
        start = int(lo[tail].min())
        part = np.empty(n - start + 1, dtype=values.dtype)
        part[:-1] = values[start:]
        part[-1] = values[start]
        out[tail] = _reduceat(ufunc, part, lo[tail] - start, hi[tail] - start)
    return out


def _reduceat(ufunc: np.ufunc, values: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    idx = np.empty(2 * len(lo), dtype=np.intp)
    idx[0::2] = lo
    idx[1::2] = hi
    out: np.ndarray = ufunc.reduceat(values, idx)[0::2]
    return out


def segment_starts(counts: np.ndarray) -> np.ndarray:
    """Start offsets of consecutive segments with the given lengths."""
    starts = np.zeros(len(counts), dtype=np.int64)
    if len(counts) > 1:
        np.cumsum(counts[:-1], out=starts[1:])
    return starts


def expand(lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (row, position) pair with ``lo[row] <= position < hi[row]``, grouped by row in
    row order, positions ascending within a row."""
    lens = np.maximum(hi - lo, 0)
    rows = np.repeat(np.arange(len(lo), dtype=np.int64), lens)
    shift = np.repeat(lo - segment_starts(lens), lens)
    pos = np.arange(len(rows), dtype=np.int64) + shift
    return rows, pos


def iter_expanded(
    lo: np.ndarray, hi: np.ndarray, *, max_pairs: int | None = None
) -> Iterator[tuple[int, int, np.ndarray, np.ndarray]]:
    """:func:`expand` in chunks of rows, each holding at most ``max_pairs`` pairs (a single
    longer row is one chunk). Yields ``(start, stop, rows, positions)`` for the rows
    ``start:stop``, with ``rows`` relative to ``start``."""
    if max_pairs is None:
        max_pairs = MAX_PAIRS
    k = len(lo)
    lens = np.maximum(hi - lo, 0)
    ends = np.cumsum(lens)
    if not k or int(ends[-1]) <= max_pairs:
        rows, pos = expand(lo, hi)
        yield 0, k, rows, pos
        return
    start = 0
    while start < k:
        base = int(ends[start - 1]) if start else 0
        stop = int(np.searchsorted(ends, base + max_pairs, side="right"))
        stop = max(stop, start + 1)
        rows, pos = expand(lo[start:stop], hi[start:stop])
        yield start, stop, rows, pos
        start = stop


def last_visible(
    logged: np.ndarray, lo: np.ndarray, hi: np.ndarray, at: np.ndarray, *, first: bool = False
) -> np.ndarray:
    """Per row, the greatest position ``p`` in ``[lo, hi)`` with ``logged[p] <= at``, or -1.

    With ``first=True``: the smallest such position.

    The candidate at the segment's end is checked for all rows at once; only rows whose
    candidate was logged after ``at`` search further, in geometrically growing steps (8, 64,
    512, ... positions), each step vectorized over the rows still searching.
    """
    k = len(lo)
    out = np.full(k, -1, dtype=np.int64)
    nonempty = hi > lo
    cand = np.where(nonempty, lo if first else hi - 1, 0)
    if len(logged):
        seen = nonempty & (logged[np.minimum(cand, len(logged) - 1)] <= at)
    else:
        seen = np.zeros(k, dtype=bool)
    out[seen] = cand[seen]
    todo = np.flatnonzero(nonempty & ~seen)
    # the unsearched part of each remaining row: [lo, edge) for last, [edge, hi) for first
    edge = cand[todo] + 1 if first else cand[todo]
    step = 8
    while todo.size:
        if first:
            seg_lo, seg_hi = edge, np.minimum(hi[todo], edge + step)
        else:
            seg_lo, seg_hi = np.maximum(lo[todo], edge - step), edge
        searchable = seg_hi > seg_lo
        todo, edge, seg_lo, seg_hi = (a[searchable] for a in (todo, edge, seg_lo, seg_hi))
        if not todo.size:
            break
        rows, pos = expand(seg_lo, seg_hi)
        ok = logged[pos] <= at[todo][rows]
        none = _NO_POSITION if first else -1
        marked = np.where(ok, pos, none)
        starts = segment_starts(seg_hi - seg_lo)
        best = (np.minimum if first else np.maximum).reduceat(marked, starts)
        found = best != none
        out[todo[found]] = best[found]
        todo, edge = todo[~found], (seg_hi if first else seg_lo)[~found]
        step *= 8
    return out


def float_order_keys(values: np.ndarray) -> np.ndarray:
    """Map float64 to int64 keys whose order is the total order -inf < ... < -0.0 < 0.0 < ...
    < inf < NaN (every NaN made the positive quiet NaN first). Its own inverse on the keys'
    bit patterns: see :func:`float_from_order_keys`."""
    v = np.where(np.isnan(values), np.nan, values)
    bits = v.view(np.int64)
    return bits ^ ((bits >> 63) & _INT64_LOW63)


def float_from_order_keys(keys: np.ndarray) -> np.ndarray:
    """Inverse of :func:`float_order_keys`."""
    bits = keys ^ ((keys >> 63) & _INT64_LOW63)
    out: np.ndarray = bits.view(np.float64)
    return out
