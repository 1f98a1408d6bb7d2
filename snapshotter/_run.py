"""A snapshot run: fetch every service for a slot's contexts, stage, commit atomically.

One call of :meth:`SnapshotRunner.run` is ``timetravel snapshot run`` (and one scheduler tick):

1. If the slot's manifest exists, it is a no-op (``already_committed``).
2. The slot's **plan** (run id, selection, shard count, chunk size, services) is pinned with a
   create-if-absent put by the first invocation; every later one, every shard and every resume
   adopts it, so all shards use one selection and name their chunks alike.
3. Each shard to run stages its contexts (a stable hash split of the selection) chunk by chunk
   for every service at once (``_stage``), skipping chunks already staged, then commits its
   part. Without ``--shard``, an invocation runs every shard whose part is missing.
4. When every part is committed, the run is committed (``_commit``).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc

from ttstore import Clock, ObjectExists, ObjectNotFound, Store, format_timestamp

from ._commit import (
    cleanup_staging,
    commit_part,
    commit_run,
    committed_parts,
    publish_run,
    unfinished_commits,
)
from ._errors import InvalidRunOption, RunAlreadyCommitted, RunConflict, SelectionNotFound
from ._manifest import (
    RunManifest,
    RunPlan,
    StagedChunk,
    load_manifest,
    plan_key,
    run_id_for,
)
from ._stage import ChunkEvent, Fetcher, ServiceStager, first_error, shard_indices
from ._typing import load_types

log = logging.getLogger("snapshotter.run")

DEFAULT_CHUNK_SIZE = 2000
#: Net container allocations between two young-generation collections while a shard fetches
#: (CPython's default is 700): see :func:`fewer_collections`.
FETCH_GC_THRESHOLD = 20_000


@contextlib.contextmanager
def fewer_collections() -> Iterator[None]:
    """Run the cyclic garbage collector less often inside the block, as a shard's fetch does.

    A fetch allocates a few hundred short-lived objects per request (aiohttp's request and
    response, the parsed answer) while a chunk's answers stay alive until staged, so at
    CPython's default threshold the collector runs every few requests and keeps traversing
    the chunk: a quarter of the fetching process's CPU in a per-entity run
    (``bench/snapshot_bench``). Cycles are still collected, ``FETCH_GC_THRESHOLD``
    allocations apart. A collector the process has disabled (threshold 0) is left alone."""
    old = gc.get_threshold()
    if old[0] == 0 or old[0] >= FETCH_GC_THRESHOLD:
        yield
        return
    gc.set_threshold(FETCH_GC_THRESHOLD, *old[1:])
    try:
        yield
    finally:
        gc.set_threshold(*old)


def use_system_allocator() -> None:
    """Allocate Arrow buffers with the C library's allocator in this process, unless the
    operator chose one (``ARROW_DEFAULT_MEMORY_POOL``). ``timetravel snapshot run`` and
    ``schedule`` call it: pyarrow's default (mimalloc) keeps freed pages for reuse, which in a
    run that streams small chunks showed as 40-70 MB more peak RSS for no measurable speed
    (``bench/snapshot_bench``: 285 against 243 MB at a million contexts)."""
    if not os.environ.get("ARROW_DEFAULT_MEMORY_POOL"):
        pa.set_memory_pool(pa.system_memory_pool())


RunState = Literal["committed", "already_committed", "waiting_for_shards"]
FetcherFactory = Callable[[Any, float], Any]


@dataclass(frozen=True)
class RunOutcome:
    """What a run invocation did.

    Attributes:
        state: ``committed`` (this call committed the run), ``already_committed`` (the slot was
            committed before, or by another process meanwhile: a no-op), or
            ``waiting_for_shards`` (this call's shards are committed, others are missing).
        missing_shards: shards whose parts are not committed (for ``waiting_for_shards``).
    """

    state: RunState
    slot_us: int
    run_id: str | None
    manifest: RunManifest | None
    missing_shards: list[int] = field(default_factory=list)

    @property
    def message(self) -> str:
        slot = format_timestamp(self.slot_us)
        if self.state == "already_committed":
            return f"slot {slot} is already committed (run {self.run_id}); nothing to do"
        if self.state == "waiting_for_shards":
            return (
                f"slot {slot}: this part is committed; the run becomes visible when shards "
                f"{', '.join(map(str, self.missing_shards))} commit theirs"
            )
        assert self.manifest is not None
        conf = ", ".join(
            f"{s} {v.confidence:.3f}" for s, v in sorted(self.manifest.services.items())
        )
        return f"slot {slot}: committed run {self.run_id} (confidence: {conf})"


def parse_shard(text: str) -> tuple[int, int]:
    """``"i/n"`` (0-based) → ``(i, n)``.

    Raises:
        InvalidRunOption: unless ``0 <= i < n``.
    """
    try:
        i_s, n_s = text.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise InvalidRunOption(f"--shard {text!r} is not i/n", field="shard") from None
    if not 0 <= i < n:
        raise InvalidRunOption(f"--shard {text!r}: need 0 <= i < n (0-based)", field="shard")
    return i, n


def _default_fetcher_factory(config: Any, qps_share: float) -> Any:
    from ._fetch import ServiceFetcher

    return ServiceFetcher(config, qps_share=qps_share)


#: What a resumed or other shard's invocation must share with the slot's plan: what a row means
#: (which service answered, its key type, how long it is fresh). Timeouts, retries, concurrency,
#: QPS, headers and batching may change between invocations, to nurse a struggling service.
_PINNED_CONFIG = ("url", "entity_type", "max_staleness")


def public_config(config: Any) -> dict[str, Any]:
    """A service's configuration without secrets, as recorded in plans and manifests."""
    body = config.public_json()
    out: dict[str, Any] = dict(body)
    return out


class SnapshotRunner:
    """Runs snapshot slots against a store.

    Args:
        store: where selections are read and runs are written.
        services: the services to snapshot, by name (``load_services``).
        clock: the run clock (``captured_at``, ``committed_at``, the latest selection).
        fetcher_factory: ``(config, qps_share) -> fetcher``; default ``ServiceFetcher``.
        chunk_size: contexts per staged chunk (pinned in the plan by the first invocation).
        on_chunk: called after each chunk is staged or found staged (progress).
        stop: when set, the run stops before its next chunk and raises ``RunInterrupted``.
    """

    def __init__(
        self,
        store: Store,
        services: Mapping[str, Any],
        *,
        clock: Clock,
        fetcher_factory: FetcherFactory | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        on_chunk: Callable[[ChunkEvent], None] | None = None,
        stop: threading.Event | None = None,
    ) -> None:
        if chunk_size < 1:
            raise InvalidRunOption("chunk size must be at least 1", field="chunk_size")
        if not services:
            raise InvalidRunOption("no services to snapshot", field="services")
        self.store = store
        self.services = dict(services)
        self.clock = clock
        self.fetcher_factory = fetcher_factory or _default_fetcher_factory
        self.chunk_size = chunk_size
        self.on_chunk = on_chunk
        self.stop = stop

    # -- the operation -------------------------------------------------------------------------
    def run(
        self,
        slot_us: int,
        *,
        shard: int | None = None,
        shards: int | None = None,
        selection_id: str | None = None,
    ) -> RunOutcome:
        """Run (or resume, or finish committing) the slot ``slot_us``.

        Synchronous: it runs its own event loop, so call it from a thread where one is running.

        Args:
            shard: run only this shard (0-based); None runs every shard not yet committed.
            shards: the shard count; must match the slot's plan when one is pinned.
            selection_id: the context set; default the latest one not after now.

        Raises:
            RunConflict: the slot's pinned plan disagrees with these arguments or services.
            SelectionNotFound: no such selection, or none selected by now.
            RunInterrupted: ``stop`` was set; what was staged is kept for the resume.
            InvalidRunOption: the slot is after now, or ``shard`` is not one of the plan's.
        """
        if slot_us > self.clock.now_us():
            raise InvalidRunOption(
                f"slot {format_timestamp(slot_us)} is after now "
                f"({format_timestamp(self.clock.now_us())}): a run cannot snapshot the future",
                field="slot",
            )
        self._finish_earlier(slot_us)
        done = load_manifest(self.store, slot_us)
        if done is not None:
            self._finish(done)  # a crash after the commit may have left these undone
            if selection_id is not None and selection_id != done.selection_id:
                raise RunConflict(
                    f"slot {format_timestamp(slot_us)} was committed with selection "
                    f"{done.selection_id}, not {selection_id}: a slot has one run"
                )
            return RunOutcome("already_committed", slot_us, done.run_id, done)
        plan = self._plan(slot_us, shards=shards, selection_id=selection_id)
        if shard is not None and not 0 <= shard < plan.shards:
            raise InvalidRunOption(
                f"shard {shard} is not in 0..{plan.shards - 1} (the slot has {plan.shards})",
                field="shard",
            )
        have = committed_parts(self.store, plan)
        todo = [shard] if shard is not None else list(range(plan.shards))
        todo = [i for i in todo if i not in have]
        if todo:
            selection = _selection_table(self.store, plan.selection_id)
            for i in todo:
                log.info(
                    "event=shard_start slot=%s run_id=%s shard=%d/%d contexts_total=%d",
                    format_timestamp(slot_us), plan.run_id, i, plan.shards, selection.num_rows,
                )
                with fewer_collections():
                    chunks = asyncio.run(self._stage_shard(plan, i, selection))
                done = load_manifest(self.store, slot_us)
                if done is not None:  # another process committed while we fetched
                    return RunOutcome("already_committed", slot_us, done.run_id, done)
                have[i] = commit_part(self.store, plan, i, chunks, self.clock)
                log.info("event=part_committed run_id=%s shard=%d/%d", plan.run_id, i, plan.shards)
        have = committed_parts(self.store, plan)
        missing = [i for i in range(plan.shards) if i not in have]
        if missing:
            return RunOutcome("waiting_for_shards", slot_us, plan.run_id, None, missing)
        try:
            manifest = commit_run(self.store, plan, have, self.clock)
        except (RunAlreadyCommitted, ObjectNotFound):
            # Another process committed first (and may have cleaned the staging we read).
            done = load_manifest(self.store, slot_us)
            if done is None:
                raise
            return RunOutcome("already_committed", slot_us, plan.run_id, done)
        log.info("event=run_committed run_id=%s", plan.run_id)
        cleanup_staging(self.store, slot_us)
        return RunOutcome("committed", slot_us, plan.run_id, manifest)

    def _finish_earlier(self, slot_us: int) -> None:
        """Finish other slots' committed runs that a crash left unpublished or with staging:
        the scheduler never runs an earlier slot again, so this is where they get finished."""
        try:
            for s in unfinished_commits(self.store):
                done = load_manifest(self.store, s) if s != slot_us else None
                if done is not None:
                    self._finish(done)
        except Exception as exc:  # noqa: BLE001 - this run goes on either way
            log.warning("could not finish earlier commits: %s", exc)

    def _finish(self, done: RunManifest) -> None:
        """Publish a committed run's objects and delete its staging, if a crash after the commit
        left either undone. A failure here is only logged: the run is committed, and the next
        run or tick of the slot tries again."""
        try:
            n = publish_run(self.store, done)
            if n:
                log.info("event=run_published run_id=%s objects=%d (finished after a crash)",
                         done.run_id, n)
            cleanup_staging(self.store, done.slot_us)
        except Exception as exc:  # noqa: BLE001 - committed either way
            log.warning("run %s: could not finish publishing or cleaning up: %s", done.run_id,
                        exc)

    # -- the plan ------------------------------------------------------------------------------
    def _plan(self, slot_us: int, *, shards: int | None, selection_id: str | None) -> RunPlan:
        if shards is not None and shards < 1:
            raise InvalidRunOption("the shard count must be at least 1", field="shard")
        for _ in range(3):
            try:
                plan = RunPlan.from_json(self.store.get(plan_key(slot_us)))
            except ObjectNotFound:
                pass
            else:
                self._check_plan(plan, shards=shards, selection_id=selection_id)
                return plan
            sel = selection_id or _latest_selection_id(self.store, self.clock.now_us())
            if selection_id is not None:
                from ._selections import load_design

                load_design(self.store, sel)  # raises SelectionNotFound
            plan = RunPlan(
                run_id=run_id_for(slot_us, sel),
                slot_us=slot_us,
                selection_id=sel,
                shards=shards or 1,
                chunk_size=self.chunk_size,
                services={n: public_config(c) for n, c in sorted(self.services.items())},
                created_at_us=self.clock.now_us(),
            )
            try:
                self.store.put_if_absent(plan_key(slot_us), plan.to_json())
            except ObjectExists:
                continue  # another shard pinned it first: adopt theirs
            log.info(
                "event=plan slot=%s run_id=%s selection_id=%s shards=%d",
                format_timestamp(slot_us), plan.run_id, sel, plan.shards,
            )
            return plan
        raise RunConflict(f"could not pin the plan of slot {format_timestamp(slot_us)}")

    def _check_plan(self, plan: RunPlan, *, shards: int | None, selection_id: str | None) -> None:
        slot = format_timestamp(plan.slot_us)
        if shards is not None and shards != plan.shards:
            raise RunConflict(
                f"slot {slot} was started with {plan.shards} shard(s), not {shards}"
            )
        if selection_id is not None and selection_id != plan.selection_id:
            raise RunConflict(
                f"slot {slot} was started with selection {plan.selection_id}, not {selection_id}"
            )
        if sorted(self.services) != sorted(plan.services):
            raise RunConflict(
                f"slot {slot} was started with services {sorted(plan.services)}, "
                f"not {sorted(self.services)}"
            )
        for name, config in sorted(self.services.items()):
            mine, pinned = public_config(config), plan.services[name]
            for key in _PINNED_CONFIG:
                if mine.get(key) != pinned.get(key):
                    raise RunConflict(
                        f"slot {slot} was started with {name}.{key} = {pinned.get(key)!r}, not "
                        f"{mine.get(key)!r}: one run's rows come from one service"
                    )

    # -- one shard -----------------------------------------------------------------------------
    async def _stage_shard(
        self, plan: RunPlan, shard: int, selection: pa.Table
    ) -> dict[str, list[StagedChunk]]:
        entities = selection.column("entity_id").combine_chunks()
        weights = selection.column("weight").combine_chunks()
        if weights.type != pa.float64():
            weights = weights.cast(pa.float64())
        if plan.shards > 1:  # one shard is the whole selection: no copy
            idx = pa.array(shard_indices(entities, shard, plan.shards))
            entities, weights = entities.take(idx), weights.take(idx)
        async with contextlib.AsyncExitStack() as stack:
            writer = stack.enter_context(
                ThreadPoolExecutor(max_workers=1, thread_name_prefix="tt-stage")
            )
            stagers = []
            for name in sorted(plan.services):
                config = self.services[name]
                fetcher = await _enter(stack, self.fetcher_factory(config, 1.0 / plan.shards))
                stagers.append(
                    ServiceStager(
                        store=self.store,
                        plan=plan,
                        shard=shard,
                        service=name,
                        fetcher=fetcher,
                        entities=_as_key_type(entities, config, name),
                        weights=weights,
                        frozen=load_types(self.store, name).fields,
                        clock=self.clock,
                        stop=self.stop,
                        on_chunk=self.on_chunk,
                        executor=writer,
                    )
                )
            try:
                async with asyncio.TaskGroup() as tg:
                    tasks = {s.service: tg.create_task(s.run()) for s in stagers}
            except BaseExceptionGroup as eg:
                raise first_error(eg) from None
        return {name: t.result() for name, t in tasks.items()}


async def _enter(stack: contextlib.AsyncExitStack, fetcher: Any) -> Fetcher:
    """Enter a fetcher's async context (or register its close) so its sessions are closed."""
    if hasattr(fetcher, "__aenter__"):
        entered: Fetcher = await stack.enter_async_context(fetcher)
        return entered
    if hasattr(fetcher, "aclose"):
        stack.push_async_callback(fetcher.aclose)
    elif hasattr(fetcher, "close"):
        close = fetcher.close
        if asyncio.iscoroutinefunction(close):
            stack.push_async_callback(close)
        else:
            stack.callback(close)
    out: Fetcher = fetcher
    return out


def _as_key_type(entities: pa.Array, config: Any, service: str) -> pa.Array:
    target = pa.int64() if getattr(config, "entity_type", "int64") == "int64" else pa.string()
    if entities.type == target:
        return entities
    try:
        out: pa.Array = pc.cast(entities, target)
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError) as exc:
        raise InvalidRunOption(
            f"service {service!r} takes {target} keys; the selection's keys "
            f"({entities.type}) do not convert: {exc}",
            field="entity_type",
        ) from exc
    return out


# -- selections (snapshotter's context sets) ---------------------------------------------------


def _selection_table(store: Store, selection_id: str) -> pa.Table:
    """The selection's ``entity_id`` and ``weight`` columns, and only those: the other columns
    of a large context set (strata as strings) would double the run's peak memory."""
    from ._selections import CONTEXTS_NAME, load_design, selection_key

    load_design(store, selection_id)  # raises SelectionNotFound for an uncommitted set
    return store.read_parquet(
        selection_key(selection_id, CONTEXTS_NAME), columns=["entity_id", "weight"]
    )


def _latest_selection_id(store: Store, now_us: int) -> str:
    """The id of the latest context set not after ``now_us`` (as ``latest_selection`` picks it:
    greatest ``selected_at``, then committed last, then greatest id), from the designs alone."""
    from ._selections import list_selections

    designs = [d for d in list_selections(store) if d.selected_at_us <= now_us]
    if not designs:
        raise SelectionNotFound(
            f"no context set was selected at or before {format_timestamp(now_us)}; "
            "run `timetravel snapshot select` first"
        )
    best = max(designs, key=lambda d: (d.selected_at_us, d.committed_at_us or -1, d.selection_id))
    return best.selection_id
