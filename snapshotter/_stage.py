"""Fetching one shard's contexts chunk by chunk, and staging each chunk as Parquet.

Memory stays flat: a service has at most ``window`` chunks in flight, and a chunk is written to
``snapshots/runs/_staging/...`` (create-if-absent, so a chunk is staged whole or not at all) as
soon as its answers are in. A chunk's name is its position in the shard's pinned context order,
so a resumed run finds what it already staged and fetches only the rest.

``captured_at`` of a row is the run clock when its answer came back (the HTTP fetcher reads it
per row, once per batch request; for a fetcher that does not, every row of the chunk gets the
reading taken when the chunk's fetch returned): an upper bound on when the answer was observed,
so a query at ``t`` never sees a state from after ``t``.
"""

from __future__ import annotations

import asyncio
import functools
import json
import threading
from asyncio import FIRST_COMPLETED
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from ttstore import TIMESTAMP_TYPE, Clock, ObjectExists, Store

from ._answers import Answers, ColumnFetcher, FetchResultLike
from ._errors import RunInterrupted
from ._hashing import entity_hash
from ._manifest import RunPlan, StagedChunk, chunk_key
from ._typing import field_values, infer_kinds, payload_columns, unify

KINDS_METADATA = b"timetravel.kinds"
T = TypeVar("T")


class Fetcher(Protocol):
    """What a run needs from a service client: answers for a list of entities, in order."""

    async def fetch(self, entities: Sequence[Any]) -> Sequence[FetchResultLike]: ...


@dataclass(frozen=True)
class LocalResult:
    """A :class:`FetchResultLike` made in process."""

    entity: Any
    status: str
    payload: Mapping[str, Any] | None
    raw_json: str | None
    latency_s: float = 0.0
    attempts: int = 1
    error_kind: str | None = None


class LocalFetcher:
    """A :class:`Fetcher` that answers from a Python function, in process: the local
    implementation of the service-client plug-in point (tests, embedding, notebooks).

    Args:
        answer: ``answer(entity) -> dict`` (ok), ``None`` (missing); an exception is a failed
            fetch whose ``error_kind`` is the exception's class name.
    """

    def __init__(self, answer: Callable[[Any], Mapping[str, Any] | None]) -> None:
        self.answer = answer
        self.requested = 0

    async def fetch(self, entities: Sequence[Any]) -> list[LocalResult]:
        out = []
        for e in entities:
            self.requested += 1
            try:
                p = self.answer(e)
            except Exception as exc:  # a failed fetch is data, not a crash
                out.append(LocalResult(e, "error", None, None, error_kind=type(exc).__name__))
                continue
            if p is None:
                out.append(LocalResult(e, "missing", None, None))
            else:
                out.append(LocalResult(e, "ok", p, json.dumps(p, separators=(",", ":"))))
        return out


# -- the stable shard split ----------------------------------------------------------------------

#: The hash key of the shard split: fixed forever, so every process splits a selection alike.
SHARD_SEED = int.from_bytes(b"shard", "big")


def stable_hash(entities: pa.Array | pa.ChunkedArray) -> np.ndarray:
    """A 64-bit hash of each key, the same in every process, platform and version (the panel
    hash of ``_hashing``, under its own fixed key)."""
    return entity_hash(entities, SHARD_SEED)


def shard_indices(entities: pa.Array, shard: int, shards: int) -> np.ndarray:
    """Positions (ascending) of the entities that belong to ``shard`` of ``shards``."""
    if shards == 1:
        return np.arange(len(entities))
    return np.flatnonzero(stable_hash(entities) % np.uint64(shards) == np.uint64(shard))


# -- one chunk ---------------------------------------------------------------------------------


def chunk_table(
    results: Answers | Sequence[FetchResultLike],
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
    a = results if isinstance(results, Answers) else Answers.of(results)
    n = len(a)
    payloads = a.payload
    values = field_values(payloads)
    kinds = infer_kinds(payloads, values=values)
    types = unify(frozen, [kinds])
    latency = np.array(a.latency_s, dtype=np.float64) * 1e3
    cols: dict[str, pa.Array] = {
        "run_id": pa.DictionaryArray.from_arrays(
            pa.array(np.zeros(n, np.int32)), pa.array([run_id], pa.string())
        ),
        "entity_id": entities,
        "captured_at": pa.array(
            np.full(n, captured_at_us, dtype=np.int64) if a.captured_us is None
            else np.minimum(np.asarray(a.captured_us, dtype=np.int64), captured_at_us),
            TIMESTAMP_TYPE,
        ),
        "status": pa.array(a.status, pa.string()),
        "error_kind": pa.array(a.error_kind, pa.string()),
        "attempts": pa.array(a.attempts, pa.int32()),
        "latency_ms": pa.array(latency, pa.float64()),
        "weight": weights,
        "raw_json": pa.array(a.raw_json, pa.string()),
    }
    cols.update(payload_columns(payloads, types, values=values))
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


#: Staged chunks live until the commit reads them back once: lz4 writes and reads about 1.5x
#: as fast as zstd, for 1.7x the bytes (committed objects are zstd).
STAGING_COMPRESSION = "lz4"


def parquet_options(table: pa.Table) -> dict[str, Any]:
    """Writer options for snapshot rows: ``raw_json`` (a different text per row) is never
    dictionary-encoded nor given min/max statistics, which cost time and help no reader."""
    others = [c for c in table.column_names if c != "raw_json"]
    return {"use_dictionary": others, "write_statistics": others, "store_schema": True}


def staged_bytes(table: pa.Table) -> bytes:
    """A chunk as staged Parquet (the bytes depend only on the table)."""
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, compression=STAGING_COMPRESSION, **parquet_options(table))
    return bytes(sink.getvalue().to_pybytes())


def stage_chunk(store: Store, key_: str, table: pa.Table) -> StagedChunk:
    """Write a chunk (create-if-absent). If another process staged it first, keep theirs."""
    try:
        store.put_if_absent(key_, staged_bytes(table))
    except ObjectExists:
        return summarize(key_, store.read_parquet(key_))
    return summarize(key_, table)


def first_error(eg: BaseExceptionGroup[BaseException]) -> BaseException:
    """The error to report from a task group: an interruption if any task was interrupted
    (stopping is the cause, the rest are its echoes), else the first failure."""
    leaves: list[BaseException] = []

    def walk(e: BaseException) -> None:
        if isinstance(e, BaseExceptionGroup):
            for x in e.exceptions:
                walk(x)
        else:
            leaves.append(e)

    walk(eg)
    for e in leaves:
        if isinstance(e, RunInterrupted):
            return e
    return leaves[0]


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
        executor: where chunks are written (default: the loop's). A run shares one thread
            between its services: glibc gives every thread that allocates its own malloc
            arena, which keeps freed memory, so a pool of writer threads multiplies the RSS.
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
    executor: Executor | None = None

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

        async def resumed(k: int) -> None:
            table = await self._in_thread(self.store.read_parquet, keys[k], columns=["status"])
            out[k] = summarize(keys[k], table)
            self._report(k, n_chunks, out[k], resumed=True)

        async def fetched(k: int) -> None:
            c = self.plan.chunk_size
            ents = self.entities.slice(k * c, c)
            asked = ents.to_pylist()
            if isinstance(self.fetcher, ColumnFetcher):
                results: Answers | Sequence[FetchResultLike] = (
                    await self.fetcher.fetch_answers(asked, now=self.clock.now_us)
                )
            else:
                results = await self.fetcher.fetch(asked)
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
            out[k] = await self._in_thread(stage_chunk, self.store, keys[k], table)
            self._report(k, n_chunks, out[k], resumed=False)

        # At most ``window`` chunks in flight, started in chunk order as others finish: tasks
        # are made as they start, not one per chunk up front.
        running: set[asyncio.Task[None]] = set()
        try:
            for k in range(n_chunks):
                if keys[k] in existing:
                    running.add(asyncio.ensure_future(resumed(k)))
                elif self.stop is not None and self.stop.is_set():
                    break  # chunks in flight finish and are staged; none start
                else:
                    running.add(asyncio.ensure_future(fetched(k)))
                while len(running) >= self.window:
                    done, running = await asyncio.wait(running, return_when=FIRST_COMPLETED)
                    for t in done:
                        t.result()
            while running:
                done, running = await asyncio.wait(running, return_when=FIRST_COMPLETED)
                for t in done:
                    t.result()
        except BaseException:
            for t in running:
                t.cancel()
            await asyncio.gather(*running, return_exceptions=True)
            raise
        if any(c is None for c in out):
            raise RunInterrupted(
                f"stopped with {sum(c is None for c in out)} chunk(s) of {self.service} "
                "not fetched; what was staged is kept for the resume"
            )
        return [c for c in out if c is not None]

    async def _in_thread(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, functools.partial(fn, *args, **kwargs))

    def _report(self, k: int, n: int, summary: StagedChunk | None, *, resumed: bool) -> None:
        if self.on_chunk is not None and summary is not None:
            self.on_chunk(ChunkEvent(self.service, self.shard, k, n, summary, resumed))
