"""The as-of snapshot reader (SPEC §3, "Snapshots"), for the time-travel engine.

For query rows (entity ``e``, time ``t``) and a service ``S``, consider ``S``'s rows for ``e``
with ``captured_at <= t`` from committed runs (in ``as_known`` mode, only runs whose
``committed_at <= t``):

- the value comes from the latest such row (by ``captured_at``) whose status is ``ok`` or
  ``missing``: a failed fetch never hides an older good row;
- if ``t - captured_at`` exceeds that row's run's ``max_staleness``, the value is null and the
  status ``stale``;
- with no such row but a visible failed one, the status is ``error``;
- with no visible row at all, ``not_sampled``.

Vectorized: rows are sorted by (entity, visible-from time); a running maximum of a
(segment, rank) key finds, at every row, the latest good row seen so far in its entity; each
query finds its last visible row with one ``searchsorted``. No Python loop per query or row.
"""

from __future__ import annotations

import math
import threading
import time
from collections import OrderedDict
from collections.abc import Sequence
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from ttstore import TIMESTAMP_TYPE, US_PER_S, InvalidInput, ObjectNotFound, Store

from ._manifest import ManifestCache, RunManifest, unpublished_key
from ._typing import KINDS, column_name, conform

Knowledge = Literal["as_known", "event"]
STATUSES = ("ok", "missing", "stale", "not_sampled", "error")
_BASE_COLUMNS = ("entity_id", "captured_at", "status", "weight")
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
DEFAULT_REFRESH_S = 0.0


class SnapshotReader:
    """Reads as-of snapshot rows from a store's committed runs.

    Args:
        store: the store the runs were committed to.
        cache_bytes: how much decoded data (committed objects are immutable) to keep in memory.
        refresh_s: how long the list of committed runs is trusted before the store is listed
            again (default 0: on every call; a server sets a few seconds, so that it does not
            list the store per request).

    Thread-safe.
    """

    def __init__(
        self,
        store: Store,
        *,
        cache_bytes: int = DEFAULT_CACHE_BYTES,
        refresh_s: float = DEFAULT_REFRESH_S,
    ) -> None:
        self.store = store
        self.cache_bytes = cache_bytes
        self.refresh_s = refresh_s
        self._manifests = ManifestCache(store)
        self._runs: list[RunManifest] = []
        self._runs_at = -math.inf
        self._cache: OrderedDict[tuple[str, tuple[str, ...]], pa.Table] = OrderedDict()
        self._cached_bytes = 0
        self._lock = threading.Lock()

    # -- catalog ---------------------------------------------------------------------------------
    def runs(self) -> list[RunManifest]:
        """Every committed run, oldest slot first (listed at most every ``refresh_s``)."""
        with self._lock:
            now = time.monotonic()
            if now - self._runs_at >= self.refresh_s:
                self._runs = self._manifests.runs()
                self._runs_at = now
            return list(self._runs)

    def services(self) -> list[str]:
        """The services that appear in any committed run."""
        return sorted({s for m in self.runs() for s in m.services})

    def fields(self, service: str) -> dict[str, str]:
        """A service's typed payload fields and their types: the latest frozen version any
        committed run used (empty for a service never snapshotted)."""
        return _fields_of(self.runs(), service)

    # -- the as-of read --------------------------------------------------------------------------
    def read(
        self,
        service: str,
        entities: pa.Array | Sequence[object],
        at: pa.Array | np.ndarray | Sequence[int],
        *,
        knowledge: Knowledge = "as_known",
        fields: Sequence[str] | None = None,
        raw_json: bool = False,
    ) -> pa.Table:
        """The as-of snapshot row of ``service`` for each (entity, at), in query order.

        Args:
            entities: the entity keys (cast to the service's key type).
            at: the query times: ``timestamp[us, tz=UTC]`` or int64 microseconds.
            knowledge: ``as_known`` (only runs committed by ``at``) or ``event``.
            fields: payload fields to return (default: all typed fields).
            raw_json: also return the answer's JSON text.

        Returns:
            A table with ``status`` (ok, missing, stale, not_sampled, error), ``captured_at``,
            ``age_s``, ``run_id``, ``selection_id`` and ``weight`` (1/pi, null where
            not_sampled) of the row the answer came from, ``raw_json`` if asked, and
            ``payload``: a struct of the typed fields, null unless the status is ``ok``.

        Raises:
            InvalidInput: unknown knowledge mode or field, or keys of the wrong type.
        """
        if knowledge not in ("as_known", "event"):
            raise InvalidInput(
                f"knowledge must be as_known or event, not {knowledge!r}", field="knowledge"
            )
        all_runs = self.runs()
        types = _fields_of(all_runs, service)
        names = list(types) if fields is None else list(fields)
        unknown = [f for f in names if f not in types]
        if unknown:
            raise InvalidInput(
                f"service {service!r} has no typed field(s) {', '.join(unknown)}",
                field="fields",
                code="unknown_snapshot_field",
            )
        types = {f: types[f] for f in names}
        at_us = _as_us(at)
        try:
            q_ent = entities if isinstance(entities, pa.Array) else pa.array(list(entities))
        except (pa.ArrowInvalid, pa.ArrowTypeError, OverflowError) as exc:
            raise InvalidInput(f"entity keys must be all int64 or all strings: {exc}",
                               field="entity_id") from exc
        if len(q_ent) != len(at_us):
            raise InvalidInput("entities and at differ in length", field="at")
        runs = [m for m in all_runs if service in m.services]
        data = self._rows(service, runs, q_ent, types, raw_json=raw_json)
        return asof(data, q_ent, at_us, knowledge=knowledge, types=types, raw_json=raw_json)

    # -- loading ---------------------------------------------------------------------------------
    def _rows(
        self,
        service: str,
        runs: list[RunManifest],
        q_ent: pa.Array,
        types: dict[str, str],
        *,
        raw_json: bool,
    ) -> pa.Table:
        """Every row of ``service`` for the queried entities, with run-level columns added."""
        order = sorted(range(len(runs)), key=lambda i: (runs[i].committed_at_us, runs[i].run_id))
        tie = {runs[i].run_id: rank for rank, i in enumerate(order)}
        columns = [*_BASE_COLUMNS, *(column_name(f) for f in types)]
        if raw_json:
            columns.append("raw_json")
        pieces = []
        for m in runs:
            stats = m.services[service]
            key_type = pa.int64() if stats.config.get("entity_type", "int64") == "int64" else (
                pa.string()
            )
            wanted = _cast_keys(pc.unique(q_ent), key_type)
            for obj in stats.objects:
                t = self._object(obj, tuple(columns))
                t = t.filter(pc.is_in(t.column("entity_id"), value_set=wanted))
                if t.num_rows == 0:
                    continue
                t = conform(t, types)
                n = t.num_rows
                t = t.append_column("committed_at", pa.array(np.full(n, m.committed_at_us)))
                t = t.append_column(
                    "max_staleness_us", pa.array(np.full(n, stats.max_staleness_us))
                )
                t = t.append_column("tie", pa.array(np.full(n, tie[m.run_id])))
                t = t.append_column("run_id", pa.array([m.run_id] * n, pa.string()))
                t = t.append_column("selection_id", pa.array([m.selection_id] * n, pa.string()))
                pieces.append(t.select(_row_columns(types, raw_json)))
        if not pieces:
            return _empty_rows(q_ent.type, types, raw_json=raw_json)
        return pa.concat_tables(pieces)

    def _object(self, key: str, columns: tuple[str, ...]) -> pa.Table:
        ck = (key, columns)
        with self._lock:
            hit = self._cache.get(ck)
            if hit is not None:
                self._cache.move_to_end(ck)
                return hit
        table = _read_run_object(self.store, key)
        present = [c for c in columns if c in table.column_names]
        table = table.select(present)
        with self._lock:
            self._cache[ck] = table
            self._cached_bytes += table.nbytes
            while self._cached_bytes > self.cache_bytes and len(self._cache) > 1:
                _, old = self._cache.popitem(last=False)
                self._cached_bytes -= old.nbytes
        return table


def _read_run_object(store: Store, final: str) -> pa.Table:
    """A committed run's object: at its final key, or, until the commit has published it, at
    its hidden one (the publisher deletes that only once the final one exists: hence the third
    try)."""
    for k in (final, unpublished_key(final), final):
        try:
            return store.read_parquet(k)
        except ObjectNotFound:
            continue
    raise ObjectNotFound(f"committed snapshot object {final!r} is missing")


def _fields_of(runs: list[RunManifest], service: str) -> dict[str, str]:
    """The latest frozen payload types of ``service`` that a committed run used."""
    best: tuple[int, dict[str, str]] = (-1, {})
    for m in runs:
        stats = m.services.get(service)
        if stats is not None and stats.types_version > best[0]:
            best = (stats.types_version, stats.columns)
    return dict(best[1])


def _as_us(at: pa.Array | np.ndarray | Sequence[int]) -> np.ndarray:
    if isinstance(at, pa.ChunkedArray):
        at = at.combine_chunks()
    if isinstance(at, pa.Array):
        if at.null_count:
            raise InvalidInput("at has nulls", field="at")
        if pa.types.is_timestamp(at.type):
            at = pc.cast(at, TIMESTAMP_TYPE).cast(pa.int64())
        out: np.ndarray = at.to_numpy(zero_copy_only=False).astype(np.int64)
        return out
    return np.asarray(at, dtype=np.int64)


def _cast_keys(keys: pa.Array, key_type: pa.DataType) -> pa.Array:
    if keys.type == key_type:
        return keys
    try:
        out: pa.Array = pc.cast(keys, key_type)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidInput(
            f"entity keys of type {keys.type} do not convert to the service's {key_type}",
            field="entity_id",
        ) from exc
    return out


def _row_columns(types: dict[str, str], raw_json: bool) -> list[str]:
    cols = [
        *_BASE_COLUMNS,
        "committed_at",
        "max_staleness_us",
        "tie",
        "run_id",
        "selection_id",
        *(column_name(f) for f in types),
    ]
    return [*cols, "raw_json"] if raw_json else cols


def _empty_rows(key_type: pa.DataType, types: dict[str, str], *, raw_json: bool) -> pa.Table:
    fields = [
        pa.field("entity_id", key_type),
        pa.field("captured_at", TIMESTAMP_TYPE),
        pa.field("status", pa.string()),
        pa.field("weight", pa.float64()),
        pa.field("committed_at", pa.int64()),
        pa.field("max_staleness_us", pa.int64()),
        pa.field("tie", pa.int64()),
        pa.field("run_id", pa.string()),
        pa.field("selection_id", pa.string()),
        *(pa.field(column_name(f), KINDS[k]) for f, k in types.items()),
    ]
    if raw_json:
        fields.append(pa.field("raw_json", pa.string()))
    return pa.schema(fields).empty_table()


def asof(
    rows: pa.Table,
    entities: pa.Array,
    at_us: np.ndarray,
    *,
    knowledge: Knowledge,
    types: dict[str, str],
    raw_json: bool = False,
) -> pa.Table:
    """The vectorized as-of kernel over loaded rows (see the module docstring).

    ``rows`` has ``entity_id``, ``captured_at``, ``status``, ``weight``, ``committed_at`` (µs),
    ``max_staleness_us``, ``tie`` (run order, for equal ``captured_at``), ``run_id``,
    ``selection_id``, the ``p_<field>`` columns of ``types`` and, if asked, ``raw_json``.
    """
    d = rows.num_rows
    q = len(entities)
    src = np.full(q, -1, dtype=np.int64)
    out_status = np.full(q, "not_sampled", dtype=object)
    age_s = np.zeros(q, dtype=np.float64)
    if d:
        src, out_status, age_s = _kernel(rows, entities, at_us, knowledge=knowledge)
    value_row = out_status == "ok"
    raw_row = value_row | (out_status == "missing")
    idx_any = pa.array(src, mask=src < 0, type=pa.int64())
    idx_value = pa.array(src, mask=~value_row, type=pa.int64())
    cols: dict[str, pa.Array | pa.ChunkedArray] = {
        "status": pa.array(out_status, pa.string()),
        "captured_at": rows.column("captured_at").take(idx_any),
        "age_s": pa.array(age_s, pa.float64(), mask=src < 0),
        "run_id": rows.column("run_id").take(idx_any),
        "selection_id": rows.column("selection_id").take(idx_any),
        "weight": rows.column("weight").take(idx_any),
    }
    if raw_json:
        idx_raw = pa.array(src, mask=~raw_row, type=pa.int64())
        cols["raw_json"] = rows.column("raw_json").take(idx_raw)
    payload = [_flat(rows.column(column_name(f)).take(idx_value)) for f in types]
    cols["payload"] = pa.StructArray.from_arrays(
        payload,
        fields=[pa.field(f, KINDS[k]) for f, k in types.items()],
        mask=pa.array(np.zeros(q, dtype=bool)),
    )
    return pa.table({k: _flat(v) for k, v in cols.items()})


def _flat(a: pa.Array | pa.ChunkedArray) -> pa.Array:
    return a.combine_chunks() if isinstance(a, pa.ChunkedArray) else a


def _kernel(
    rows: pa.Table, entities: pa.Array, at_us: np.ndarray, *, knowledge: Knowledge
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(source row or -1, status, age in seconds) per query, for a non-empty ``rows``."""
    d = rows.num_rows
    keys = pa.concat_arrays([
        _flat(rows.column("entity_id")),
        _cast_keys(entities, rows.schema.field("entity_id").type),
    ])
    codes = pc.dictionary_encode(keys).indices.to_numpy(zero_copy_only=False).astype(np.int64)
    d_code, q_code = codes[:d], codes[d:]
    cap = rows.column("captured_at").cast(pa.int64()).to_numpy(zero_copy_only=False)
    committed = rows.column("committed_at").to_numpy(zero_copy_only=False)
    visible_from = np.maximum(cap, committed) if knowledge == "as_known" else cap
    tie = rows.column("tie").to_numpy(zero_copy_only=False)
    status = rows.column("status").to_numpy(zero_copy_only=False).astype(object)
    good = (status == "ok") | (status == "missing")

    # "Latest" is by (captured_at, run order): rank every row once.
    by_latest = np.lexsort((tie, cap))
    rank = np.empty(d, dtype=np.int64)
    rank[by_latest] = np.arange(d)

    # Sort by (entity, visible-from). Entity segments are then contiguous and ascending, so a
    # running max of segment * (d + 1) + (rank + 1) never carries over from an earlier segment:
    # at every position it is the latest row seen so far in that entity (0: none).
    order = np.lexsort((rank, visible_from, d_code))
    seg = d_code[order]
    base = seg * (d + 1)
    best_good = np.maximum.accumulate(base + np.where(good[order], rank[order] + 1, 0)) - base - 1
    best_any = np.maximum.accumulate(base + rank[order] + 1) - base - 1

    # Each query's last visible row: one searchsorted on (entity, rank of visible-from).
    uniq_t, inv = np.unique(np.concatenate([visible_from, at_us]), return_inverse=True)
    width = len(uniq_t) + 1
    d_key = seg * width + inv[:d][order]
    q_key = q_code * width + inv[d:]
    j = np.searchsorted(d_key, q_key, side="right") - 1
    jc = np.clip(j, 0, d - 1)
    sampled = (j >= 0) & (seg[jc] == q_code)

    g_rank = np.where(sampled, best_good[jc], -1)
    a_rank = np.where(sampled, best_any[jc], -1)
    has_good = g_rank >= 0
    src_rank = np.where(has_good, g_rank, a_rank)
    src = np.where(src_rank >= 0, by_latest[np.clip(src_rank, 0, None)], -1)
    safe = np.clip(src, 0, None)

    out_status = np.full(len(at_us), "not_sampled", dtype=object)
    out_status[sampled & ~has_good] = "error"
    out_status[has_good] = status[src[has_good]]
    staleness = rows.column("max_staleness_us").to_numpy(zero_copy_only=False)
    out_status[has_good & (at_us - cap[safe] > staleness[safe])] = "stale"
    age_s = (at_us - cap[safe]) / US_PER_S
    return src, out_status, age_s
