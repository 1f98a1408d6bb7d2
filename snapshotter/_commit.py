"""Committing a shard's part, then the run.

A shard's part manifest (create-if-absent, under ``_staging``) lists its staged chunks. When
every shard's part is committed, whoever notices first (the last shard to finish, or any later
``snapshot run`` or scheduler tick for that slot) commits the run:

1. freeze each service's payload types (``_typing.freeze_types``);
2. write the staged chunks, conformed to those types, as the run's final objects, each under
   ``_publish`` (hidden from external readers): consecutive chunks of a shard gathered up to
   ``FINAL_OBJECT_ROWS`` rows an object, one row group per chunk, sorted by entity (the
   selection is sorted, so chunks are ranges of entities), written one chunk at a time
   (create-if-absent; an object left by an interrupted commit is kept);
3. create the run manifest, with ``committed_at`` from the clock: the commit point;
4. publish: copy each object to its final key (create-if-absent), then delete the hidden copy;
5. delete the staging prefix.

Until step 3 nothing of the run is outside a ``_`` path component, so a run killed at any
moment before its commit (fetching, staging, or writing its objects) leaves nothing that
Spark, Trino, DuckDB or ``pyarrow.dataset`` would read. Our reader reads only the objects a
manifest lists, from the final key or, until it is published, from the hidden one; so a run
is visible to it from the commit on. A crash between steps 3 and 4 leaves a committed run that
external readers do not see yet: the next ``snapshot run`` or scheduler tick for the slot
publishes it (:func:`publish_run` is idempotent), and the data was committed data all along.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ttstore import (
    Clock,
    ObjectExists,
    ObjectNotFound,
    Store,
    format_timestamp,
    parse_duration,
)

from ._errors import RunAlreadyCommitted
from ._manifest import (
    DEFAULT_MAX_STALENESS,
    PUBLISH_PREFIX,
    STAGING_PREFIX,
    PartManifest,
    RunManifest,
    RunPlan,
    ServiceRunStats,
    StagedChunk,
    data_key,
    manifest_key,
    parse_slot_name,
    part_key,
    staging_prefix,
    unpublished_key,
)
from ._stage import parquet_options
from ._typing import conform, freeze_types

#: Committed objects gather consecutive staged chunks up to about this many rows, so a run of
#: 1M contexts is tens of objects per service, not hundreds.
FINAL_OBJECT_ROWS = 25_000


def commit_part(
    store: Store, plan: RunPlan, shard: int, chunks: dict[str, list[StagedChunk]], clock: Clock
) -> PartManifest:
    """Commit one shard's part (create-if-absent). If it was committed already, that part
    stands and is returned."""
    part = PartManifest(
        run_id=plan.run_id,
        slot_us=plan.slot_us,
        shard=shard,
        shards=plan.shards,
        committed_at_us=clock.now_us(),
        chunks=chunks,
    )
    k = part_key(plan.slot_us, shard, plan.shards)
    try:
        store.put_if_absent(k, part.to_json())
    except ObjectExists:
        return PartManifest.from_json(store.get(k))
    return part


def committed_parts(store: Store, plan: RunPlan) -> dict[int, PartManifest]:
    """The shards of ``plan`` whose parts are committed."""
    out = {}
    for i in range(plan.shards):
        try:
            out[i] = PartManifest.from_json(store.get(part_key(plan.slot_us, i, plan.shards)))
        except ObjectNotFound:
            continue
    return out


def max_staleness_us(config: dict[str, object]) -> int:
    """A service's ``max_staleness`` from its public config (default 48h)."""
    v = config.get("max_staleness_us")
    if isinstance(v, int):
        return v
    text = config.get("max_staleness") or DEFAULT_MAX_STALENESS
    return parse_duration(str(text), field="max_staleness")


def _service_stats(
    store: Store, plan: RunPlan, service: str, chunks: Sequence[tuple[int, int, StagedChunk]]
) -> ServiceRunStats:
    types = freeze_types(store, service, [c.kinds for _, _, c in chunks])
    latencies: list[np.ndarray] = []
    errors: Counter[str] = Counter()
    objects = []
    per_object = max(1, FINAL_OBJECT_ROWS // plan.chunk_size)
    groups: dict[tuple[int, int], list[StagedChunk]] = {}
    for shard, k, chunk in chunks:
        groups.setdefault((shard, k // per_object), []).append(chunk)
    for (shard, j), members in groups.items():
        final = data_key(plan.slot_us, shard, plan.shards, service, j)
        sink = pa.BufferOutputStream()
        writer: pq.ParquetWriter | None = None
        # One staged chunk in memory at a time, each a row group of the final object.
        for c in members:
            table = conform(store.read_parquet(c.key), types.fields)
            entity = table.column("entity_id")
            if len(entity) > 1 and not pc.all(
                pc.less_equal(entity.slice(0, len(entity) - 1), entity.slice(1))
            ).as_py():
                table = table.take(pc.sort_indices(table, [("entity_id", "ascending")]))
            lat = table.column("latency_ms").to_numpy(zero_copy_only=False)
            latencies.append(lat[~np.isnan(lat)].astype(np.float32))
            failed = pc.equal(table.column("status"), "error")
            kinds = pc.fill_null(table.column("error_kind").filter(failed), "unknown")
            for item in pc.value_counts(kinds).to_pylist():
                errors[item["values"]] += item["counts"]
            if writer is None:
                writer = pq.ParquetWriter(sink, table.schema, compression="zstd",
                                          **parquet_options(table))
            writer.write_table(table)
            del table, entity
        if writer is None:
            continue
        writer.close()
        try:
            store.put_if_absent(unpublished_key(final), sink.getvalue().to_pybytes())
        except ObjectExists:
            pass  # written by an interrupted commit of this run: roll forward
        objects.append(final)
        del sink, writer
    # float32 and in place: at 1M contexts the figures cost 4 MB, not a few copies of 8 MB.
    lat_all = np.concatenate(latencies) if latencies else np.zeros(0, np.float32)
    del latencies
    p50, p99 = (
        tuple(round(float(v), 3) for v in np.percentile(lat_all, [50, 99], overwrite_input=True))
        if len(lat_all)
        else (None, None)
    )
    config = plan.services[service]
    return ServiceRunStats(
        requested=sum(c.rows for _, _, c in chunks),
        fetched_ok=sum(c.ok + c.missing for _, _, c in chunks),
        missing=sum(c.missing for _, _, c in chunks),
        failed=sum(c.failed for _, _, c in chunks),
        latency_p50_ms=p50,
        latency_p99_ms=p99,
        errors=dict(sorted(errors.items())),
        columns=types.fields,
        types_version=types.version,
        config=config,
        max_staleness_us=max_staleness_us(config),
        objects=objects,
        rows=sum(c.rows for _, _, c in chunks),
    )


def commit_run(
    store: Store, plan: RunPlan, parts: dict[int, PartManifest], clock: Clock
) -> RunManifest:
    """Write the run's final data, then create its manifest: the commit.

    Raises:
        RunAlreadyCommitted: the slot's manifest exists; the conditional put refused this one.
    """
    if store.exists(manifest_key(plan.slot_us)):
        raise RunAlreadyCommitted(f"slot {format_timestamp(plan.slot_us)} is already committed")
    services = {}
    for service in plan.services:
        chunks = [
            (shard, k, c)
            for shard in sorted(parts)
            for k, c in enumerate(parts[shard].chunks.get(service, []))
        ]
        services[service] = _service_stats(store, plan, service, chunks)
    manifest = RunManifest(
        run_id=plan.run_id,
        slot_us=plan.slot_us,
        selection_id=plan.selection_id,
        shards=plan.shards,
        started_at_us=plan.created_at_us,
        committed_at_us=clock.now_us(),
        services=services,
    )
    put_manifest(store, manifest)
    publish_run(store, manifest)
    return manifest


def publish_run(store: Store, manifest: RunManifest) -> int:
    """Make a committed run's objects visible to external readers: copy each one still waiting
    under ``_publish`` to its final key (create-if-absent), then delete the hidden copy.
    Idempotent, so a crash part-way is finished by calling it again; on a run published already
    it costs one listing per service. Returns how many objects it copied."""
    copied = 0
    for stats in manifest.services.values():
        hidden = {final: unpublished_key(final) for final in stats.objects}
        dirs = sorted({h.rsplit("/", 1)[0] + "/" for h in hidden.values()})
        waiting = {o.key for d in dirs for o in store.list(d)}
        for final, h in hidden.items():
            if h not in waiting:
                continue  # published already
            if not store.exists(final):
                try:
                    data = store.get(h)
                except ObjectNotFound:
                    continue  # another process published it meanwhile
                with contextlib.suppress(ObjectExists):
                    store.put_if_absent(final, data)
                copied += 1
            store.delete(h)
    return copied


def unfinished_commits(store: Store) -> list[int]:
    """Slots whose run is committed but whose publishing or staging cleanup was left undone (a
    crash after the commit point), oldest first: what every run finishes before its own, so a
    slot that is never run again is still published. Two listings, plus one existence check
    per slot found."""
    names: set[str] = set()
    for o in store.list(PUBLISH_PREFIX):  # _publish/service=S/slot=NAME/part-...
        for segment in o.key[len(PUBLISH_PREFIX) + 1:].split("/"):
            if segment.startswith("slot="):
                names.add(segment.removeprefix("slot="))
                break
    for o in store.list(STAGING_PREFIX):  # _staging/NAME/...
        names.add(o.key[len(STAGING_PREFIX) + 1:].split("/", 1)[0])
    slots = []
    for name in names:
        try:
            slot_us = parse_slot_name(name)
        except ValueError:
            continue
        if store.exists(manifest_key(slot_us)):
            slots.append(slot_us)
    return sorted(slots)


def put_manifest(store: Store, manifest: RunManifest) -> None:
    """Create a run's manifest: the conditional put that commits it.

    Raises:
        RunAlreadyCommitted: a manifest for the slot exists; it stands unchanged.
    """
    try:
        store.put_if_absent(manifest_key(manifest.slot_us), manifest.to_json())
    except ObjectExists as exc:
        raise RunAlreadyCommitted(
            f"slot {format_timestamp(manifest.slot_us)} was committed by another run; the "
            "conditional put refused this commit"
        ) from exc


def cleanup_staging(store: Store, slot_us: int) -> int:
    """Delete a committed run's staging objects; returns how many. Safe to repeat."""
    keys = [o.key for o in store.list(staging_prefix(slot_us))]
    for k in keys:
        store.delete(k)
    return len(keys)

