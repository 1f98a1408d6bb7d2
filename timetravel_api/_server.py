"""The query server, ``timetravel api serve``: point-in-time features, raw facts, snapshots,
training-set jobs and the catalog over HTTP (SPEC §7).

Routes, on the shared plumbing of :mod:`ttstore` (auth, error shape, limits, request metrics):

- ``POST /v1/features`` (read): features for many (entity, at) rows; JSON, or an Arrow IPC
  stream with ``Accept: application/vnd.apache.arrow.stream``.
- ``GET /v1/features/{entity_id}?at=&features=a,b&knowledge=`` (read): one row.
- ``GET /v1/facts/{fact_type}/{entity_id}?at=&window=7d&knowledge=&limit=`` (read): the visible
  raw facts, newest first.
- ``GET /v1/snapshots/{service}/{entity_id}?at=&knowledge=`` (read): the as-of snapshot row with
  its provenance.
- ``POST /v1/training-sets`` (write) and ``GET /v1/training-sets/{id}`` (read): jobs whose state
  lives in the store (see :mod:`timetravel_api._jobs`).
- ``GET /v1/catalog`` (read): fact types, services, runs, selections, watermarks.
- ``GET /healthz``, ``GET /metrics`` (no token), ``GET /openapi.json`` (read).

Answers are computed by the one :class:`~timetravel_api.Engine` (on a worker thread, so the
event loop stays responsive); this module only parses, limits and encodes.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import pyarrow as pa
from aiohttp import web
from prometheus_client import CollectorRegistry, Gauge, Histogram

from factlog import FactReader, FactTypeCatalog, RowGroupCache, producer_watermarks
from snapshotter import SnapshotReader, list_selections
from ttstore import (
    Authenticator,
    Clock,
    InvalidInput,
    RouteTable,
    Store,
    TimetravelError,
    add_common_options,
    add_server_options,
    arrow_response,
    auth_from_args,
    clock_from_now,
    format_timestamp,
    json_response,
    make_app,
    open_store,
    parse_duration,
    parse_timestamp,
    positive_int,
    read_json,
    run_app,
    wants_arrow,
)

from ._codec import (
    FeatureRequest,
    entity_array,
    feature_rows_json,
    feature_table_arrow,
    parse_feature_names,
    parse_feature_request,
    parse_knowledge,
    table_to_json_rows,
)
from ._errors import TimetravelApiError
from ._jobs import JobManager, JobRequest, JobsDisabled, public_status
from ._resolve import FeatureResolver

DEFAULT_PORT = 8080
DEFAULT_MAX_BODY_BYTES = 32 * 1024 * 1024
DEFAULT_MAX_ROWS = 100_000
DEFAULT_MAX_JOBS = 2
DEFAULT_CACHE_BYTES = 256 * 1024 * 1024
#: How long one reading of the producer heartbeats serves the completeness flag (seconds).
DEFAULT_WATERMARK_CACHE_S = 0.25
DEFAULT_FACTS_LIMIT = 1000
MAX_FACTS_LIMIT = 100_000
#: Feature requests of at most this many rows run on the event loop (local stores).
INLINE_MAX_ROWS = 64

T = TypeVar("T")
log = logging.getLogger(__name__)


class UnknownService(TimetravelApiError):
    """No committed snapshot run has that service (404)."""

    code = "unknown_service"
    http_status = 404


@dataclass(frozen=True, kw_only=True)
class ApiConfig:
    """How the query server behaves.

    Attributes:
        max_body_bytes: larger request bodies get 413 ``body_too_large``.
        max_rows: more query rows in one request get 413 ``too_many_rows``.
        max_jobs: training-set jobs queued or running at once; one more gets 429.
        jobs: whether this server runs training-set jobs (and re-queues, when it starts, those
            a previous server left unfinished). Run exactly one job server per store; the
            others (read replicas) answer a new job with 503 ``jobs_disabled`` and still report
            any job's state, which lives in the store.
        cache_bytes: memory budget for decoded immutable objects (snapshot objects and fact
            row groups) kept between requests.
        warm: at start, decode fact row groups into the cache in the background, newest date
            partitions first, until it is 90% full (``/healthz`` reports the progress), so the
            first lookups of each row group do not pay for decoding it.
        workers: engine worker processes for large requests (None: the engine's default).
        watermark_cache_s: how long one reading of the producer heartbeats is reused for the
            completeness flag (0: read them for every request). A cached watermark can only be
            lower than the current one (answers say ``complete: false`` more often), except
            that a producer starting within that time is unseen for that long. Facts are never
            cached: an object flushed before a request is in its answer.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    max_rows: int = DEFAULT_MAX_ROWS
    max_jobs: int = DEFAULT_MAX_JOBS
    jobs: bool = True
    cache_bytes: int = DEFAULT_CACHE_BYTES
    warm: bool = True
    workers: int | None = None
    watermark_cache_s: float = DEFAULT_WATERMARK_CACHE_S

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "max_rows", "max_jobs"):
            if getattr(self, name) <= 0:
                raise InvalidInput(f"{name} must be positive", field=name)
        if self.cache_bytes < 0:
            raise InvalidInput("cache_bytes must not be negative", field="cache_bytes")
        if not self.watermark_cache_s >= 0:
            raise InvalidInput("watermark_cache_s must not be negative",
                               field="watermark_cache_s")


class _Api:
    def __init__(self, *, store: Store, clock: Clock, engine: Any, config: ApiConfig,
                 registry: CollectorRegistry, jobs: JobManager) -> None:
        self.store = store
        self.clock = clock
        self.engine = engine
        self.config = config
        self.jobs = jobs
        self.catalog = FactTypeCatalog(store)
        self.facts: FactReader = getattr(engine, "facts", None) or FactReader(
            store, catalog=self.catalog)
        self.snapshots: SnapshotReader = getattr(engine, "snapshots", None) or SnapshotReader(
            store, cache_bytes=config.cache_bytes)
        # The memory budget: half for decoded fact row groups, half for snapshot objects.
        self.snapshots.cache_bytes = config.cache_bytes // 2
        self.row_groups = RowGroupCache(max_bytes=config.cache_bytes // 2)
        if config.cache_bytes:
            self.facts.row_groups = self.row_groups
        self.resolver = FeatureResolver(engine=engine, snapshots=self.snapshots)
        for name, doc, fn in (
                ("timetravel_api_row_group_cache_bytes", "decoded fact row groups kept",
                 lambda: self.row_groups.bytes),
                ("timetravel_api_row_group_cache_hits", "row-group cache hits since start",
                 lambda: self.row_groups.hits),
                ("timetravel_api_row_group_cache_misses", "row-group cache misses since start",
                 lambda: self.row_groups.misses)):
            Gauge(name, doc, registry=registry).set_function(fn)
        #: the start-up warming of the row-group cache: off, running, done or failed
        self.warm_state = "running" if config.warm and config.cache_bytes else "off"
        self.warmed_groups = 0
        self._timing_children: dict[str, Any] = {}
        self.timings = Histogram(
            "timetravel_api_engine_seconds", "time spent computing answers, by operation",
            ["operation"], registry=registry,
            buckets=(0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5,
                     5, 10, 30, 60))

    async def _off_loop(self, op: str, fn: Callable[..., T], *args: Any,
                        inline: bool = False, **kwargs: Any) -> T:
        """Run ``fn`` in the default thread pool, or, with ``inline``, right here on the event
        loop: an online lookup on a local store is a millisecond of CPU, which a hop to a
        pool thread only makes dearer (a wake-up, a GIL hand-over, cold caches)."""
        def timed() -> T:
            t0 = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self._timing(op).observe(time.perf_counter() - t0)
        if inline:
            return timed()
        return await asyncio.get_running_loop().run_in_executor(None, timed)

    def _timing(self, op: str) -> Any:
        child = self._timing_children.get(op)
        if child is None:  # a label lookup per request costs more than the observation
            child = self._timing_children[op] = self.timings.labels(op)
        return child

    def _inline(self, rows: int) -> bool:
        # S3 lists and reads over the network: never block the loop on that
        return self.store.is_local and rows <= INLINE_MAX_ROWS

    def health(self) -> dict[str, Any]:
        rg = self.row_groups
        return {"service": "api", "jobs_active": self.jobs.active(),
                "row_group_cache": {"bytes": rg.bytes, "max_bytes": rg.max_bytes,
                                    "hits": rg.hits, "misses": rg.misses,
                                    "warm": self.warm_state,
                                    "warmed_groups": self.warmed_groups}}

    def warm(self, stop: threading.Event) -> None:
        """Fill the row-group cache (see :attr:`ApiConfig.warm`); run in its own thread."""
        t0 = time.monotonic()
        try:
            self.warmed_groups = self.facts.warm(stop=stop.is_set)
        except Exception as exc:  # noqa: BLE001 - a cold cache is slower, never wrong
            self.warm_state = "failed"
            log.warning("could not warm the row-group cache: %s", exc)
            return
        self.warm_state = "done"
        log.info("row-group cache warm: %d row groups, %.0f MB, in %.1f s", self.warmed_groups,
                 self.row_groups.bytes / 1e6, time.monotonic() - t0)

    # -- features --------------------------------------------------------------------------------
    def _compute(self, req: FeatureRequest) -> tuple[pa.Array, Any, frozenset[str]]:
        etype, json_cols = self.resolver.resolve(req.features)
        entities = entity_array(req.entity_ids, etype, field=req.id_field)
        result = self.engine.features(entities, req.at_us, req.features,  # int64 µs, UTC
                                      knowledge=req.knowledge, provenance=req.provenance)
        return entities, result, json_cols

    def _answer(self, request: web.Request, req: FeatureRequest, entities: pa.Array,
                result: Any, json_cols: frozenset[str], *, single: bool) -> web.Response:
        prov = result.provenance if req.provenance else None
        if wants_arrow(request):
            table = feature_table_arrow(entities, req.at_us, result.values, result.status,
                                        provenance=prov)
            resp = arrow_response(table)
            resp.headers["X-Timetravel-Complete"] = "true" if result.complete else "false"
            return resp
        rows = feature_rows_json(entities, req.at_us, result.values, result.status,
                                 json_columns=json_cols, provenance=prov)
        if single:
            return json_response({**rows[0], "complete": bool(result.complete)})
        return json_response({"rows": rows, "complete": bool(result.complete)})

    async def post_features(self, request: web.Request) -> web.Response:
        body = await read_json(request)
        req = parse_feature_request(body, max_rows=self.config.max_rows)
        entities, result, json_cols = await self._off_loop(
            "features", self._compute, req, inline=self._inline(len(req.entity_ids)))
        return self._answer(request, req, entities, result, json_cols, single=False)

    async def get_feature_row(self, request: web.Request) -> web.Response:
        q = request.query
        _only(q, ("at", "features", "knowledge", "provenance"))
        req = FeatureRequest(
            entity_ids=[request.match_info["entity_id"]],
            at_us=np.array([_at(q)], dtype=np.int64),
            features=parse_feature_names(q.get("features", "")),
            knowledge=parse_knowledge(q.get("knowledge", "as_known")),
            provenance=_flag(q, "provenance"),
            id_field="entity_id",
        )
        entities, result, json_cols = await self._off_loop(
            "feature_row", self._compute, req, inline=self._inline(1))
        return self._answer(request, req, entities, result, json_cols, single=True)

    # -- raw facts and snapshots -----------------------------------------------------------------
    def _facts(self, fact_type: str, entity_id: str, at_us: int, window: str | None,
               knowledge: str, limit: int) -> tuple[pa.Table, frozenset[str], Any]:
        ft = self.facts.fact_type(fact_type)
        ent = entity_array([entity_id], ft.entity[1], field="entity_id")
        span = parse_duration(window, field="window") if window is not None else ft.lookback_us
        start = None if span is None else at_us - span + 1
        table = self.facts.scan(fact_type, entities=ent, start_us=start, end_us=at_us,
                                logged_before_us=at_us if knowledge == "as_known" else None)
        n = table.num_rows
        newest = table.take(pa.array(np.arange(n - 1, max(n - 1 - limit, -1), -1,
                                               dtype=np.int64)))
        json_cols = frozenset(f for f, t in ft.fields.items() if t == "json")
        return newest, json_cols, ent[0].as_py()

    async def get_facts(self, request: web.Request) -> web.Response:
        q = request.query
        _only(q, ("at", "window", "knowledge", "limit"))
        fact_type = request.match_info["fact_type"]
        at_us = _at(q)
        knowledge = parse_knowledge(q.get("knowledge", "as_known"))
        limit = _int(q, "limit", DEFAULT_FACTS_LIMIT, 1, MAX_FACTS_LIMIT)
        window = q.get("window")
        table, json_cols, eid = await self._off_loop(
            "facts", self._facts, fact_type, request.match_info["entity_id"], at_us, window,
            knowledge, limit)
        if wants_arrow(request):
            return arrow_response(table)
        return json_response({
            "fact_type": fact_type, "entity_id": _json_id(eid), "at": format_timestamp(at_us),
            "knowledge": knowledge, "window": window,
            "facts": table_to_json_rows(table, json_columns=json_cols)})

    def _snapshot(self, service: str, entity_id: str, at_us: int, knowledge: str) -> pa.Table:
        etype = self.resolver.service_entity_type(service)
        if etype is None:
            raise UnknownService(f"no committed snapshot run has service {service!r}")
        ent = entity_array([entity_id], etype, field="entity_id")
        return self.snapshots.read(service, ent, np.array([at_us], dtype=np.int64),
                                   knowledge=knowledge)  # type: ignore[arg-type]

    async def get_snapshot(self, request: web.Request) -> web.Response:
        q = request.query
        _only(q, ("at", "knowledge"))
        service = request.match_info["service"]
        at_us = _at(q)
        knowledge = parse_knowledge(q.get("knowledge", "as_known"))
        table = await self._off_loop("snapshot", self._snapshot, service,
                                     request.match_info["entity_id"], at_us, knowledge)
        if wants_arrow(request):
            return arrow_response(table)
        row = table_to_json_rows(table)[0]
        payload = row.pop("payload", None)
        return json_response({
            "service": service, "entity_id": _json_id(request.match_info["entity_id"]),
            "at": format_timestamp(at_us), "knowledge": knowledge,
            "status": row.get("status"),
            "fields": payload if row.get("status") == "ok" else None,
            "weight": row.get("weight"),
            "provenance": {"run_id": row.get("run_id"), "selection_id": row.get("selection_id"),
                           "captured_at": row.get("captured_at"), "age_s": row.get("age_s")},
        })

    # -- training sets ---------------------------------------------------------------------------
    async def post_training_set(self, request: web.Request) -> web.Response:
        if not self.config.jobs:
            raise JobsDisabled("this server runs no training-set jobs (--no-jobs); send them "
                               "to the store's job server")
        req = JobRequest.from_json(await read_json(request))
        doc = await self._off_loop("training_set_submit", self.jobs.submit, req)
        return json_response(public_status(doc), status=202)

    async def get_training_set(self, request: web.Request) -> web.Response:
        doc = await self._off_loop("training_set_status", self.jobs.status,
                                   request.match_info["id"])
        return json_response(public_status(doc))

    # -- catalog ---------------------------------------------------------------------------------
    def _catalog(self) -> dict[str, Any]:
        runs = self.snapshots.runs()
        services: dict[str, Any] = {}
        for m in runs:
            for s, stats in m.services.items():
                services[s] = {"entity_type": stats.config.get("entity_type", "int64"),
                               "max_staleness_s": stats.max_staleness_us / 1e6,
                               "fields": self.snapshots.fields(s)}
        marks = producer_watermarks(self.store, now_us=self.clock.now_us())
        return {
            "fact_types": [{**ft.to_json(), "name": ft.name,
                            "watermark": _ts(marks.get(ft.name))}
                           for ft in self.catalog.all()],
            "services": services,
            "runs": [{"run_id": m.run_id, "slot": format_timestamp(m.slot_us),
                      "selection_id": m.selection_id,
                      "committed_at": format_timestamp(m.committed_at_us),
                      "services": {s: st.to_body() for s, st in m.services.items()}}
                     for m in runs],
            "selections": [{"selection_id": d.selection_id,
                            "selected_at": format_timestamp(d.selected_at_us),
                            "entity_type": d.entity_type, "strata": list(d.strata),
                            "allocation": d.allocation_used, "sample_size": d.sample_size,
                            "population_size": d.population_size}
                           for d in list_selections(self.store)],
            "watermarks": {ft: _ts(us) for ft, us in sorted(marks.items())},
            "now": format_timestamp(self.clock.now_us()),
        }

    async def get_catalog(self, request: web.Request) -> web.Response:
        return json_response(await self._off_loop("catalog", self._catalog))


def _ts(us: int | None) -> str | None:
    return None if us is None else format_timestamp(us)


def _json_id(v: Any) -> Any:
    return v if not isinstance(v, int) or abs(v) <= 2**53 else str(v)


def _only(q: Mapping[str, str], allowed: tuple[str, ...]) -> None:
    bad = sorted(set(q) - set(allowed))
    if bad:
        raise InvalidInput(f"unknown query parameter(s) {', '.join(bad)}; this route takes "
                           f"{', '.join(allowed)}", field=bad[0])


def _at(q: Mapping[str, str]) -> int:
    if "at" not in q:
        raise InvalidInput("at: required (an RFC 3339 time with an offset)", field="at")
    return parse_timestamp(q["at"], field="at")


def _flag(q: Mapping[str, str], name: str) -> bool:
    v = q.get(name, "false").lower()
    if v not in ("true", "false", "1", "0"):
        raise InvalidInput(f"{name}: must be true or false", field=name)
    return v in ("true", "1")


def _int(q: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    if name not in q:
        return default
    try:
        v = int(q[name])
    except ValueError:
        v = lo - 1
    if not lo <= v <= hi:
        raise InvalidInput(f"{name}: must be an integer from {lo} to {hi}", field=name)
    return v


def make_api_app(
    *,
    store: Store,
    auth: Authenticator,
    clock: Clock,
    repo: str | None = None,
    config: ApiConfig | None = None,
    engine: Any = None,
) -> web.Application:
    """The query server's aiohttp application.

    Training-set jobs left unfinished by a previous server on the same store are re-queued when
    the application starts; a graceful stop leaves running ones queued for the next start.

    Args:
        store: where facts, snapshots, fact types and job state are.
        auth: bearer tokens, or no auth (see :meth:`ttstore.Authenticator.from_options`).
        clock: the server's now (completeness watermarks, job times).
        repo: the feature repo module path, for named encoders.
        config: limits and cache budget.
        engine: the :class:`~timetravel_api.Engine` to use (one on ``store`` by default).
    """
    config = config or ApiConfig()
    if engine is None:
        from ._engine import Engine
        engine = Engine(store, repo=repo, clock=clock, workers=config.workers,
                        watermark_cache_s=config.watermark_cache_s)
    registry = CollectorRegistry()
    jobs = JobManager(store=store, clock=clock, max_jobs=config.max_jobs,
                      build=functools.partial(_build, store=store, repo=repo, clock=clock,
                                              workers=config.workers))
    api = _Api(store=store, clock=clock, engine=engine, config=config, registry=registry,
               jobs=jobs)
    jobs.check = lambda req: api.resolver.resolve(req.features) and None
    app = make_app(_routes(api), auth=auth, title="timetravel query API", registry=registry,
                   max_body_bytes=config.max_body_bytes, health=api.health)

    async def jobs_ctx(app: web.Application) -> AsyncIterator[None]:
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(None, jobs.recover)
        except TimetravelError as exc:  # serve anyway; the jobs stay as recorded
            log.warning("could not re-queue unfinished training-set jobs: %s", exc)
        try:
            yield
        finally:
            await loop.run_in_executor(None, jobs.close)

    async def warm_ctx(app: web.Application) -> AsyncIterator[None]:
        stop = threading.Event()
        thread = threading.Thread(target=api.warm, args=(stop,), name="row-group-warm",
                                  daemon=True)
        thread.start()
        try:
            yield
        finally:
            stop.set()
            await asyncio.get_running_loop().run_in_executor(None, thread.join, 10)

    if config.jobs:
        app.cleanup_ctx.append(jobs_ctx)
    if api.warm_state == "running":
        app.cleanup_ctx.append(warm_ctx)
    return app


def _build(labels: pa.Table, features: list[str], knowledge: str,
           progress: Callable[[float], None], *, store: Store, repo: str | None,
           clock: Clock, workers: int | None) -> pa.Table:
    from ._training import build_training_set  # noqa: PLC0415

    return build_training_set(labels, features, store=store, repo=repo, knowledge=knowledge,
                              engine="local", workers=workers, clock=clock, progress=progress)


def _routes(api: _Api) -> RouteTable:
    routes = RouteTable()
    arrow = "JSON, or an Arrow IPC stream with Accept: application/vnd.apache.arrow.stream"
    routes.add("POST", "/v1/features", api.post_features, scope="read",
               summary="point-in-time features for (entity_id, at) rows",
               request_types=("application/json",),
               responses={200: arrow, 400: "invalid rows, features or knowledge",
                          413: "too many rows or body too large"})
    routes.add("GET", "/v1/features/{entity_id}", api.get_feature_row, scope="read",
               summary="point-in-time features of one entity at one time",
               responses={200: arrow, 400: "invalid at, features or knowledge"})
    routes.add("GET", "/v1/facts/{fact_type}/{entity_id}", api.get_facts, scope="read",
               summary="the raw facts visible at a time, newest first",
               responses={200: arrow, 404: "unknown fact type"})
    routes.add("GET", "/v1/snapshots/{service}/{entity_id}", api.get_snapshot, scope="read",
               summary="the as-of snapshot row with its provenance",
               responses={200: arrow, 404: "unknown service"})
    routes.add("POST", "/v1/training-sets", api.post_training_set, scope="write",
               summary="start a training-set build job", request_types=("application/json",),
               responses={202: "queued: {id, state, progress, out, error}",
                          400: "invalid request or output exists", 404: "no labels object",
                          429: "too many jobs"})
    routes.add("GET", "/v1/training-sets/{id}", api.get_training_set, scope="read",
               summary="a training-set job's state",
               responses={200: "{id, state, progress, out, error}", 404: "no such job"})
    routes.add("GET", "/v1/catalog", api.get_catalog, scope="read",
               summary="fact types, services, runs, selections, watermarks")
    return routes


def _seconds(text: str) -> float:
    try:
        s = float(text)
    except ValueError:
        s = -1.0
    if not 0 <= s < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative number of seconds")
    return s


def _non_negative(text: str) -> int:
    try:
        n = int(text)
    except ValueError:
        n = -1
    if n < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a non-negative integer")
    return n


def _serve(args: argparse.Namespace) -> int:
    auth = auth_from_args(args)  # refuse to start without auth before touching anything
    config = ApiConfig(max_body_bytes=args.max_body_bytes, max_rows=args.max_rows,
                       max_jobs=args.max_jobs, jobs=not args.no_jobs,
                       cache_bytes=args.cache_bytes, warm=not args.no_warm,
                       workers=args.workers, watermark_cache_s=args.watermark_cache_s)
    app = make_api_app(store=open_store(args), auth=auth, clock=clock_from_now(args.now),
                       repo=args.repo, config=config)
    return run_app(app, host=args.host, port=args.port)


def register_cli(asub: Any) -> None:
    """Add ``timetravel api serve``."""
    p: argparse.ArgumentParser = asub.add_parser(
        "serve", help="the query HTTP server (default port 8080)",
        description="Query HTTP server: point-in-time features, raw facts, snapshots, "
        "training-set jobs and the catalog, as JSON or Arrow IPC. Needs --tokens-file or an "
        "explicit --no-auth.")
    add_common_options(p, now=True)
    add_server_options(p, default_port=DEFAULT_PORT, default_max_body_bytes=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--max-rows", type=positive_int, default=DEFAULT_MAX_ROWS, metavar="N",
                   help=f"query rows per request; more get 413 (default {DEFAULT_MAX_ROWS})")
    p.add_argument("--max-jobs", type=positive_int, default=DEFAULT_MAX_JOBS, metavar="N",
                   help=f"training-set jobs at once; more get 429 (default {DEFAULT_MAX_JOBS})")
    p.add_argument("--no-jobs", action="store_true",
                   help="run no training-set jobs and re-queue none at start (a read replica: "
                   "POST /v1/training-sets answers 503 jobs_disabled); run one job server per "
                   "store")
    p.add_argument("--cache-bytes", type=_non_negative, default=DEFAULT_CACHE_BYTES,
                   metavar="N", help="memory budget for cached immutable data (default "
                   f"{DEFAULT_CACHE_BYTES})")
    p.add_argument("--no-warm", action="store_true",
                   help="do not fill the row-group cache at start (by default a background "
                   "thread decodes fact row groups, newest dates first, until the cache is 90%% "
                   "full; /healthz shows row_group_cache.warm)")
    p.add_argument("--workers", type=positive_int, default=None, metavar="N",
                   help="engine worker processes for large requests (default: the engine's)")
    p.add_argument("--watermark-cache-s", type=_seconds, default=DEFAULT_WATERMARK_CACHE_S,
                   metavar="S", help="reuse one reading of the producer heartbeats (the "
                   "completeness flag) for this long; 0 reads them per request (default "
                   f"{DEFAULT_WATERMARK_CACHE_S})")
    p.set_defaults(handler=_serve)
