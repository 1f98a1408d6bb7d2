"""Brute-force reference of the built-in fact features (SPEC §3, §4), written from the SPEC text
with plain Python loops. It shares no code with ``timetravel_api``'s kernels.

A fact is a dict: the entity key under its name, ``fact_id`` (str), ``event_time`` and
``logged_at`` (int µs), and one entry per field (None = null; timestamps as int µs). The facts
given are already deduplicated (one copy per fact_id), in any order.

Summation order (what "exact" means for float sums): the engine defines the sum of a window as
numpy's ``np.add.reduceat`` over the window's non-null values in fact order, (event_time,
logged_at, fact_id) ascending. That is the first value plus numpy's pairwise sum of the rest:
not a left fold, and not ``math.fsum``. The reference gathers the same values in the same order
with a loop and applies that one numpy primitive to them, so a kernel that sums any other set of
facts, or the same facts in another order, or keeps running totals, disagrees in the last bits.
int64 and bool sums are exact Python integers rounded once to float64; a mean is that sum
divided by the count.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

_UNIT_US = {"s": 1_000_000, "m": 60_000_000, "h": 3_600_000_000, "d": 86_400_000_000}


def window_us(text: str) -> int:
    return int(text[:-1]) * _UNIT_US[text[-1]]


def _order(f: dict[str, Any]) -> tuple[int, int, str]:
    return (f["event_time"], f["logged_at"], f["fact_id"])


def _float_total_order(v: float) -> tuple[int, float, float]:
    # -inf < ... < -0.0 < 0.0 < ... < inf < NaN
    if math.isnan(v):
        return (1, 0.0, 0.0)
    return (0, v, math.copysign(1.0, v))


def _distinct_key(v: Any) -> Any:
    if isinstance(v, float) and math.isnan(v):
        return "NaN"
    return v  # -0.0 == 0.0 and hash alike, so a set holds one of them


def reference_feature(
    facts: list[dict[str, Any]],
    name: str,
    entity: Any,
    at: int,
    *,
    entity_col: str,
    field_types: dict[str, str],
    knowledge: str,
    lookback_us: int | None,
) -> tuple[Any, str]:
    """The value and status of feature ``name`` for entity ``entity`` at time ``at``."""
    parts = name.split(".")
    # Visibility (SPEC §3)
    visible = []
    for f in facts:
        if f[entity_col] != entity or type(f[entity_col]) is not type(entity):
            continue
        if f["event_time"] > at:
            continue
        if knowledge == "as_known" and f["logged_at"] > at:
            continue
        visible.append(f)
    visible.sort(key=_order)

    # The window: (t - W, t] on event_time; unwindowed forms use the lookback instead.
    if parts[1] == "time_since_last" or len(parts) == 2 or (len(parts) == 3 and parts[2] == "last"):
        span = lookback_us
    else:
        span = window_us(parts[-1])
    if span is None:
        window = visible
    else:
        window = [f for f in visible if f["event_time"] > at - span]

    if parts[1] == "count":
        return len(window), "ok"
    if parts[1] == "time_since_last":
        if not window:
            return None, "missing"
        last = window[-1]
        return (at - last["event_time"]) / 1_000_000, "ok"

    field = parts[1]
    agg = "last" if len(parts) == 2 else parts[2]
    ftype = field_types[field]
    values = [f[field] for f in window if f[field] is not None]  # NaN is a value, not a null

    if agg == "count":
        return len(values), "ok"
    if agg == "distinct_count":
        return len({_distinct_key(v) for v in values}), "ok"
    if not values:
        return None, "missing"
    if agg == "first":
        value = values[0]
    elif agg == "last":
        value = values[-1]
    elif agg in ("sum", "mean"):
        if ftype == "float64":
            with np.errstate(all="ignore"):  # inf - inf is NaN, quietly, as in the engine
                total = float(np.add.reduceat(np.array(values, dtype=np.float64), [0])[0])
        else:
            total = float(sum(int(v) for v in values))
        value = total if agg == "sum" else total / len(values)
    elif agg in ("min", "max"):
        pick = min if agg == "min" else max
        value = pick(values, key=_float_total_order) if ftype == "float64" else pick(values)
    else:
        raise AssertionError(agg)
    return value, "ok"


def reference_features(
    facts: list[dict[str, Any]],
    names: list[str],
    queries: list[tuple[Any, int]],
    *,
    entity_col: str,
    field_types: dict[str, str],
    knowledge: str,
    lookback_us: int | None,
) -> dict[str, list[tuple[Any, str]]]:
    """Every feature for every query row: name → [(value, status), ...] in query order."""
    return {
        name: [
            reference_feature(facts, name, e, t, entity_col=entity_col, field_types=field_types,
                              knowledge=knowledge, lookback_us=lookback_us)
            for e, t in queries
        ]
        for name in names
    }
