"""The ingest server, ``timetravel facts serve``: declare fact types and post facts over HTTP.

Routes (SPEC §7), on the shared plumbing of :mod:`ttstore` (auth, error shape, limits, metrics):

- ``PUT /v1/fact-types/{name}`` (write): declare or evolve a fact type; 201 when a new version
  was stored, 200 when the declaration was already compatible.
- ``GET /v1/fact-types`` and ``GET /v1/fact-types/{name}`` (read): the declarations in force.
- ``POST /v1/facts/{fact_type}`` (write): a JSON array, NDJSON or an Arrow IPC stream of facts;
  ``202 {"accepted": N, "rejected": [...]}`` once every accepted fact is durable.
- ``POST /v1/flush`` (write): returns once everything accepted so far is in the store.
- ``GET /healthz``, ``GET /metrics`` (no token), ``GET /openapi.json`` (read).

The server stamps ``ingested_at`` and (unless supplied) ``logged_at`` from its clock, and takes
``producer`` from the token's name. Accepted facts go to one :class:`~factlog.FactLogger`, whose
spool makes them durable before the server answers; SIGTERM flushes (bounded) and exits.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from prometheus_client import CollectorRegistry, Counter

from ttstore import (
    Authenticator,
    Clock,
    InvalidInput,
    RouteTable,
    Store,
    add_common_options,
    add_server_options,
    auth_from_args,
    check_name,
    clock_from_now,
    json_response,
    make_app,
    open_store,
    principal,
    read_body,
    read_json,
    run_app,
)

from ._bodies import FACT_BODY_TYPES, body_kind, parse_facts
from ._errors import FactValidationError
from ._facttypes import FactType, FactTypeCatalog
from ._logger import FactLogger
from ._validate import DEFAULT_SKEW_US

log = logging.getLogger(__name__)

DEFAULT_PORT = 8081
DEFAULT_SPOOL_DIR = "./timetravel-spool"
DEFAULT_MAX_BODY_BYTES = 64 * 1024 * 1024
#: The logger's producer name (its writer id and heartbeat); each fact's ``producer`` column is
#: the name of the token that posted it.
SERVER_PRODUCER = "timetravel-ingest"

T = TypeVar("T")


@dataclass(frozen=True, kw_only=True)
class IngestConfig:
    """How the ingest server behaves.

    Attributes:
        max_body_bytes: larger request bodies get 413.
        durable_timeout_s: how long ``POST /v1/facts`` waits for buffer room and for its facts
            to become durable before answering 503.
        flush_timeout_s: how long ``POST /v1/flush`` waits before 503 ``flush_timeout``.
        shutdown_flush_timeout_s: how long the final flush on SIGTERM may take; what is not
            uploaded by then stays in the spool for the next start.
        skew_us: how far a supplied ``event_time``/``logged_at`` may run ahead of the clock.
    """

    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
    durable_timeout_s: float = 30.0
    flush_timeout_s: float = 60.0
    shutdown_flush_timeout_s: float = 30.0
    skew_us: int = DEFAULT_SKEW_US

    def __post_init__(self) -> None:
        for name in ("max_body_bytes", "durable_timeout_s", "flush_timeout_s",
                     "shutdown_flush_timeout_s"):
            if not getattr(self, name) > 0:
                raise InvalidInput(f"{name} must be positive, not {getattr(self, name)!r}",
                                   field=name)
        if self.skew_us < 0:
            raise InvalidInput(f"skew_us must not be negative, not {self.skew_us!r}",
                               field="skew_us")


class _Ingest:
    def __init__(self, *, store: Store, clock: Clock, config: IngestConfig,
                 registry: CollectorRegistry) -> None:
        self.store = store
        self.clock = clock
        self.config = config
        self.catalog = FactTypeCatalog(store, clock=clock)
        self.logger: FactLogger | None = None
        self.facts = Counter("timetravel_ingest_facts_total",
                             "facts received over HTTP, by fact type and outcome",
                             ["fact_type", "outcome"], registry=registry)
        self.rejections = Counter("timetravel_ingest_rejected_total",
                                  "facts rejected over HTTP, by fact type and reason",
                                  ["fact_type", "code"], registry=registry)

    async def _off_loop(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        # Store I/O and validation of large bodies run on a thread: /healthz stays responsive.
        return await asyncio.get_running_loop().run_in_executor(
            None, functools.partial(fn, *args, **kwargs))

    def _logger(self) -> FactLogger:
        if self.logger is None:
            raise RuntimeError("the ingest server's logger is not running")
        return self.logger

    def health(self) -> dict[str, Any]:
        if self.logger is None:
            return {"service": "ingest"}
        s = self.logger.stats()
        return {"service": "ingest", "writer_id": s.writer_id, "accepted": s.accepted,
                "durable": s.durable, "written": s.written, "spool_segments": s.spool_segments,
                "last_flush_age_s": round(s.last_flush_age_s, 3)}

    async def put_fact_type(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["name"], what="fact type")
        body = await read_json(request)
        declared = await self._off_loop(self.catalog.declare, FactType.from_json(name, body))
        return json_response(
            {**declared.fact_type.to_json(), "version": declared.version,
             "created": declared.created},
            status=201 if declared.created else 200)

    async def get_fact_type(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["name"], what="fact type")
        version, ft = await self._off_loop(self.catalog.get_versioned, name, refresh=True)
        return json_response({**ft.to_json(), "version": version})

    async def list_fact_types(self, request: web.Request) -> web.Response:
        fts = await self._off_loop(self.catalog.all)
        return json_response({"fact_types": [ft.to_json() for ft in fts]})

    async def post_facts(self, request: web.Request) -> web.Response:
        name = check_name(request.match_info["fact_type"], what="fact type")
        kind = body_kind(request.headers.get("Content-Type"))
        body = await read_body(request)
        producer = principal(request).name
        version, ft = await self._off_loop(self.catalog.get_versioned, name)
        now_us = self.clock.now_us()
        parse = functools.partial(parse_facts, body=body, kind=kind, now_us=now_us,
                                  producer=producer, skew_us=self.config.skew_us)
        try:
            parsed = await self._off_loop(parse, ft)
        except FactValidationError as exc:  # a whole Arrow column
            if exc.code != "unknown_field":
                raise
            fresh_version, fresh = await self._off_loop(
                self.catalog.get_versioned, name, refresh=True)
            if fresh_version == version:
                raise
            parsed = await self._off_loop(parse, fresh)
        else:
            if any(r.code == "unknown_field" for r in parsed.rejected):
                # Another replica may have evolved the type since we cached it: look again.
                fresh_version, fresh = await self._off_loop(
                    self.catalog.get_versioned, name, refresh=True)
                if fresh_version != version:
                    parsed = await self._off_loop(parse, fresh)
        accepted = parsed.table.num_rows
        if accepted:
            logger = self._logger()
            timeout_s = self.config.durable_timeout_s
            seq = await self._off_loop(logger.append_facts, name, parsed.table,
                                       timeout_s=timeout_s)
            await logger.await_durable(seq, timeout_s)
        self.facts.labels(name, "accepted").inc(accepted)
        self.facts.labels(name, "rejected").inc(len(parsed.rejected))
        for r in parsed.rejected:
            self.rejections.labels(name, r.code).inc()
        return json_response(
            {"accepted": accepted, "rejected": [r.to_json() for r in parsed.rejected]},
            status=202)

    async def flush(self, request: web.Request) -> web.Response:
        await self._logger().aflush(self.config.flush_timeout_s)
        return json_response({"flushed": True})


def make_ingest_app(
    *,
    store: Store,
    spool_dir: str | Path,
    auth: Authenticator,
    clock: Clock,
    config: IngestConfig | None = None,
) -> web.Application:
    """The ingest server's aiohttp application.

    The logger starts with the application (on the running loop) and is closed, with a bounded
    final flush, when it shuts down.

    Args:
        store: where facts and fact types go.
        spool_dir: the logger's local write-ahead spool; after a crash, a server started on the
            same directory uploads what is left.
        auth: bearer tokens, or no auth (see :meth:`ttstore.Authenticator.from_options`).
        clock: stamps ``logged_at`` and ``ingested_at``.
        config: limits and timeouts.
    """
    config = config or IngestConfig()
    registry = CollectorRegistry()
    ingest = _Ingest(store=store, clock=clock, config=config, registry=registry)
    spool = Path(spool_dir)

    routes = _routes(ingest)
    app = make_app(routes, auth=auth, title="timetravel ingest", registry=registry,
                   max_body_bytes=config.max_body_bytes, health=ingest.health)

    async def logger_ctx(app: web.Application) -> AsyncIterator[None]:
        logger = await ingest._off_loop(
            FactLogger, store=store, producer=SERVER_PRODUCER, spool_dir=spool, clock=clock)
        logger.metrics_collector(registry)
        ingest.logger = logger
        try:
            yield
        finally:
            try:
                await logger.aclose(config.shutdown_flush_timeout_s)
            except Exception as exc:  # the spool keeps what was not uploaded
                log.warning("final flush did not finish (%s); the spool in %s keeps the rest "
                            "for the next start", exc, spool)

    app.cleanup_ctx.append(logger_ctx)
    return app


def _routes(ingest: _Ingest) -> RouteTable:
    routes = RouteTable()
    # {name:.+}: an escaping name such as '..%2Fx' reaches the handler and gets a 400, not a 404.
    routes.add("PUT", "/v1/fact-types/{name:.+}", ingest.put_fact_type, scope="write",
               summary="declare or evolve a fact type", request_types=("application/json",),
               responses={200: "compatible; nothing new stored", 201: "a new version stored",
                          400: "invalid or incompatible declaration"})
    routes.add("GET", "/v1/fact-types", ingest.list_fact_types, scope="read",
               summary="the fact types in force")
    routes.add("GET", "/v1/fact-types/{name:.+}", ingest.get_fact_type, scope="read",
               summary="one fact type in force, with its version",
               responses={200: "the declaration", 404: "unknown fact type"})
    routes.add("POST", "/v1/facts/{fact_type:.+}", ingest.post_facts, scope="write",
               summary="post facts (JSON array, NDJSON or Arrow IPC stream)",
               request_types=FACT_BODY_TYPES,
               responses={202: "accepted facts are durable; rejected rows listed",
                          400: "the body does not parse", 404: "unknown fact type",
                          413: "body too large", 503: "not durable in time"})
    routes.add("POST", "/v1/flush", ingest.flush, scope="write",
               summary="return once everything accepted so far is in the store",
               responses={200: "flushed", 503: "flush_timeout"})
    return routes


def _serve(args: argparse.Namespace) -> int:
    auth = auth_from_args(args)  # refuse to start without auth before touching anything
    config = IngestConfig(max_body_bytes=args.max_body_bytes)
    app = make_ingest_app(store=open_store(args), spool_dir=args.spool_dir, auth=auth,
                          clock=clock_from_now(args.now), config=config)
    return run_app(app, host=args.host, port=args.port)


def register_cli(fsub: Any) -> None:
    """Add ``timetravel facts serve``."""
    p: argparse.ArgumentParser = fsub.add_parser(
        "serve", help="the ingest HTTP server (default port 8081)",
        description="Ingest HTTP server: declare fact types and post facts (JSON, NDJSON or "
        "Arrow IPC). Facts are durable in the local spool before the server answers 202, then "
        "uploaded to the store. Needs --tokens-file or an explicit --no-auth.")
    add_common_options(p, now=True)
    add_server_options(p, default_port=DEFAULT_PORT, default_max_body_bytes=DEFAULT_MAX_BODY_BYTES)
    p.add_argument("--spool-dir", default=DEFAULT_SPOOL_DIR, metavar="PATH",
                   help=f"the local write-ahead spool (default {DEFAULT_SPOOL_DIR}); a server "
                   "restarted on the same directory uploads what a crash left behind")
    p.set_defaults(handler=_serve)

