"""Where snapshot runs live in the store, and the JSON records that commit them.

Layout (``<slot>`` is the run's slot in compact UTC form, e.g. ``20261120T120000Z``)::

    snapshots/runs/_manifests/<slot>.json                 run manifests: the commit points
    snapshots/runs/service=<svc>/slot=<slot>/part-<i>of<n>-<k>.parquet   committed rows
    snapshots/runs/_staging/<slot>/plan.json              the run's pinned plan (selection, shards)
    snapshots/runs/_staging/<slot>/shard=<i>of<n>/<svc>/chunk-<k>.parquet   staged chunks
    snapshots/runs/_staging/<slot>/parts/shard-<i>of<n>.json               shard part manifests
    snapshots/services/<svc>/types/v000001.json           frozen payload types (see ``_typing``)

Everything under ``_staging`` or ``_manifests`` is skipped by Spark, Trino, DuckDB and pyarrow,
so ``pyarrow.dataset("snapshots/runs/service=S", partitioning="hive")`` sees only Parquet rows of
committed runs. The manifests sit under ``_manifests`` for the same reason Delta keeps its log in
``_delta_log``: they are committed, but they are JSON, not rows.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from ttstore import ObjectNotFound, Store, format_timestamp, key, parse_timestamp, to_datetime

RUNS_PREFIX = "snapshots/runs"
MANIFESTS_PREFIX = f"{RUNS_PREFIX}/_manifests"
STAGING_PREFIX = f"{RUNS_PREFIX}/_staging"
#: Where a run's final objects are written, hidden from external readers, before its manifest
#: commits it; once committed they are published to their keys under ``RUNS_PREFIX``.
PUBLISH_PREFIX = f"{RUNS_PREFIX}/_publish"
MANIFEST_FORMAT = 1
DEFAULT_MAX_STALENESS = "48h"


def slot_name(slot_us: int) -> str:
    """The compact UTC form of a slot used in keys: ``20261120T120000Z`` (micros if any)."""
    dt = to_datetime(slot_us)
    base = dt.strftime("%Y%m%dT%H%M%S")
    return f"{base}.{dt.microsecond:06d}Z" if dt.microsecond else f"{base}Z"


def parse_slot_name(name: str) -> int:
    """Inverse of :func:`slot_name`."""
    body = name.removesuffix("Z")
    fmt = "%Y%m%dT%H%M%S.%f" if "." in body else "%Y%m%dT%H%M%S"
    dt = datetime.strptime(body, fmt).replace(tzinfo=UTC)
    return parse_timestamp(dt, field="slot")


def run_id_for(slot_us: int, selection_id: str) -> str:
    """A run's id: its slot plus a digest of its selection, so every shard derives the same."""
    digest = hashlib.sha256(f"{slot_us}\0{selection_id}".encode()).hexdigest()[:8]
    return f"{slot_name(slot_us)}-{digest}"


def shard_name(shard: int, shards: int) -> str:
    return f"{shard}of{shards}"


def manifest_key(slot_us: int) -> str:
    return key(MANIFESTS_PREFIX, f"{slot_name(slot_us)}.json")


def plan_key(slot_us: int) -> str:
    return key(STAGING_PREFIX, slot_name(slot_us), "plan.json")


def part_key(slot_us: int, shard: int, shards: int) -> str:
    name = f"shard-{shard_name(shard, shards)}.json"
    return key(STAGING_PREFIX, slot_name(slot_us), "parts", name)


def chunk_key(slot_us: int, shard: int, shards: int, service: str, chunk: int) -> str:
    return key(
        STAGING_PREFIX,
        slot_name(slot_us),
        f"shard={shard_name(shard, shards)}",
        service,
        f"chunk-{chunk:06d}.parquet",
    )


def data_key(slot_us: int, shard: int, shards: int, service: str, chunk: int) -> str:
    return key(
        RUNS_PREFIX,
        f"service={service}",
        f"slot={slot_name(slot_us)}",
        f"part-{shard_name(shard, shards)}-{chunk:06d}.parquet",
    )


def unpublished_key(final: str) -> str:
    """Where the committed object ``final`` (a :func:`data_key`) waits to be published: the same
    path under ``_publish``, which Spark, Trino, DuckDB and pyarrow skip."""
    head = RUNS_PREFIX + "/"
    if not final.startswith(head):
        raise ValueError(f"not a run data key: {final!r}")
    return key(PUBLISH_PREFIX, final[len(head):])


def staging_prefix(slot_us: int) -> str:
    return key(STAGING_PREFIX, slot_name(slot_us))


# -- records ---------------------------------------------------------------------------------


def _dump(body: Mapping[str, Any]) -> bytes:
    return (json.dumps(body, indent=1, sort_keys=True) + "\n").encode()


@dataclass(frozen=True)
class RunPlan:
    """What every shard of a slot's run agrees on; pinned by the first shard to start.

    Attributes:
        services: each service's configuration, secrets left out.
    """

    run_id: str
    slot_us: int
    selection_id: str
    shards: int
    chunk_size: int
    services: dict[str, dict[str, Any]]
    created_at_us: int

    def to_json(self) -> bytes:
        return _dump({
            "run_id": self.run_id,
            "slot": format_timestamp(self.slot_us),
            "selection_id": self.selection_id,
            "shards": self.shards,
            "chunk_size": self.chunk_size,
            "services": self.services,
            "created_at": format_timestamp(self.created_at_us),
        })

    @classmethod
    def from_json(cls, data: bytes) -> RunPlan:
        b = json.loads(data)
        return cls(
            run_id=b["run_id"],
            slot_us=parse_timestamp(b["slot"], field="slot"),
            selection_id=b["selection_id"],
            shards=int(b["shards"]),
            chunk_size=int(b["chunk_size"]),
            services=dict(b["services"]),
            created_at_us=parse_timestamp(b["created_at"], field="created_at"),
        )


@dataclass(frozen=True)
class StagedChunk:
    """One staged chunk of one service in one shard.

    Attributes:
        kinds: the payload kinds inferred from this chunk's answers (see ``_typing``).
    """

    key: str
    rows: int
    ok: int
    missing: int
    failed: int
    kinds: dict[str, str]

    def to_body(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "rows": self.rows,
            "ok": self.ok,
            "missing": self.missing,
            "failed": self.failed,
            "kinds": self.kinds,
        }

    @classmethod
    def from_body(cls, b: Mapping[str, Any]) -> StagedChunk:
        return cls(
            key=b["key"],
            rows=int(b["rows"]),
            ok=int(b["ok"]),
            missing=int(b["missing"]),
            failed=int(b["failed"]),
            kinds=dict(b["kinds"]),
        )


@dataclass(frozen=True)
class PartManifest:
    """One shard's committed part: which staged chunks hold its rows, in chunk order."""

    run_id: str
    slot_us: int
    shard: int
    shards: int
    committed_at_us: int
    chunks: dict[str, list[StagedChunk]]

    def to_json(self) -> bytes:
        return _dump({
            "run_id": self.run_id,
            "slot": format_timestamp(self.slot_us),
            "shard": self.shard,
            "shards": self.shards,
            "committed_at": format_timestamp(self.committed_at_us),
            "chunks": {s: [c.to_body() for c in cs] for s, cs in self.chunks.items()},
        })

    @classmethod
    def from_json(cls, data: bytes) -> PartManifest:
        b = json.loads(data)
        return cls(
            run_id=b["run_id"],
            slot_us=parse_timestamp(b["slot"], field="slot"),
            shard=int(b["shard"]),
            shards=int(b["shards"]),
            committed_at_us=parse_timestamp(b["committed_at"], field="committed_at"),
            chunks={s: [StagedChunk.from_body(c) for c in cs] for s, cs in b["chunks"].items()},
        )


@dataclass(frozen=True)
class ServiceRunStats:
    """A service's figures in a committed run (SPEC §2)."""

    requested: int
    fetched_ok: int
    missing: int
    failed: int
    latency_p50_ms: float | None
    latency_p99_ms: float | None
    errors: dict[str, int]
    columns: dict[str, str]
    types_version: int
    config: dict[str, Any]
    max_staleness_us: int
    objects: list[str]
    rows: int

    @property
    def confidence(self) -> float:
        """Answered ÷ requested (1.0 for an empty request)."""
        return self.fetched_ok / self.requested if self.requested else 1.0

    def to_body(self) -> dict[str, Any]:
        return {
            "requested": self.requested,
            "fetched_ok": self.fetched_ok,
            "missing": self.missing,
            "failed": self.failed,
            "confidence": self.confidence,
            "latency_ms": {"p50": self.latency_p50_ms, "p99": self.latency_p99_ms},
            "errors": self.errors,
            "columns": self.columns,
            "types_version": self.types_version,
            "config": self.config,
            "max_staleness_us": self.max_staleness_us,
            "objects": self.objects,
            "rows": self.rows,
        }

    @classmethod
    def from_body(cls, b: Mapping[str, Any]) -> ServiceRunStats:
        return cls(
            requested=int(b["requested"]),
            fetched_ok=int(b["fetched_ok"]),
            missing=int(b["missing"]),
            failed=int(b["failed"]),
            latency_p50_ms=b["latency_ms"]["p50"],
            latency_p99_ms=b["latency_ms"]["p99"],
            errors=dict(b["errors"]),
            columns=dict(b["columns"]),
            types_version=int(b["types_version"]),
            config=dict(b["config"]),
            max_staleness_us=int(b["max_staleness_us"]),
            objects=list(b["objects"]),
            rows=int(b["rows"]),
        )


@dataclass(frozen=True)
class RunManifest:
    """A committed snapshot run. Creating its object (create-if-absent) is the commit."""

    run_id: str
    slot_us: int
    selection_id: str
    shards: int
    started_at_us: int
    committed_at_us: int
    services: dict[str, ServiceRunStats] = field(default_factory=dict)

    def to_json(self) -> bytes:
        return _dump({
            "format": MANIFEST_FORMAT,
            "run_id": self.run_id,
            "slot": format_timestamp(self.slot_us),
            "selection_id": self.selection_id,
            "shards": self.shards,
            "started_at": format_timestamp(self.started_at_us),
            "committed_at": format_timestamp(self.committed_at_us),
            "services": {s: v.to_body() for s, v in self.services.items()},
        })

    @classmethod
    def from_json(cls, data: bytes) -> RunManifest:
        b = json.loads(data)
        return cls(
            run_id=b["run_id"],
            slot_us=parse_timestamp(b["slot"], field="slot"),
            selection_id=b["selection_id"],
            shards=int(b["shards"]),
            started_at_us=parse_timestamp(b["started_at"], field="started_at"),
            committed_at_us=parse_timestamp(b["committed_at"], field="committed_at"),
            services={s: ServiceRunStats.from_body(v) for s, v in b["services"].items()},
        )


# -- reading ---------------------------------------------------------------------------------


class ManifestCache:
    """Committed run manifests, each read once (they are immutable); the listing is re-read on
    every call, so new runs appear."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self._by_key: dict[str, RunManifest] = {}

    def runs(self) -> list[RunManifest]:
        """Every committed run, oldest slot first."""
        out = []
        for o in self.store.list(MANIFESTS_PREFIX):
            if not o.key.endswith(".json"):
                continue
            m = self._by_key.get(o.key)
            if m is None:
                m = self._by_key[o.key] = RunManifest.from_json(self.store.get(o.key))
            out.append(m)
        out.sort(key=lambda m: m.slot_us)
        return out


def load_manifest(store: Store, slot_us: int) -> RunManifest | None:
    """The committed run of ``slot_us``, or None."""
    try:
        return RunManifest.from_json(store.get(manifest_key(slot_us)))
    except ObjectNotFound:
        return None


@dataclass(frozen=True)
class PendingRun:
    """A slot with a plan but no manifest yet: a run in progress, crashed, or missing shards."""

    plan: RunPlan
    committed_shards: list[int]
    #: When its newest staged object was written (the store's clock, µs): a crashed run stops
    #: moving, a running one does not. None where the store gives no modification time.
    last_write_us: int | None = None

    @property
    def missing_shards(self) -> list[int]:
        done = set(self.committed_shards)
        return [i for i in range(self.plan.shards) if i not in done]


def pending_runs(store: Store) -> list[PendingRun]:
    """Every planned run whose manifest is not committed, oldest slot first."""
    plans: dict[str, RunPlan] = {}
    parts: dict[str, list[int]] = {}
    last_write: dict[str, int] = {}
    for o in store.list(STAGING_PREFIX):
        rest = o.key[len(STAGING_PREFIX) + 1 :].split("/")
        if o.modified_us is not None:
            last_write[rest[0]] = max(last_write.get(rest[0], o.modified_us), o.modified_us)
        if len(rest) == 2 and rest[1] == "plan.json":
            try:
                plans[rest[0]] = RunPlan.from_json(store.get(o.key))
            except ObjectNotFound:
                continue  # committed and cleaned up while we listed
        elif len(rest) == 3 and rest[1] == "parts" and rest[2].startswith("shard-"):
            shard = rest[2].removeprefix("shard-").split("of")[0]
            parts.setdefault(rest[0], []).append(int(shard))
    out = []
    for slot, plan in plans.items():
        if store.exists(manifest_key(plan.slot_us)):
            continue
        out.append(PendingRun(plan, sorted(parts.get(slot, [])), last_write.get(slot)))
    out.sort(key=lambda p: p.plan.slot_us)
    return out
