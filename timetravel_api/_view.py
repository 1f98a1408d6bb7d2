"""The as-of view an encoder sees (:class:`View`, one entity at one time, online or offline), its
vectorized twin (:class:`Batch`, every query row at once), and :func:`gather_visible`, which
finds the visible facts of every query row without a Python loop (SPEC §3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttstore import TIMESTAMP_TYPE, parse_timestamp, to_datetime

from ._errors import EncoderDefinitionError

if TYPE_CHECKING:
    from ._encoders import Encoder

__all__ = ["Batch", "RowSource", "View", "gather_visible", "rows_of", "visible_positions"]

#: (fact type, window as written or None): one declared fact input.
InputKey = tuple[str, str | None]
_MAX_SPAN_US = 2**62


def _lookup(store: Mapping[InputKey, Any], name: str, window: str | None, what: str) -> Any:
    if (name, window) in store:
        return store[(name, window)]
    if window is None:
        hits = [k for k in store if k[0] == name]
        if len(hits) == 1:
            return store[hits[0]]
        if len(hits) > 1:
            raise EncoderDefinitionError(
                f"{what} reads {name!r} with several windows; say which: facts({name!r}, "
                f"window=...) one of {[k[1] for k in hits]}")
    raise EncoderDefinitionError(
        f"{what} did not declare facts({name!r}{'' if window is None else f', window={window!r}'})"
        " in its inputs")


class View:
    """What an encoder sees for one entity at one time.

    Offline the engine builds it from the store; online a service builds it with :meth:`live`
    from the data it fetched and is about to log. Calling an encoder restricts the view to the
    encoder's declared inputs and windows, so the same function sees the same facts either way.

    Attributes:
        entity: the entity key.
        at_us: the time, µs since the epoch (UTC).
        knowledge: ``as_known`` or ``event``.
    """

    def __init__(
        self, entity: Any, at_us: int, *, facts: Mapping[Any, list[dict[str, Any]]],
        snapshots: Mapping[str, Any], snapshot_statuses: Mapping[str, str] | None = None,
        knowledge: str = "as_known", restricted: bool = False,
    ) -> None:
        self.entity = entity
        self.at_us = int(at_us)
        self.knowledge = knowledge
        self._facts = dict(facts)
        self._snapshots = dict(snapshots)
        self._statuses = dict(snapshot_statuses or {})
        self._restricted = restricted

    @classmethod
    def live(
        cls, entity: Any, at: datetime | str | int, *,
        facts: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
        snapshots: Mapping[str, Mapping[str, Any] | None] | None = None,
        snapshot_statuses: Mapping[str, str] | None = None,
    ) -> View:
        """The view a service assembles online.

        Args:
            entity: the request's entity key.
            at: now (aware datetime, RFC 3339 string or µs).
            facts: fact type → rows: the facts the service fetched plus the ones it is about to
                log. A row without ``event_time`` is taken as happening at ``at`` (the logger
                sets it from its clock).
            snapshots: service → the payload it fetched (None: not found).
            snapshot_statuses: service → status, when not simply ok / missing.
        """
        at_us = at if isinstance(at, int) else parse_timestamp(at, field="at")
        snaps = dict(snapshots or {})
        statuses = {s: ("ok" if p is not None else "missing") for s, p in snaps.items()}
        statuses.update(snapshot_statuses or {})
        return cls(entity, at_us, facts={k: [dict(r) for r in v] for k, v in (facts or {}).items()},
                   snapshots=snaps, snapshot_statuses=statuses)

    @property
    def at(self) -> datetime:
        """The time as an aware UTC datetime."""
        return to_datetime(self.at_us)

    def facts(self, name: str, *, window: str | None = None) -> list[dict[str, Any]]:
        """The visible facts of ``name`` in the declared window, ascending by (event_time,
        logged_at, fact_id); each a dict of the stored columns (json fields decoded). Treat
        them as read-only.

        Raises:
            EncoderDefinitionError: the encoder did not declare ``name`` as an input.
        """
        rows: list[dict[str, Any]] = _lookup(self._facts, name, window, "the encoder")
        return rows

    def snapshot(self, service: str) -> dict[str, Any] | None:
        """The as-of payload of ``service``, or None unless its status is ``ok``."""
        self._check_service(service)
        payload = self._snapshots.get(service)
        return payload if self.snapshot_status(service) == "ok" else None

    def snapshot_status(self, service: str) -> str:
        """``ok``, ``missing``, ``stale``, ``not_sampled`` or ``error`` (SPEC §3)."""
        self._check_service(service)
        return self._statuses.get(service, "not_sampled")

    def _check_service(self, service: str) -> None:
        if self._restricted and service not in self._statuses:
            raise EncoderDefinitionError(
                f"the encoder did not declare snapshot({service!r}) in its inputs")

    def restrict(self, enc: Encoder) -> View:
        """This view as ``enc`` may see it: its declared fact inputs, visible and in window
        (SPEC §3), in fact order; its declared snapshots."""
        if self._restricted:
            return self
        facts: dict[InputKey, list[dict[str, Any]]] = {}
        for inp in enc.fact_inputs:
            raw = self._facts.get(inp.fact_type) or self._facts.get((inp.fact_type, inp.window))
            facts[(inp.fact_type, inp.window)] = _visible_rows(
                raw or [], self.at_us, inp.span_us, self.knowledge)
        services = enc.services
        return View(self.entity, self.at_us, facts=facts,
                    snapshots={s: self._snapshots.get(s) for s in services},
                    snapshot_statuses={s: self._statuses.get(s, "not_sampled") for s in services},
                    knowledge=self.knowledge, restricted=True)

    def __repr__(self) -> str:
        return f"View(entity={self.entity!r}, at={self.at.isoformat()})"


def _as_us(value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, int):
        return value
    return parse_timestamp(value, field="event_time")


def _visible_rows(
    rows: Sequence[dict[str, Any]], at_us: int, span_us: int | None, knowledge: str,
) -> list[dict[str, Any]]:
    keep: list[tuple[tuple[int, int, str, int], dict[str, Any]]] = []
    for i, row in enumerate(rows):
        et = _as_us(row.get("event_time"))
        et = at_us if et is None else et
        lg = _as_us(row.get("logged_at"))
        if et > at_us or (span_us is not None and et <= at_us - span_us):
            continue
        if knowledge == "as_known" and lg is not None and lg > at_us:
            continue
        out = dict(row)
        out["event_time"] = to_datetime(et)
        if lg is not None:
            out["logged_at"] = to_datetime(lg)
        keep.append(((et, at_us if lg is None else lg, str(row.get("fact_id") or ""), i), out))
    keep.sort(key=lambda kv: kv[0])
    return [r for _, r in keep]


class Batch:
    """Every query row at once, for an encoder's vectorized form.

    Attributes:
        entities: the entity keys, one per query row.
        at_us: the query times (int64 µs).
        knowledge: ``as_known`` or ``event``.
    """

    def __init__(
        self, entities: pa.Array, at_us: np.ndarray,
        facts: Mapping[InputKey, tuple[pa.Table, np.ndarray]], snapshots: Mapping[str, pa.Table],
        knowledge: str,
    ) -> None:
        self.entities = entities
        self.at_us = at_us
        self.knowledge = knowledge
        self._facts = dict(facts)
        self._snapshots = dict(snapshots)

    def __len__(self) -> int:
        return len(self.at_us)

    @property
    def at(self) -> pa.Array:
        """The query times as ``timestamp[us, tz=UTC]``."""
        return pa.array(self.at_us, type=pa.int64()).cast(TIMESTAMP_TYPE)

    def facts_table(self, name: str, *, window: str | None = None) -> tuple[pa.Table, np.ndarray]:
        """``(flat, offsets)``: every query's visible facts of ``name``, concatenated in query
        order (query ``q`` owns rows ``offsets[q]:offsets[q + 1]``, in fact order)."""
        got: tuple[pa.Table, np.ndarray] = _lookup(self._facts, name, window, "the encoder")
        return got

    def offsets(self, name: str, *, window: str | None = None) -> np.ndarray:
        """The int64 offsets of :meth:`facts_table` (length ``len(self) + 1``)."""
        return self.facts_table(name, window=window)[1]

    def facts(self, name: str, *, window: str | None = None) -> pa.ListArray:
        """One list of fact structs per query row."""
        flat, off = self.facts_table(name, window=window)
        return pa.ListArray.from_arrays(pa.array(off, pa.int64()).cast(pa.int32()) if
                                        off[-1] < 2**31 else pa.array(off, pa.int64()),
                                        pa.StructArray.from_arrays(
                                            [c.combine_chunks() for c in flat.columns],
                                            names=flat.column_names))

    def column(self, name: str, field: str, *, window: str | None = None) -> pa.ListArray:
        """One list of ``field`` values per query row (nulls kept)."""
        flat, off = self.facts_table(name, window=window)
        values = flat.column(field).combine_chunks()
        return pa.LargeListArray.from_arrays(pa.array(off, pa.int64()), values)

    def snapshot(self, service: str) -> pa.StructArray:
        """The typed payload struct per query row (fields null unless the status is ``ok``)."""
        col = self._snap(service).column("payload")
        return col.combine_chunks() if isinstance(col, pa.ChunkedArray) else col

    def snapshot_status(self, service: str) -> pa.Array:
        """The snapshot status per query row."""
        return self._snap(service).column("status").combine_chunks()

    def snapshot_json(self, service: str) -> pa.Array:
        """The raw JSON payload per query row (null unless ok or missing)."""
        return self._snap(service).column("raw_json").combine_chunks()

    def _snap(self, service: str) -> pa.Table:
        if service not in self._snapshots:
            raise EncoderDefinitionError(
                f"the encoder did not declare snapshot({service!r}) in its inputs")
        return self._snapshots[service]


def _sorted_by_entity(table: pa.Table, entity_col: str) -> pa.Table:
    keys = [(entity_col, "ascending"), ("event_time", "ascending"), ("logged_at", "ascending"),
            ("fact_id", "ascending")]
    return table.take(pc.sort_indices(table, sort_keys=keys))


def gather_visible(
    table: pa.Table, entity_col: str, entities: pa.Array, at_us: np.ndarray, *,
    span_us: int | None, knowledge: str,
) -> tuple[pa.Table, np.ndarray]:
    """The facts each query row sees, as ``(flat, offsets)``: see :func:`visible_positions`."""
    table, pos, offsets = visible_positions(table, entity_col, entities, at_us,
                                            span_us=span_us, knowledge=knowledge)
    return table.take(pa.array(pos, pa.int64())), offsets


def visible_positions(
    table: pa.Table, entity_col: str, entities: pa.Array, at_us: np.ndarray, *,
    span_us: int | None, knowledge: str,
) -> tuple[pa.Table, np.ndarray, np.ndarray]:
    """The facts each query row sees: ``entity == e``, ``event_time`` in ``(at - span, at]``
    (no lower bound when ``span_us`` is None) and, in ``as_known`` mode, ``logged_at <= at``.

    Args:
        table: deduplicated facts sorted by (entity, event_time, logged_at, fact_id) (re-sorted
            here if the entities are not contiguous).

    Returns:
        ``(table, pos, offsets)``: ``table`` (re-sorted if it was not in order); the visible
        facts of query ``q`` are the rows ``pos[offsets[q]:offsets[q+1]]`` of it, in fact order.
        Binary search per query, no Python loop per fact or per query.
    """
    n = len(at_us)
    m = table.num_rows
    nothing = np.zeros(0, dtype=np.int64)
    if m == 0 or n == 0:
        return table, nothing, np.zeros(n + 1, dtype=np.int64)
    ent = table.column(entity_col).combine_chunks()
    ent_np = ent.to_numpy(zero_copy_only=False)
    change = ent_np[1:] != ent_np[:-1]
    starts = np.concatenate(([0], np.flatnonzero(change) + 1))
    et = table.column("event_time").combine_chunks().cast(pa.int64()).to_numpy()
    if len(starts) != len(pc.unique(ent)) or not np.all(change | (et[1:] >= et[:-1])):
        # Not in (entity, event_time) order: sort once (the engine's tables already are).
        table = _sorted_by_entity(table, entity_col)
        return visible_positions(table, entity_col, entities, at_us, span_us=span_us,
                                 knowledge=knowledge)
    try:
        q_ent = entities.cast(ent.type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return table, nothing, np.zeros(n + 1, dtype=np.int64)
    uniq = ent.take(pa.array(starts))
    g = pc.index_in(q_ent, value_set=uniq).fill_null(-1).to_numpy(zero_copy_only=False)
    g = g.astype(np.int64)
    at = np.asarray(at_us, dtype=np.int64)
    span = None if span_us is None else min(int(span_us), _MAX_SPAN_US)
    lo_t = at - span if span is not None else at  # the lower bound is unused when unbounded
    # Dense ranks of every time involved make (group, time) one int64 key: binary search per
    # entity without a loop, and without overflow whatever the time range.
    values, inv = np.unique(np.concatenate((et, at, lo_t)), return_inverse=True)
    width = len(values) + 1
    sizes = np.diff(np.append(starts, m))
    fkey = np.repeat(np.arange(len(starts), dtype=np.int64), sizes) * width + inv[:m]
    has = g >= 0
    gs = np.where(has, g, 0)
    hi = np.searchsorted(fkey, gs * width + inv[m:m + n], side="right")
    if span is None:
        lo = starts[gs]
    else:
        lo = np.searchsorted(fkey, gs * width + inv[m + n:], side="right")
    lens = np.where(has, np.maximum(hi - lo, 0), 0).astype(np.int64)
    total = int(lens.sum())
    qrep = np.repeat(np.arange(n, dtype=np.int64), lens)
    first = np.cumsum(lens) - lens
    pos = np.arange(total, dtype=np.int64) - np.repeat(first, lens) + np.repeat(lo, lens)
    if knowledge == "as_known" and total:
        logged = table.column("logged_at").combine_chunks().cast(pa.int64()).to_numpy()
        ok = logged[pos] <= at[qrep]
        pos, qrep = pos[ok], qrep[ok]
    offsets = np.zeros(n + 1, dtype=np.int64)
    np.cumsum(np.bincount(qrep, minlength=n), out=offsets[1:])
    return table, pos, offsets


class RowSource:
    """The row form's facts: each distinct visible fact converted to a dict once, handed to
    every query that sees it as a fresh copy (an encoder may mutate its view)."""

    def __init__(self, table: pa.Table, pos: np.ndarray, offsets: np.ndarray,
                 json_fields: Sequence[str]) -> None:
        uniq, self._index = np.unique(pos, return_inverse=True)
        self._rows = rows_of(table.take(pa.array(uniq, pa.int64())), json_fields)
        self._offsets = offsets

    def rows(self, q: int) -> list[dict[str, Any]]:
        """Query ``q``'s visible facts, in fact order."""
        src = self._rows
        return [dict(src[i]) for i in self._index[self._offsets[q]:self._offsets[q + 1]].tolist()]


def rows_of(table: pa.Table, json_fields: Sequence[str]) -> list[dict[str, Any]]:
    """The facts as dicts, json fields decoded and timestamps as aware UTC datetimes (the row
    form's input), converted column by column."""
    import json

    import pandas as pd

    names = table.column_names
    cols: list[list[Any]] = []
    for name in names:
        col = table.column(name).combine_chunks()
        if pa.types.is_timestamp(col.type):
            us = col.cast(pa.int64()).fill_null(0).to_numpy().astype("datetime64[us]")
            # pandas converts in C, ~50x faster than Arrow's per-value tz-aware conversion
            values = list(pd.DatetimeIndex(us).tz_localize(UTC).to_pydatetime())
            if col.null_count:
                nulls = col.is_null().to_numpy(zero_copy_only=False)
                values = [None if z else v for v, z in zip(values, nulls, strict=True)]
            cols.append(values)
        elif name in json_fields:
            cols.append([None if v is None else json.loads(v) for v in col.to_pylist()])
        else:
            cols.append(col.to_pylist())
    return [dict(zip(names, vals, strict=True)) for vals in zip(*cols, strict=True)]
