"""Fetching one shard's contexts chunk by chunk, and staging each chunk as Parquet.

Memory stays flat: a service has at most ``window`` chunks in flight, and a chunk is written to
``snapshots/runs/_staging/...`` (create-if-absent, so a chunk is staged whole or not at all) as
soon as its answers are in. A chunk's name is its position in the shard's pinned context order,
so a resumed run finds what it already staged and fetches only the rest.

``captured_at`` of a chunk's rows is the run clock when the chunk's fetch returned: an upper
bound on when each answer was observed, so a query at ``t`` never sees a state from after ``t``.
"""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from ttstore import TIMESTAMP_TYPE, Clock, ObjectExists, Store

from ._errors import RunInterrupted
from ._manifest import RunPlan, StagedChunk, chunk_key
from ._typing import infer_kinds, payload_columns, unify

KINDS_METADATA = b"timetravel.kinds"
STATUSES = ("ok", "missing", "error")


class FetchResultLike(Protocol):
    """One answer from a service (``snapshotter._fetch.FetchResult`` has this shape)."""

    @property
    def entity(self) -> Any: ...
    @property
    def status(self) -> str: ...
    @property
    def payload(self) -> Mapping[str, Any] | None: ...
    @property
    def raw_json(self) -> str | None: ...
    @property
    def latency_s(self) -> float: ...
    @property
    def attempts(self) -> int: ...
    @property
    def error_kind(self) -> str | None: ...


class Fetcher(Protocol):
    """What a run needs from a service client: answers for a list of entities, in order."""

    async def fetch(self, entities: Sequence[Any]) -> Sequence[FetchResultLike]: ...


# -- the stable shard split ------------------------------------------------------------------

_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_FNV_OFFSET = np.uint64(0xCBF29CE484222325)
_FNV_PRIME = np.uint64(0x100000001B3)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer: every input bit affects every output bit."""
    z = z + _GOLDEN
    z = (z ^ (z >> np.uint64(30))) * _M1
    z = (z ^ (z >> np.uint64(27))) * _M2
    out: np.ndarray = z ^ (z >> np.uint64(31))
    return out


def stable_hash(entities: pa.Array) -> np.ndarray:
    """A 64-bit hash of each key that is the same in every process and every Python version:
    splitmix64 of an int64 key, FNV-1a of a string key's UTF-8 bytes (then mixed). Vectorized:
    strings are hashed one byte position at a time across all keys."""
    if isinstance(entities, pa.ChunkedArray):
        entities = entities.combine_chunks()
    if pa.types.is_integer(entities.type):
        return _mix64(entities.cast(pa.int64()).to_numpy(zero_copy_only=False).view(np.uint64))
    arr = entities.cast(pa.large_string())
    n = len(arr)
    bufs = arr.buffers()
    offsets = np.frombuffer(bufs[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = np.frombuffer(bufs[2], dtype=np.uint8) if bufs[2] is not None else np.zeros(0, np.uint8)
    starts = offsets[:-1]
    lengths = np.diff(offsets)
    h = np.full(n, _FNV_OFFSET, dtype=np.uint64)
    for pos in range(int(lengths.max()) if n else 0):
        live = np.flatnonzero(lengths > pos)
        h[live] = (h[live] ^ data[starts[live] + pos].astype(np.uint64)) * _FNV_PRIME
    return _mix64(h)


def shard_indices(entities: pa.Array, shard: int, shards: int) -> np.ndarray:
    """Positions (ascending) of the entities that belong to ``shard`` of ``shards``."""
    if shards == 1:
        return np.arange(len(entities))
    return np.flatnonzero(stable_hash(entities) % np.uint64(shards) == np.uint64(shard))


# -- one chunk ---------------------------------------------------------------------------------


def chunk_table(
    results: Sequence[FetchResultLike],
    *,
    run_id: str,
    entities: pa.Array,
    weights: pa.Array,
    captured_at_us: int,
    frozen: Mapping[str, str],
) -> tuple[pa.Table, dict[str, str]]:
    """The staged rows of one chunk, and the payload kinds it observed.

    ``entities`` and ``weights`` are the chunk's contexts in the order they were requested;
    ``results`` answer them in the same order.
    """
    n = len(results)
    payloads = [r.payload if r.status == "ok" else None for r in results]
    kinds = infer_kinds(payloads)
    types = unify(frozen, [kinds])
    latency = np.fromiter((r.latency_s for r in results), dtype=np.float64, count=n) * 1e3
    cols: dict[str, pa.Array] = {
        "run_id": pa.array([run_id] * n, pa.string()).dictionary_encode(),
        "entity_id": entities,
        "captured_at": pa.array(np.full(n, captured_at_us, dtype=np.int64), TIMESTAMP_TYPE),
        "status": pa.array([r.status for r in results], pa.string()),
        "error_kind": pa.array([r.error_kind for r in results], pa.string()),
        "attempts": pa.array([r.attempts for r in results], pa.int32()),
        "latency_ms": pa.array(latency, pa.float64()),
        "weight": weights,
        "raw_json": pa.array([r.raw_json for r in results], pa.string()),
    }
    cols.update(payload_columns(payloads, types))
    table = pa.table(cols)
    table = table.replace_schema_metadata({KINDS_METADATA: json.dumps(kinds).encode()})
    return table, kinds


def summarize(key_: str, table: pa.Table) -> StagedChunk:
    """A staged chunk's counts and observed kinds, from the chunk itself."""
    status = table.column("status").to_numpy(zero_copy_only=False)
    meta = table.schema.metadata or {}
    kinds = json.loads(meta.get(KINDS_METADATA, b"{}"))
    return StagedChunk(
        key=key_,
        rows=table.num_rows,
        ok=int(np.count_nonzero(status == "ok")),
        missing=int(np.count_nonzero(status == "missing")),
        failed=int(np.count_nonzero(status == "error")),
        kinds=kinds,
    )


def stage_chunk(store: Store, key_: str, table: pa.Table) -> StagedChunk:
    """Write a chunk (create-if-absent). If another process staged it first, keep theirs."""
    try:
        store.write_parquet(key_, table)
    except ObjectExists:
        return summarize(key_, store.read_parquet(key_))
    return summarize(key_, table)


# -- one service of one shard -------------------------------------------------------------------


@dataclass(frozen=True)
class ChunkEvent:
    """Reported after each chunk: for progress bars and log lines."""

    service: str
    shard: int
    chunk: int
    chunks: int
    summary: StagedChunk
    resumed: bool


@dataclass(kw_only=True)
class ServiceStager:
    """Stages every chunk of one service for one shard.

    Args:
        entities: the shard's contexts, in the pinned order, typed as the service's key.
        weights: their design weights (1/pi), aligned.
        frozen: the service's frozen payload types when the run started.
        window: chunks in flight at once (bounds memory; two keep the service busy while the
            previous chunk is written).
    """

    store: Store
    plan: RunPlan
    shard: int
    service: str
    fetcher: Fetcher
    entities: pa.Array
    weights: pa.Array
    frozen: Mapping[str, str]
    clock: Clock
    stop: threading.Event | None = None
    on_chunk: Callable[[ChunkEvent], None] | None = None
    window: int = 2

    def chunk_count(self) -> int:
        return -(-len(self.entities) // self.plan.chunk_size)

    async def run(self) -> list[StagedChunk]:
        """Stage every chunk not staged yet; return all chunks' summaries in chunk order.

        Raises:
            RunInterrupted: ``stop`` was set; chunks staged so far are kept.
        """
        n_chunks = self.chunk_count()
        keys = [
            chunk_key(self.plan.slot_us, self.shard, self.plan.shards, self.service, k)
            for k in range(n_chunks)
        ]
        prefix = keys[0].rsplit("/", 1)[0] if keys else ""
        existing = {o.key for o in self.store.list(prefix)} if prefix else set()
        out: list[StagedChunk | None] = [None] * n_chunks
        sem = asyncio.Semaphore(self.window)

        async def one(k: int) -> None:
            if keys[k] in existing:
                read = self.store.read_parquet
                table = await asyncio.to_thread(read, keys[k], columns=["status"])
                out[k] = summarize(keys[k], table)
                self._report(k, n_chunks, out[k], resumed=True)
                return
            async with sem:
                if self.stop is not None and self.stop.is_set():
                    raise RunInterrupted("stopped before fetching every chunk")
                c = self.plan.chunk_size
                ents = self.entities.slice(k * c, c)
                results = await self.fetcher.fetch(ents.to_pylist())
                captured_at_us = self.clock.now_us()
                table, _ = chunk_table(
                    results,
                    run_id=self.plan.run_id,
                    entities=ents,
                    weights=self.weights.slice(k * c, c),
                    captured_at_us=captured_at_us,
                    frozen=self.frozen,
                )
                del results
                out[k] = await asyncio.to_thread(stage_chunk, self.store, keys[k], table)
            self._report(k, n_chunks, out[k], resumed=False)

        async with asyncio.TaskGroup() as tg:
            for k in range(n_chunks):
                tg.create_task(one(k))
        return [c for c in out if c is not None]

    def _report(self, k: int, n: int, summary: StagedChunk | None, *, resumed: bool) -> None:
        if self.on_chunk is not None and summary is not None:
            self.on_chunk(ChunkEvent(self.service, self.shard, k, n, summary, resumed))
