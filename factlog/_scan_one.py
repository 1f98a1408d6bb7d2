"""The tail of a scan for one entity (an online lookup): a few dozen facts, where the general
machinery (hash-based duplicate detection, vectorized winner choice, multi-key sorts) costs more
than the work. Same rules, same answer, bit for bit: ``tests/test_scan_one.py`` checks it."""

from __future__ import annotations

import numpy as np
import pyarrow as pa

from ttstore import timestamps_us

#: One entity's scans with more rows than this take the general path.
MAX_ROWS = 512


def one_entity_rows(
    table: pa.Table, start_us: int | None, end_us: int | None, logged_before_us: int | None
) -> np.ndarray | None:
    """The rows of ``table`` (one entity's copies) that a deduplicating scan keeps, in (event_time,
    logged_at, fact_id) order; None when two rows share a ``fact_id`` (the general dedup
    decides which copy counts) or there are too many rows."""
    n = table.num_rows
    if n > MAX_ROWS:
        return None
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    ids = table.column("fact_id").to_pylist()
    if len(set(ids)) != n:
        return None
    ev = timestamps_us(table.column("event_time"))
    lg = timestamps_us(table.column("logged_at"))
    mask = np.ones(n, dtype=bool)
    if start_us is not None:
        mask &= ev >= start_us
    if end_us is not None:
        mask &= ev <= end_us
    if logged_before_us is not None:
        mask &= lg <= logged_before_us
    rows = np.flatnonzero(mask)
    if len(rows) < 2:
        return rows
    e, g = ev[rows], lg[rows]
    de, dg = e[1:] - e[:-1], g[1:] - g[:-1]
    if not bool(((de < 0) | ((de == 0) & (dg <= 0))).any()):
        return rows  # strictly ordered by (event_time, logged_at): compacted data
    order = sorted(rows.tolist(), key=lambda i: (int(ev[i]), int(lg[i]), ids[i]))
    return np.asarray(order, dtype=np.int64)
