"""The engine's unit of parallel work: one entity bucket, Arrow in, Arrow out.

:func:`compute_partition` is a pure function: the facts of each fact type for a set of entities
(sorted as :meth:`factlog.FactReader.scan` returns them) plus the query rows of those entities
in, one value and one status column per fact feature out, keyed by the query row number. It
touches no store and holds no state, so the same call runs in-process, in a process pool, and
inside Spark's ``mapInArrow``; in a pool worker or a Spark executor :func:`read_and_compute`
first reads the bucket's facts through the store (buckets are entity ranges, see
:func:`entity_buckets`, so a worker reads only its own row groups of compacted files). The
kernels compute each entity from its own facts only, so how rows are bucketed never changes an
answer, and results come back byte for byte the same.

The "wire" table (what a partition returns) has columns ``__row`` (int64, the query row), then
for feature number ``i`` (its position in the request): ``v<i>`` (the value; timestamps as
int64 µs so every engine can carry it), ``s<i>`` (status string) and, with provenance,
``p<i>_id`` (the fact_id the value came from, or of the newest fact behind an aggregate) and
``p<i>_ev`` (its event_time, int64 µs).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from typing import Any

import numpy as np
import pyarrow as pa

from ._features import FeatureSpec, output_type
from ._kernels import Knowledge, fact_feature_columns

ROW = "__row"
ENTITY = "entity"
AT = "at"
SYSTEM_FACT_COLUMNS = ("fact_id", "event_time", "logged_at")


@dataclass(frozen=True)
class FactGroup:
    """The features of one fact type in a request, and the facts they need.

    Attributes:
        fact_type: the fact type name.
        entity_col: its entity key column.
        lookback_us: its lookback (None: unbounded).
        specs: its features, in request order.
        indices: each spec's position in the request.
        columns: the fact columns to read (entity, system columns, fields used).
        start_us: the oldest ``event_time`` any query can see (None: all history).
        end_us: the newest ``event_time`` any query can see.
        logged_before_us: in ``as_known`` mode, the newest ``logged_at`` any query can see.
    """

    fact_type: str
    entity_col: str
    lookback_us: int | None
    specs: tuple[FeatureSpec, ...]
    indices: tuple[int, ...]
    columns: tuple[str, ...]
    start_us: int | None = None
    end_us: int | None = None
    logged_before_us: int | None = None


@dataclass(frozen=True)
class PartitionPlan:
    """Everything a partition needs besides its data (picklable)."""

    groups: tuple[FactGroup, ...]
    knowledge: Knowledge
    provenance: bool
    entity_type: pa.DataType

    def wire_schema(self) -> pa.Schema:
        """The schema :func:`compute_partition` returns (one object per distinct layout)."""
        key = (self.provenance, tuple((g.indices, tuple(s.output_type for s in g.specs))
                                      for g in self.groups))
        hit = _WIRE_SCHEMAS.get(key)
        if hit is None:
            hit = self._build_wire_schema()
            if len(_WIRE_SCHEMAS) >= 1024:
                _WIRE_SCHEMAS.clear()
            _WIRE_SCHEMAS[key] = hit
        return hit

    def _build_wire_schema(self) -> pa.Schema:
        fields = [pa.field(ROW, pa.int64())]
        for g in self.groups:
            for i, s in zip(g.indices, g.specs, strict=True):
                assert s.output_type is not None
                fields.append(pa.field(f"v{i}", wire_type(s.output_type)))
                fields.append(pa.field(f"s{i}", pa.string()))
                if self.provenance:
                    fields.append(pa.field(f"p{i}_id", pa.string()))
                    fields.append(pa.field(f"p{i}_ev", pa.int64()))
        return pa.schema(fields)

    def query_schema(self) -> pa.Schema:
        return pa.schema([pa.field(ROW, pa.int64()), pa.field(ENTITY, self.entity_type),
                          pa.field(AT, pa.int64())])


_STATUS_VALUES = pa.array(["ok", "missing"], pa.string())
_ONE_OK = pa.array(["ok"], pa.string())
_ONE_MISSING = pa.array(["missing"], pa.string())


def status_array(status: np.ndarray) -> pa.Array:
    """The kernels' ``ok``/``missing`` status strings as an Arrow string array (by dictionary
    codes: no per-row string conversion)."""
    if len(status) == 1:  # an online lookup: immutable one-row arrays, made once
        return _ONE_OK if status[0] == "ok" else _ONE_MISSING
    codes = (status != "ok").astype(np.int8)
    return _STATUS_VALUES.take(pa.array(codes))


_WIRE_SCHEMAS: dict[Any, pa.Schema] = {}


def wire_type(t: pa.DataType) -> pa.DataType:
    return pa.int64() if pa.types.is_timestamp(t) else t


def compute_partition(
    facts: Mapping[str, pa.Table], queries: pa.Table, plan: PartitionPlan
) -> pa.Table:
    """The fact features of ``queries`` (columns ``__row``, ``entity``, ``at`` int64 µs).

    Args:
        facts: fact type → its facts for (at least) the queries' entities within the plan's
            time bounds, deduplicated and sorted by (entity, event_time, logged_at, fact_id).
        queries: the query rows of this partition.
        plan: the features and knowledge mode.

    Returns:
        The wire table (see the module docstring), rows in the order of ``queries``.
    """
    ent = queries.column(ENTITY).combine_chunks()
    at = queries.column(AT).combine_chunks().to_numpy(zero_copy_only=False).astype(np.int64)
    cols: dict[str, pa.Array] = {ROW: queries.column(ROW).combine_chunks()}
    for g in plan.groups:
        table = facts[g.fact_type]
        specs = list(g.specs)
        aux: dict[int, FeatureSpec] = {}
        if plan.provenance:
            aux = {i: a for i, s in zip(g.indices, specs, strict=True)
                   if (a := _provenance_spec(s, i)) is not None}
        out = fact_feature_columns(
            table, [*specs, *aux.values()], ent, at, knowledge=plan.knowledge,
            lookback_us=g.lookback_us, entity_col=g.entity_col, provenance=plan.provenance,
        )
        for i, s in zip(g.indices, specs, strict=True):
            col = out[s.name]
            assert s.output_type is not None
            values = col.values
            if values.type != s.output_type:
                values = values.cast(s.output_type)
            wire = wire_type(s.output_type)
            cols[f"v{i}"] = values if values.type == wire else values.cast(wire)
            cols[f"s{i}"] = status_array(col.status)
            if plan.provenance:
                idx = out[aux[i].name].fact_index if i in aux else col.fact_index
                assert idx is not None
                mask = idx < 0
                take = pa.array(np.where(mask, 0, idx), mask=mask)
                cols[f"p{i}_id"] = table.column("fact_id").combine_chunks().take(take)
                cols[f"p{i}_ev"] = (table.column("event_time").combine_chunks()
                                    .cast(pa.int64()).take(take))
    schema = plan.wire_schema()
    return pa.Table.from_arrays([cols[n] for n in schema.names], schema=schema)


def _provenance_spec(spec: FeatureSpec, i: int) -> FeatureSpec | None:
    """For an aggregate, the spec whose fact index names the newest fact behind the value:
    the last non-null value of the field (or the last fact) in the same window."""
    if spec.kind == "time_since_last" or spec.agg in ("first", "last"):
        return None  # the kernel reports the fact itself
    name = f"\0prov{i}"
    if spec.kind == "fact_count":
        return dataclasses.replace(spec, name=name, kind="time_since_last",
                                   output_type=pa.float64(), agg="last")
    assert spec.field_type is not None
    return dataclasses.replace(spec, name=name, agg="last",
                               output_type=output_type("last", spec.field_type))


def entity_buckets(entities: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """The bucket (0 .. n_buckets-1) of every key: contiguous ranges of the sorted keys, with
    about as many query rows in each.

    Ranges rather than hashes, because compacted fact files are sorted by entity: a bucket's
    facts then sit in a few row groups, which a worker reads alone (row groups are chosen by
    their entity statistics). Every copy of one key lands in one bucket, and buckets never
    change an answer (each entity is computed from its own facts only).
    """
    arr = entities.combine_chunks() if isinstance(entities, pa.ChunkedArray) else entities
    m = len(arr)
    if n_buckets <= 1 or m == 0:
        return np.zeros(m, dtype=np.int64)
    keys = np.asarray(arr.to_numpy(zero_copy_only=False))
    ordered = np.sort(keys, kind="stable")
    cuts = ordered[(np.arange(1, n_buckets) * m) // n_buckets]
    out: np.ndarray = np.searchsorted(cuts, keys, side="right").astype(np.int64)
    return out


def split_by_bucket(table: pa.Table, buckets: np.ndarray, n_buckets: int) -> list[pa.Table]:
    """``table``'s rows per bucket, each keeping the table's row order."""
    order = np.argsort(buckets, kind="stable")
    bounds = np.searchsorted(buckets[order], np.arange(n_buckets + 1), side="left")
    taken = table.take(pa.array(order))
    return [taken.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b]))
            for b in range(n_buckets)]


def _pool_task(args: tuple[str, PartitionPlan, pa.Table]) -> pa.Table:
    store_url, plan, queries = args
    out = list(read_and_compute(store_url, plan, queries.to_batches()))
    return pa.Table.from_batches(out, schema=plan.wire_schema())


def run_pool(
    store_url: str,
    queries: pa.Table,
    plan: PartitionPlan,
    *,
    workers: int,
    progress: Callable[[float], None] | None = None,
) -> pa.Table:
    """Run :func:`read_and_compute` per entity bucket over a spawn-context process pool of
    ``workers``: each worker reads its own bucket's facts and computes its features.

    Returns:
        The wire table in query order (sorted by ``__row``).
    """
    # a few buckets per worker: finer progress and load balance; each still reads only its
    # own row groups of compacted files
    n_buckets = max(1, workers) * 4
    parts = split_by_bucket(queries, entity_buckets(queries.column(ENTITY), n_buckets),
                            n_buckets)
    tasks = [(store_url, plan, q) for q in parts if q.num_rows]
    results: list[pa.Table] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for k, res in enumerate(pool.map(_pool_task, tasks)):
            results.append(res)
            if progress is not None:
                progress((k + 1) / len(tasks))
    return restore_order(results, plan)


def restore_order(parts: Iterable[pa.Table], plan: PartitionPlan) -> pa.Table:
    """Concatenate partition outputs and put the rows back in query order."""
    table = pa.concat_tables(list(parts) or [plan.wire_schema().empty_table()])
    rows = table.column(ROW).to_numpy()
    return table.take(pa.array(np.argsort(rows, kind="stable"))).combine_chunks()


_READERS: dict[str, Any] = {}


def read_and_compute(
    store_url: str, plan: PartitionPlan, batches: Iterable[pa.RecordBatch]
) -> Iterable[pa.RecordBatch]:
    """The Spark executor side: read this partition's facts through the store (only its
    entities, only the plan's time range), then :func:`compute_partition`.

    ``batches`` carry the query columns (``__row``, ``entity``, ``at``); the output batches are
    in the wire schema.
    """
    from factlog import FactReader  # noqa: PLC0415
    from ttstore import Store  # noqa: PLC0415

    qs = [b.select([ROW, ENTITY, AT]) for b in batches]
    queries = (pa.Table.from_batches(qs) if qs else plan.query_schema().empty_table())
    if queries.num_rows == 0:
        return
    reader = _READERS.get(store_url)
    if reader is None:  # one per process: footers and commit records stay cached across tasks
        reader = _READERS[store_url] = FactReader(Store(store_url))
    facts = read_group_facts(reader, plan.groups, queries.column(ENTITY))
    yield from compute_partition(facts, queries, plan).to_batches()


def read_group_facts(
    reader: Any, groups: Sequence[FactGroup], entities: pa.Array | pa.ChunkedArray
) -> dict[str, pa.Table]:
    """Each group's facts for ``entities`` within its bounds, through a ``FactReader``."""
    import pyarrow.compute as pc  # noqa: PLC0415

    ent = pc.unique(entities.combine_chunks() if isinstance(entities, pa.ChunkedArray)
                    else entities)
    return {
        g.fact_type: reader.scan(
            g.fact_type, entities=ent, start_us=g.start_us, end_us=g.end_us,
            logged_before_us=g.logged_before_us, columns=list(g.columns),
        )
        for g in groups
    }
