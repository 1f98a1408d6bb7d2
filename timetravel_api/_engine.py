"""The point-in-time engine: query rows (entity, ``at``) and feature names in, an Arrow table out.

One call (:meth:`Engine.features`):

1. parses every name (unknown or malformed ones are all rejected before any work, snapshot
   fields included) and checks the entity key type;
2. per fact type, reads only what is needed: the date partitions from ``min(at)`` minus the
   largest window or lookback (no lower bound when one is unbounded) to ``max(at)``, only the
   queried entities (row groups of compacted files are pruned by their entity statistics), only
   the fields used, and in ``as_known`` mode nothing logged after ``max(at)``;
3. runs the fact kernels (:mod:`._partition`): in-process for small batches; for big ones per
   entity bucket over a process pool, or on Spark (:mod:`._spark`), where each worker reads its
   bucket's facts itself. Always the same pure function, so the answer is byte for byte the
   same;
4. reads snapshot features with the as-of snapshot reader (value, status, weight);
5. adds the completeness flag (producer watermarks), provenance on request, and the lineage.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from factlog import FactFile, FactReader, UnknownFactType, WatermarkCache
from snapshotter import SnapshotReader
from ttstore import Clock, InvalidInput, Store, SystemClock

from ._engine_io import (
    as_time_us,
    entity_array,
    fact_sources,
    lineage_files,
    provenance_struct,
)
from ._errors import InvalidFeature
from ._features import FeatureSpec, check_entity_types, parse_features
from ._kernels import KNOWLEDGE_MODES, UNBOUNDED_US, Knowledge
from ._partition import (
    SYSTEM_FACT_COLUMNS,
    FactGroup,
    PartitionPlan,
    compute_partition,
    run_pool,
)
from ._recent import RECENT_MAX_ROWS, found_everything, recent_plan

STATUSES = ("ok", "missing", "stale", "not_sampled", "error")
#: Batches at least this big go to the process pool (when there is more than one worker).
DEFAULT_PARALLEL_MIN_ROWS = 200_000
#: The process pool is used only when at most this share of the bytes to read is raw files.
RAW_SHARE_FOR_POOL = 0.25
#: Smaller batches also use the pool when they have this many rows and this much to read.
POOL_MIN_ROWS = 20_000
POOL_MIN_BYTES = 64 * 1024 * 1024
#: Distinct feature lists whose parsed form is kept (see :meth:`Engine.parse`).
_MAX_PARSED = 1024


@dataclass(frozen=True)
class FeatureResult:
    """The answer to one :meth:`Engine.features` call; every table is in query order.

    Attributes:
        values: one column per feature, named exactly as requested, in the requested order.
        status: the same columns, strings ``ok``, ``missing``, ``stale``, ``not_sampled``,
            ``error``.
        weight: 1/pi of the selection behind the snapshot rows used (null where not sampled),
            when snapshot features were requested; else None.
        complete: False when some ``at`` is later than the completeness watermark of a fact
            type used (facts may still be waiting in a live producer's spool).
        provenance: with ``provenance=True``, one struct column per feature: ``source`` (the
            fact file key or the snapshot ``run_id``), ``fact_id`` (facts), ``time`` (the fact's
            ``event_time`` or the snapshot's ``captured_at``) and ``age_s`` (``at`` minus that).
            For an aggregate it names the newest fact in its window. Else None.
        lineage: what was read: ``features``, ``knowledge``, ``fact_partitions`` and
            ``fact_files`` per fact type, ``snapshot_runs``, ``encoder_versions``, ``store``.
    """

    values: pa.Table
    status: pa.Table
    weight: pa.Array | None
    complete: bool
    provenance: pa.Table | None
    lineage: dict[str, Any] = field(default_factory=dict)


class Engine:
    """Reconstructs feature vectors as of past times, from a store's facts and snapshots.

    Args:
        store: the store, or its URL.
        repo: a feature repo (a loaded repo object, or a module path) for its fact types,
            services and encoders; optional.
        clock: "now", for the completeness flag (default: the system clock).
        workers: processes for big batches (default: the number of cores).
        parallel_min_rows: batches at least this big run in the process pool (smaller ones
            too from ``POOL_MIN_ROWS`` rows when there are ``POOL_MIN_BYTES`` to read), as long
            as the data is mostly compacted; online-sized lookups always run in-process.
        watermark_cache_s: how long one reading of the producer heartbeats (for the
            completeness flag) is reused; 0 (the default) reads them on every call. Fact
            objects are never cached: see :class:`factlog._heartbeat.WatermarkCache` for why a
            cached watermark is safe.

    Thread-safe for concurrent ``features`` calls.
    """

    def __init__(
        self, store: Store | str, *, repo: Any = None, clock: Clock | None = None,
        workers: int | None = None, parallel_min_rows: int = DEFAULT_PARALLEL_MIN_ROWS,
        watermark_cache_s: float = 0.0,
    ) -> None:
        self.store = store if isinstance(store, Store) else Store(store)
        self.clock = clock or SystemClock()
        self.workers = max(1, workers if workers is not None else (os.cpu_count() or 1))
        self.parallel_min_rows = parallel_min_rows
        self.facts = FactReader(self.store)
        self.snapshots = SnapshotReader(self.store)
        self.repo = load_repo(repo)
        if not watermark_cache_s >= 0:
            raise InvalidInput("watermark_cache_s must not be negative",
                               field="watermark_cache_s")
        self.watermarks = WatermarkCache(self.store, ttl_s=watermark_cache_s)
        self._parsed: dict[tuple[str, ...], tuple[float, list[FeatureSpec]]] = {}

    # -- names -----------------------------------------------------------------------------------
    def parse(self, names: Sequence[str]) -> list[FeatureSpec]:
        """Parse and check ``names`` (fact types and services as stored, plus the repo's).

        Raises:
            InvalidFeature: every malformed or unknown name, with its reason.
            EntityTypeMismatch: the features do not share one entity key type.
        """
        cache_key = tuple(names) if all(isinstance(n, str) for n in names) else None
        now = time.monotonic()
        hit = None if cache_key is None else self._parsed.get(cache_key)
        if hit is not None and now - hit[0] <= self.facts.schema_refresh_s:
            return list(hit[1])
        encoders = getattr(self.repo, "encoders", None) or {}
        specs = parse_features(
            names, fact_types=_FactTypes(self.facts, self.repo),
            services=_Services(self.snapshots, self.repo), encoders=encoders,
        )
        problems = []
        for s in specs:
            if s.kind == "snapshot":
                assert s.service is not None and s.field is not None
                known = self.snapshots.fields(s.service)
                if s.field not in known:
                    problems.append((s.name, f"service {s.service!r} has no field {s.field!r}"
                                             f" (fields: {', '.join(known) or 'none'})"))
        if problems:
            raise InvalidFeature(problems)
        if cache_key is not None and all(s.kind != "snapshot" for s in specs):
            # as fresh as the fact type schemas the reader itself trusts for that long; a
            # snapshot field's existence depends on committed runs, so those are not kept
            if len(self._parsed) >= _MAX_PARSED:
                self._parsed.clear()
            self._parsed[cache_key] = (now, specs)
        return specs

    # -- the query -------------------------------------------------------------------------------
    def features(
        self,
        entities: Any,
        at: Any,
        names: Sequence[str],
        *,
        knowledge: str = "as_known",
        provenance: bool = False,
        engine: str = "local",
        progress: Callable[[float], None] | None = None,
    ) -> FeatureResult:
        """The feature vector of each (entity, ``at``) as of ``at`` (SPEC §3, §4).

        Args:
            entities: the entity keys (pyarrow array or list; int64 or string, the features'
                key type).
            at: the query times: a ``timestamp`` array with a time zone (any unit), int64
                microseconds since the epoch, or one such value for every row.
            names: feature names, in output order.
            knowledge: ``as_known`` (only what was logged by ``at``) or ``event``.
            provenance: also return where every value came from.
            engine: ``local`` (in-process or a process pool) or ``spark``.
            progress: called with the fraction done (0.0 to 1.0) as partitions finish.

        Returns:
            A :class:`FeatureResult`.

        Raises:
            InvalidFeature: malformed or unknown names (all listed), before any work.
            EntityTypeMismatch: features of different key types, or keys of the wrong type.
            InvalidInput: a naive or out-of-range ``at``, lengths that differ, a bad
                ``knowledge``, or snapshot features from different selections in one row.
            StoreUnavailable: the store could not be read.
        """
        if knowledge not in KNOWLEDGE_MODES:
            raise InvalidInput(f"knowledge must be one of {', '.join(KNOWLEDGE_MODES)}, "
                               f"not {knowledge!r}", field="knowledge")
        if engine not in ("local", "spark"):
            raise InvalidInput(f"engine must be local or spark, not {engine!r}", field="engine")
        specs = self.parse(names)
        etype = check_entity_types(specs)
        ent = entity_array(entities, etype)
        at_us = as_time_us(at, len(ent))
        kn: Knowledge = "as_known" if knowledge == "as_known" else "event"
        plan = self._plan(specs, ent.type, at_us, kn, provenance)
        lineage: dict[str, Any] = {
            "features": [s.name for s in specs], "knowledge": kn, "store": self.store.url,
            "fact_partitions": {}, "fact_files": {}, "snapshot_runs": [],
            "encoder_versions": {},
        }
        queries = pa.Table.from_arrays(
            [pa.array(np.arange(len(ent), dtype=np.int64)), ent, pa.array(at_us, pa.int64())],
            schema=plan.query_schema())
        recent = None
        if (engine == "local" and 0 < len(ent) <= RECENT_MAX_ROWS and plan.groups
                and (len(ent) == 1 or len(pc.unique(ent)) == 1)):
            recent = recent_plan(plan, int(at_us.min()))
        if recent is not None:
            # one entity: its last values are most likely in its newest facts (see _recent)
            short_lineage = {**lineage, "fact_partitions": {}, "fact_files": {}}
            listed = self._list(recent, short_lineage)
            wire = compute_partition(self._read_facts(recent, ent, listed, short_lineage),
                                     queries, recent)
            if found_everything(recent, plan, wire, int(at_us.min())):
                if progress is not None:
                    progress(1.0)
                return self._assemble(specs, recent, ent, at_us, wire, short_lineage)
        # One listing per fact type and call: the lineage, the pool decision and the scan all
        # use it (it is made now, so it shows every object flushed or committed before).
        listed = self._list(plan, lineage)
        total_bytes = sum(f.size for files in listed.values() for f in files)
        raw_bytes = sum(f.size for files in listed.values() for f in files
                        if f.kind != "compacted")
        if not plan.groups:
            wire = plan.wire_schema().empty_table()
        elif engine == "spark":
            from ._spark import run_spark  # noqa: PLC0415

            wire = run_spark(self.store.url, queries, plan, workers=self.workers)
        elif (self.workers > 1 and raw_bytes <= RAW_SHARE_FOR_POOL * total_bytes
              and (len(ent) >= self.parallel_min_rows
                   or (len(ent) >= POOL_MIN_ROWS and total_bytes >= POOL_MIN_BYTES))):
            # Each worker reads its own entity range: only its row groups of compacted files,
            # but every raw (unsorted) file whole; so mostly-raw data stays in-process.
            wire = run_pool(self.store.url, queries, plan, workers=self.workers,
                            progress=progress)
        else:
            wire = compute_partition(self._read_facts(plan, ent, listed, lineage), queries,
                                     plan)
        if progress is not None:
            progress(1.0)
        return self._assemble(specs, plan, ent, at_us, wire, lineage)

    def _list(self, plan: PartitionPlan, lineage: dict[str, Any]) -> dict[str, list[FactFile]]:
        listed: dict[str, list[FactFile]] = {}
        for g in plan.groups:
            files = listed[g.fact_type] = self.facts.live_files(
                g.fact_type, start_us=g.start_us, end_us=g.end_us)
            _set_lineage(lineage, g.fact_type, files)
        return listed

    def _plan(
        self, specs: Sequence[FeatureSpec], entity_type: pa.DataType, at_us: np.ndarray,
        knowledge: Knowledge, provenance: bool,
    ) -> PartitionPlan:
        by_type: dict[str, list[tuple[int, FeatureSpec]]] = {}
        for i, s in enumerate(specs):
            if s.fact_type is not None and s.kind != "snapshot" and s.kind != "encoder":
                by_type.setdefault(s.fact_type, []).append((i, s))
        lo = int(at_us.min()) if len(at_us) else 0
        hi = int(at_us.max()) if len(at_us) else 0
        groups = []
        for name, items in by_type.items():
            ft = self.facts.fact_type(name)
            hist = [s.history_us for _, s in items]
            unbounded = any(h is None or h >= UNBOUNDED_US for h in hist)
            start = None if unbounded else lo - max(int(h) for h in hist if h is not None)
            fields = sorted({s.field for _, s in items if s.field is not None})
            system = SYSTEM_FACT_COLUMNS if provenance else SYSTEM_FACT_COLUMNS[1:]
            cols = (ft.entity_name, *system, *fields)  # fact_id only names provenance
            groups.append(FactGroup(
                fact_type=name, entity_col=ft.entity_name, lookback_us=ft.lookback_us,
                specs=tuple(s for _, s in items), indices=tuple(i for i, _ in items),
                columns=cols, start_us=start, end_us=hi,
                logged_before_us=hi if knowledge == "as_known" else None,
            ))
        return PartitionPlan(groups=tuple(groups), knowledge=knowledge, provenance=provenance,
                             entity_type=entity_type)

    def _read_facts(
        self, plan: PartitionPlan, ent: pa.Array, listed: Mapping[str, list[FactFile]],
        lineage: dict[str, Any],
    ) -> dict[str, pa.Table]:
        uniq = ent if len(ent) == 1 else pc.unique(ent)
        out: dict[str, pa.Table] = {}
        for g in plan.groups:
            out[g.fact_type], files = self.facts.scan_with_files(
                g.fact_type, entities=uniq, start_us=g.start_us, end_us=g.end_us,
                logged_before_us=g.logged_before_us, columns=list(g.columns),
                files=listed[g.fact_type],
            )
            if len(uniq) and files != listed[g.fact_type]:
                _set_lineage(lineage, g.fact_type, files)  # the scan had to list again
        return out

    # -- assembling the answer -------------------------------------------------------------------
    def _assemble(
        self, specs: Sequence[FeatureSpec], plan: PartitionPlan, ent: pa.Array,
        at_us: np.ndarray, wire: pa.Table, lineage: dict[str, Any],
    ) -> FeatureResult:
        n = len(ent)
        values: dict[str, pa.Array] = {}
        status: dict[str, pa.Array] = {}
        prov: dict[str, pa.Array] = {}
        for i, s in enumerate(specs):
            if s.kind in ("fact_field", "fact_count", "time_since_last"):
                assert s.output_type is not None
                col = _one_array(wire.column(f"v{i}"))
                values[s.name] = col if col.type == s.output_type else col.cast(s.output_type)
                status[s.name] = _one_array(wire.column(f"s{i}"))
        if plan.provenance and plan.groups:
            sources = fact_sources(self.facts, plan, wire, pc.unique(ent))
            for g in plan.groups:
                for i in g.indices:
                    ids = wire.column(f"p{i}_id").combine_chunks()
                    ev = wire.column(f"p{i}_ev").combine_chunks()
                    src = sources[g.fact_type]
                    keys = pc.index_in(ids, value_set=src[0]) if len(src[0]) else None
                    source = (src[1].take(keys) if keys is not None
                              else pa.nulls(n, pa.string()))
                    prov[specs[i].name] = provenance_struct(source, ids, ev, at_us)

        encs = [s for s in specs if s.kind == "encoder"]
        snapshot_rows: list[pa.Table] = []
        if encs:
            from ._engine_encoders import encoder_columns  # noqa: PLC0415

            got, snapshot_rows = encoder_columns(self.facts, self.snapshots, encs, ent, at_us,
                                                 knowledge=plan.knowledge, lineage=lineage)
            for s in encs:
                vals, st = got[s.name]
                values[s.name] = vals
                status[s.name] = pa.array(st, pa.string())
                if plan.provenance:
                    version = lineage["encoder_versions"][s.name]
                    prov[s.name] = provenance_struct(
                        pa.array([f"encoder:{s.name}@{version}"] * n, pa.string()),
                        pa.nulls(n, pa.string()), pa.nulls(n, pa.int64()), at_us)
        snap = [(i, s) for i, s in enumerate(specs) if s.kind == "snapshot"]
        if snap:
            snapshot_rows += self._snapshots(snap, ent, at_us, plan, values, status, prov,
                                             lineage)
        weight = design_weight(snapshot_rows, len(ent)) if uses_snapshots(specs) else None
        used = [g.fact_type for g in plan.groups]
        used += [ft for s in encs for ft in s.encoder.fact_types if ft not in used]
        complete = self._complete(used, at_us)
        names = [s.name for s in specs]
        return FeatureResult(
            values=pa.table([values[k] for k in names], names=names),
            status=pa.table([status[k] for k in names], names=names),
            weight=weight,
            complete=complete,
            provenance=pa.table([prov[k] for k in names], names=names) if plan.provenance
            else None,
            lineage=lineage,
        )

    def _snapshots(
        self, snap: Sequence[tuple[int, FeatureSpec]], ent: pa.Array, at_us: np.ndarray,
        plan: PartitionPlan, values: dict[str, pa.Array], status: dict[str, pa.Array],
        prov: dict[str, pa.Array], lineage: dict[str, Any],
    ) -> list[pa.Table]:
        by_service: dict[str, list[FeatureSpec]] = {}
        for _, s in snap:
            assert s.service is not None
            by_service.setdefault(s.service, []).append(s)
        n = len(ent)
        tables: list[pa.Table] = []
        runs: set[str] = set(lineage["snapshot_runs"])
        for service, ss in by_service.items():
            fields = list(dict.fromkeys(s.field for s in ss if s.field is not None))
            t = self.snapshots.read(service, ent, at_us, knowledge=plan.knowledge,
                                    fields=fields)
            st = t.column("status").combine_chunks()
            for s in ss:
                payload = t.column("payload").combine_chunks()
                values[s.name] = pc.struct_field(payload, s.field)
                status[s.name] = st
                if plan.provenance:
                    cap = t.column("captured_at").combine_chunks()
                    prov[s.name] = provenance_struct(
                        t.column("run_id").combine_chunks(), pa.nulls(n, pa.string()),
                        cap.cast(pa.int64()), at_us)
            tables.append(t)
            runs.update(r for r in pc.unique(t.column("run_id")).to_pylist() if r is not None)
        lineage["snapshot_runs"] = sorted(runs)
        return tables

    def _complete(self, fact_types: Sequence[str], at_us: np.ndarray) -> bool:
        if not fact_types or not len(at_us):
            return True
        marks = self.watermarks.watermarks(now_us=self.clock.now_us())
        newest = int(at_us.max())
        for ft in fact_types:
            wm = marks.get(ft)
            if wm is not None and newest > wm:
                return False
        return True


def _one_array(col: pa.ChunkedArray) -> pa.Array:
    return col.chunk(0) if col.num_chunks == 1 else col.combine_chunks()


def _set_lineage(lineage: dict[str, Any], fact_type: str, files: Sequence[FactFile]) -> None:
    parts, keys = lineage_files(files)
    lineage["fact_partitions"][fact_type] = parts
    lineage["fact_files"][fact_type] = keys


# -- name resolution -----------------------------------------------------------------------------


class _FactTypes(Mapping[str, Any]):
    """The fact types ``parse_features`` may look up: the store's catalog, then the repo's."""

    def __init__(self, reader: FactReader, repo: Any) -> None:
        self._reader = reader
        self._repo = dict(getattr(repo, "fact_types", None) or {})

    def __getitem__(self, name: str) -> Any:
        try:
            return self._reader.fact_type(name)
        except UnknownFactType:
            if name in self._repo:
                return self._repo[name]
            raise KeyError(name) from None
        except InvalidInput:
            raise KeyError(name) from None

    def __iter__(self) -> Iterator[str]:
        return iter(sorted({*self._reader.catalog.names(), *self._repo}))

    def __len__(self) -> int:
        return len(list(iter(self)))


class _Services(Mapping[str, Any]):
    """Snapshot services: name → ``{"entity_type": ...}``, from the repo, then the committed
    runs (listed only when a snapshot feature is asked for)."""

    def __init__(self, reader: SnapshotReader, repo: Any) -> None:
        self._reader = reader
        self._repo: dict[str, str] = {
            name: str(getattr(cfg, "entity_type", "int64"))
            for name, cfg in (getattr(repo, "services", None) or {}).items()
        }
        self._types: dict[str, str] | None = None

    def __bool__(self) -> bool:
        # ``parse_features`` tests ``services or {}``; Mapping's truth would call __len__ and
        # list every snapshot run, even for fact-only names.
        return True

    def _all(self) -> dict[str, str]:
        if self._types is None:
            types = dict(self._repo)
            for m in self._reader.runs():
                for name, stats in m.services.items():
                    types[name] = str(stats.config.get("entity_type", "int64"))
            self._types = types
        return self._types

    def __getitem__(self, name: str) -> Any:
        return {"entity_type": self._all()[name]}

    def __iter__(self) -> Iterator[str]:
        return iter(self._all())

    def __len__(self) -> int:
        return len(self._all())


def load_repo(repo: Any) -> Any:
    """A feature repo object from ``repo`` (None, a loaded repo, or a module path)."""
    if repo is None or not isinstance(repo, str | os.PathLike):
        return repo
    try:
        from ._repo import FeatureRepo  # type: ignore[import-not-found,unused-ignore]  # noqa: PLC0415
    except ImportError as exc:
        raise InvalidInput("feature repos are not available in this build", field="repo") \
            from exc
    return FeatureRepo.load(os.fspath(repo))


def uses_snapshots(specs: Sequence[FeatureSpec]) -> bool:
    """Whether any feature reads snapshot rows: ``snapshot.S.F``, or an encoder with snapshot
    inputs. Such requests carry the design ``weight`` (SPEC §7)."""
    return any(s.kind == "snapshot" or (s.kind == "encoder" and bool(s.encoder.services))
               for s in specs)


def design_weight(snapshot_rows: Sequence[pa.Table], n: int) -> pa.Array:
    """1/pi of the selection behind each row's snapshot rows (null where not sampled).

    Raises:
        InvalidInput: one row's snapshot rows come from different selections.
    """
    weight = pa.nulls(n, pa.float64())
    selection = pa.nulls(n, pa.string())
    for t in snapshot_rows:
        sel = t.column("selection_id").combine_chunks()
        both = pc.and_(pc.is_valid(sel), pc.is_valid(selection))
        clash = pc.and_(both, pc.not_equal(sel, selection))
        if pc.any(clash).as_py():
            row = int(np.flatnonzero(clash.to_numpy(zero_copy_only=False))[0])
            raise InvalidInput(
                f"snapshot features come from different selections in row {row} "
                f"({selection[row].as_py()} and {sel[row].as_py()}); request features "
                "of one selection", field="features")
        selection = pc.coalesce(selection, sel)
        weight = pc.coalesce(weight, t.column("weight").combine_chunks())
    return weight
