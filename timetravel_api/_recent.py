"""Newest first: how a lookup of one entity avoids reading its whole history for ``last``.

``T.F`` / ``T.F.last`` and ``T.time_since_last`` look back over the fact type's whole lookback
(unbounded unless declared), so a plain plan reads every date partition up to ``at``. But they
only want the *last* visible fact (with ``F`` non-null), and facts are ordered by ``event_time``
first: once a visible one is found among the facts from some time on, no older fact can change
the answer. So a small request about one entity first reads only the recent partitions (what its
windowed features need, at least :data:`RECENT_SPAN_US`); if every such feature found its value
there, that is the answer, and otherwise it reads the full range as usual.

The answer is the full plan's answer, with one caveat that the full plan shares between any two
ranges it reads (see ``factlog._reader``): copies of one ``fact_id`` whose ``event_time`` fall on
different UTC dates are deduplicated only when both are read.
"""

from __future__ import annotations

import pyarrow as pa

from ttstore import US_PER_DAY

from ._features import FeatureSpec
from ._kernels import UNBOUNDED_US
from ._partition import FactGroup, PartitionPlan

#: The least a newest-first read covers before the request's oldest ``at``.
RECENT_SPAN_US = US_PER_DAY
#: Requests of one entity with at most this many rows read newest first.
RECENT_MAX_ROWS = 64


def last_type(spec: FeatureSpec) -> bool:
    """Whether ``spec`` wants the newest visible fact (or non-null value) of its range."""
    return spec.kind == "time_since_last" or (spec.kind == "fact_field" and spec.agg == "last")


def _bounded(history_us: int | None) -> bool:
    return history_us is not None and history_us < UNBOUNDED_US


def recent_plan(plan: PartitionPlan, oldest_at_us: int) -> PartitionPlan | None:
    """``plan`` with each group's start moved up to what its other features need (at least
    :data:`RECENT_SPAN_US` before ``oldest_at_us``), where last-type features look further
    back; None when no group would read less."""
    groups: list[FactGroup] = []
    changed = False
    for g in plan.groups:
        others = [s.history_us for s in g.specs if not last_type(s)]
        if not all(_bounded(h) for h in others):
            groups.append(g)  # a window as long as all history: nothing to save
            continue
        span = max([RECENT_SPAN_US, *(int(h) for h in others if h is not None)])
        start = oldest_at_us - span
        if g.start_us is None or g.start_us < start:
            groups.append(FactGroup(g.fact_type, g.entity_col, g.lookback_us, g.specs, g.indices,
                                    g.columns, start, g.end_us, g.logged_before_us))
            changed = True
        else:
            groups.append(g)
    return (PartitionPlan(tuple(groups), plan.knowledge, plan.provenance, plan.entity_type)
            if changed else None)


def found_everything(
    recent: PartitionPlan, full: PartitionPlan, wire: pa.Table, oldest_at_us: int
) -> bool:
    """Whether the recent read answers as the full one would: every last-type feature whose
    history reaches before the recent range found a value for every row."""
    for short, whole in zip(recent.groups, full.groups, strict=True):
        if short.start_us == whole.start_us:
            continue
        assert short.start_us is not None
        for i, s in zip(short.indices, short.specs, strict=True):
            h = s.history_us
            if not last_type(s) or (h is not None and _bounded(h)
                                    and oldest_at_us - h >= short.start_us):
                continue  # its whole window was read
            if any(v != "ok" for v in wire.column(f"s{i}").to_pylist()):
                return False
    return True
