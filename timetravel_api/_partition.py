"""The engine's unit of parallel work: one entity-hash bucket, Arrow in, Arrow out.

:func:`compute_partition` is a pure function: the facts of each fact type for a set of entities
(sorted as :meth:`factlog.FactReader.scan` returns them) plus the query rows of those entities
in, one value and one status column per fact feature out, keyed by the query row number. It
touches no store and holds no state, so the same call runs in-process, in a process pool, and
inside Spark's ``mapInArrow`` (where :func:`read_and_compute` first reads the bucket's facts
through the store). The kernels compute each entity from its own facts only, so how rows are
bucketed never changes an answer, and results come back byte for byte the same.

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

#: Seed of the entity-hash bucketing (any fixed value; buckets never change answers).
BUCKET_SEED = 0x7174_7469_6D65
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
        """The schema :func:`compute_partition` returns."""
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
            cols[f"v{i}"] = values.cast(wire_type(s.output_type))
            cols[f"s{i}"] = pa.array(col.status, pa.string())
            if plan.provenance:
                idx = out[aux[i].name].fact_index if i in aux else col.fact_index
                assert idx is not None
                mask = idx < 0
                take = pa.array(np.where(mask, 0, idx), mask=mask)
                cols[f"p{i}_id"] = table.column("fact_id").combine_chunks().take(take)
                cols[f"p{i}_ev"] = (table.column("event_time").combine_chunks()
                                    .cast(pa.int64()).take(take))
    return pa.table(cols, schema=plan.wire_schema())


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


def bucket_of(entities: pa.Array | pa.ChunkedArray, n_buckets: int) -> np.ndarray:
    """The entity-hash bucket (0 .. n_buckets-1) of every key; the same in every process."""
    from snapshotter import entity_hash  # noqa: PLC0415  (a heavy import; only when bucketing)

    if n_buckets <= 1:
        return np.zeros(len(entities), dtype=np.int64)
    h = entity_hash(entities, BUCKET_SEED)
    out: np.ndarray = (h % np.uint64(n_buckets)).astype(np.int64)
    return out


def split_by_bucket(table: pa.Table, buckets: np.ndarray, n_buckets: int) -> list[pa.Table]:
    """``table``'s rows per bucket, each keeping the table's row order."""
    order = np.argsort(buckets, kind="stable")
    bounds = np.searchsorted(buckets[order], np.arange(n_buckets + 1), side="left")
    taken = table.take(pa.array(order))
    return [taken.slice(int(bounds[b]), int(bounds[b + 1] - bounds[b]))
            for b in range(n_buckets)]


def _compute_task(args: tuple[dict[str, pa.Table], pa.Table, PartitionPlan]) -> pa.Table:
    facts, queries, plan = args
    return compute_partition(facts, queries, plan)


def run_partitions(
    facts: Mapping[str, pa.Table],
    queries: pa.Table,
    plan: PartitionPlan,
    *,
    workers: int,
    parallel: bool,
    progress: Callable[[float], None] | None = None,
) -> pa.Table:
    """Run :func:`compute_partition` over all ``queries``: in-process, or split into
    entity-hash buckets over a spawn-context process pool of ``workers``.

    Returns:
        The wire table in query order (sorted by ``__row``).
    """
    if not parallel or workers <= 1 or queries.num_rows == 0:
        out = compute_partition(facts, queries, plan)
        if progress is not None:
            progress(1.0)
        return out
    n_buckets = workers * 2
    q_parts = split_by_bucket(queries, bucket_of(queries.column(ENTITY), n_buckets), n_buckets)
    f_parts = {
        name: split_by_bucket(t, bucket_of(t.column(_entity_col(plan, name)), n_buckets),
                              n_buckets)
        for name, t in facts.items()
    }
    tasks = [({name: parts[b] for name, parts in f_parts.items()}, q_parts[b], plan)
             for b in range(n_buckets) if q_parts[b].num_rows]
    results: list[pa.Table] = []
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
        for k, res in enumerate(pool.map(_compute_task, tasks)):
            results.append(res)
            if progress is not None:
                progress((k + 1) / len(tasks))
    return restore_order(results, plan)


def restore_order(parts: Iterable[pa.Table], plan: PartitionPlan) -> pa.Table:
    """Concatenate partition outputs and put the rows back in query order."""
    table = pa.concat_tables(list(parts) or [plan.wire_schema().empty_table()])
    rows = table.column(ROW).to_numpy()
    return table.take(pa.array(np.argsort(rows, kind="stable"))).combine_chunks()


def _entity_col(plan: PartitionPlan, fact_type: str) -> str:
    for g in plan.groups:
        if g.fact_type == fact_type:
            return g.entity_col
    raise KeyError(fact_type)


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
    reader = FactReader(Store(store_url))
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
