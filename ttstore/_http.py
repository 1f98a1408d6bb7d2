"""HTTP server plumbing shared by the ingest and query servers (aiohttp).

A server declares its routes in a :class:`RouteTable`, each with the scope it needs, and
:func:`make_app` builds the application around them:

- ``/healthz`` and ``/metrics`` (Prometheus text), which need no token, and ``/openapi.json``
  (``read``), generated from the route table so it always describes the real routes;
- auth: a bearer token from the tokens file, or everyone anonymous with ``--no-auth``; a missing
  or unknown token is 401 ``unauthorized`` (with ``WWW-Authenticate: Bearer``), a token without
  the route's scope is 403 ``forbidden``;
- errors: every error body is ``{"error": {"code": ..., "message": ...}}``; a
  :class:`~ttstore.TimetravelError` answers with its ``http_status`` and ``code``, aiohttp's own
  (unknown route, wrong method, body too large) are mapped to the same shape, and anything else
  is a 500 ``internal`` whose traceback goes to the server log only;
- a request body limit (413 ``body_too_large``);
- request count and latency metrics per route.

:func:`run_app` serves an application until SIGTERM or SIGINT, then shuts down gracefully,
running the application's cleanup hooks (such as a final flush).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import signal
import time
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
from aiohttp import web
from aiohttp.web_urldispatcher import AbstractRoute
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Histogram,
    generate_latest,
)

from ._auth import ANONYMOUS, READ, SCOPES, Authenticator, Principal, Unauthorized
from ._config import ENV_TOKENS_FILE
from ._errors import InvalidInput, TimetravelError

log = logging.getLogger(__name__)

#: A route anyone may call, with no token.
PUBLIC = "public"
ARROW_STREAM = "application/vnd.apache.arrow.stream"
DEFAULT_HOST = "127.0.0.1"
DEFAULT_SHUTDOWN_TIMEOUT_S = 30.0

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

PRINCIPAL = web.RequestKey("principal", Principal)
REGISTRY = web.AppKey("registry", CollectorRegistry)
_SCOPES = web.AppKey("route_scopes", dict)
_MAX_BODY = web.AppKey("max_body_bytes", int)

# aiohttp's own errors → our codes.
_STATUS_CODES = {
    400: "bad_request",
    401: "unauthorized",
    403: "forbidden",
    404: "not_found",
    405: "method_not_allowed",
    413: "body_too_large",
    415: "unsupported_media_type",
    429: "too_many_requests",
    503: "unavailable",
}


class InvalidBody(InvalidInput):
    """A request body that does not parse at all (400)."""

    code = "invalid_body"


class UnsupportedMediaType(InvalidInput):
    """A request body in a Content-Type the route does not take (400)."""

    code = "unsupported_media_type"


@dataclass(frozen=True, kw_only=True)
class Route:
    """One HTTP route and what it needs.

    Attributes:
        scope: ``"read"``, ``"write"``, or :data:`PUBLIC` (no token).
        summary: one line for ``/openapi.json``.
        request_types: the body Content-Types it takes (for ``/openapi.json``).
        responses: status → description (for ``/openapi.json``).
    """

    method: str
    path: str
    handler: Handler
    scope: str
    summary: str
    request_types: tuple[str, ...] = ()
    responses: Mapping[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.scope not in (*SCOPES, PUBLIC):
            raise ValueError(f"route {self.method} {self.path}: scope must be read, write or "
                             f"public, not {self.scope!r}")


class RouteTable:
    """The routes of a server, each declared with the scope it needs."""

    def __init__(self) -> None:
        self._routes: list[Route] = []

    def add(
        self,
        method: str,
        path: str,
        handler: Handler,
        *,
        scope: str,
        summary: str,
        request_types: tuple[str, ...] = (),
        responses: Mapping[int, str] | None = None,
    ) -> None:
        """Add a route. ``scope`` is ``"read"``, ``"write"`` or :data:`PUBLIC`."""
        self._routes.append(Route(
            method=method.upper(), path=path, handler=handler, scope=scope, summary=summary,
            request_types=request_types, responses=dict(responses or {}),
        ))

    def __iter__(self) -> Iterator[Route]:
        return iter(self._routes)


def principal(request: web.Request) -> Principal:
    """Who made ``request`` (set by the auth middleware)."""
    return request[PRINCIPAL]


def json_response(data: Any, *, status: int = 200,
                  headers: Mapping[str, str] | None = None) -> web.Response:
    """A JSON response (UTF-8, compact)."""
    return web.Response(
        body=json.dumps(data, separators=(",", ":"), ensure_ascii=False).encode(),
        status=status, content_type="application/json", charset="utf-8",
        headers=dict(headers or {}),
    )


def wants_arrow(request: web.Request) -> bool:
    """Whether the client asked for an Arrow IPC stream (``Accept``)."""
    return ARROW_STREAM in request.headers.get("Accept", "")


def arrow_response(table: pa.Table, *, status: int = 200) -> web.Response:
    """``table`` as an Arrow IPC stream."""
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    return web.Response(body=sink.getvalue().to_pybytes(), status=status,
                        content_type=ARROW_STREAM)


def error_body(code: str, message: str, *, field: str | None = None) -> dict[str, Any]:
    err: dict[str, Any] = {"code": code, "message": message}
    if field is not None:
        err["field"] = field
    return {"error": err}


def error_response(code: str, message: str, *, status: int, field: str | None = None,
                   headers: Mapping[str, str] | None = None) -> web.Response:
    return json_response(error_body(code, message, field=field), status=status, headers=headers)


async def read_body(request: web.Request) -> bytes:
    """The whole request body, within the application's size limit.

    Raises:
        web.HTTPRequestEntityTooLarge: answered as 413 ``body_too_large``.
    """
    return await request.read()


async def read_json(request: web.Request, *, empty: Any = ...) -> Any:
    """The request body parsed as JSON; ``empty`` (if given) for an empty body.

    Raises:
        InvalidBody: it is not UTF-8 JSON.
    """
    body = await read_body(request)
    if not body.strip() and empty is not ...:
        return empty
    try:
        return json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise InvalidBody(f"the body is not valid JSON: {exc}") from None


class _Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.requests = Counter(
            "timetravel_http_requests_total", "HTTP requests answered, by route and status",
            ["method", "route", "status"], registry=registry)
        self.latency = Histogram(
            "timetravel_http_request_duration_seconds", "HTTP request latency, by route",
            ["method", "route"], registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
        # label children by their labels: a lookup through prometheus_client per request costs
        # more than the increment (routes are the app's own, so these stay few)
        self._children: dict[tuple[str, ...], tuple[Any, Any]] = {}

    def observe(self, method: str, route: str, status: str, seconds: float) -> None:
        key = (method, route, status)
        hit = self._children.get(key)
        if hit is None:
            hit = (self.requests.labels(method, route, status),
                   self.latency.labels(method, route))
            if len(self._children) < 1024:  # odd methods from clients must not grow it
                self._children[key] = hit
        hit[0].inc()
        hit[1].observe(seconds)


def _route_label(request: web.Request) -> str:
    route = request.match_info.route
    resource = route.resource
    if request.match_info.http_exception is not None or resource is None:
        return "unmatched"
    return resource.canonical


def _middlewares(auth: Authenticator, metrics: _Metrics) -> list[Any]:
    @web.middleware
    async def metrics_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        t0 = time.perf_counter()
        status = 500
        try:
            resp = await handler(request)
            status = resp.status
            return resp
        except web.HTTPException as exc:
            status = exc.status
            raise
        finally:
            metrics.observe(request.method, _route_label(request), str(status),
                            time.perf_counter() - t0)

    @web.middleware
    async def errors_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = _STATUS_CODES.get(exc.status, "bad_request" if exc.status < 500 else "internal")
            if exc.status == 413:
                message = (f"the request body is larger than the limit of "
                           f"{request.app[_MAX_BODY]} bytes")
            elif exc.status == 404:
                message = f"no route for {request.path}"
            elif exc.status == 405:
                message = f"{request.method} is not allowed on {request.path}"
            else:
                message = exc.reason
            headers = {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
            return error_response(code, message, status=exc.status, headers=headers)
        except TimetravelError as exc:
            headers = {"WWW-Authenticate": "Bearer"} if isinstance(exc, Unauthorized) else {}
            if exc.http_status >= 500:
                log.warning("%s %s -> %s %s: %s", request.method, request.path,
                            exc.http_status, exc.code, exc.message)
            return error_response(exc.code, exc.message, status=exc.http_status,
                                  field=getattr(exc, "field", None), headers=headers)
        except Exception:
            log.exception("unhandled error on %s %s", request.method, request.path)
            return error_response("internal", "internal server error (see the server log)",
                                  status=500)

    @web.middleware
    async def auth_mw(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.match_info.http_exception is not None:
            return await handler(request)  # 404/405: nothing to authorize
        scopes: dict[AbstractRoute, str] = request.app[_SCOPES]
        scope = scopes.get(request.match_info.route)
        if scope is None:
            # A route added around the RouteTable: fail closed.
            raise RuntimeError(f"route {request.method} {request.path} declares no scope")
        if scope == PUBLIC:
            request[PRINCIPAL] = ANONYMOUS if auth.no_auth else Principal("public", frozenset())
            return await handler(request)
        who = auth.authenticate(request.headers.get("Authorization"))
        auth.authorize(who, scope)
        request[PRINCIPAL] = who
        limit = request.app[_MAX_BODY]
        if request.content_length is not None and request.content_length > limit:
            # Refuse before reading; read_body() enforces the same limit on chunked bodies.
            raise web.HTTPRequestEntityTooLarge(max_size=limit,
                                                actual_size=request.content_length)
        return await handler(request)

    return [metrics_mw, errors_mw, auth_mw]


_ERROR_REF = {"$ref": "#/components/schemas/Error"}
_ERROR_SCHEMA = {
    "type": "object",
    "required": ["error"],
    "properties": {"error": {
        "type": "object",
        "required": ["code", "message"],
        "properties": {"code": {"type": "string"}, "message": {"type": "string"},
                       "field": {"type": "string"}},
    }},
}


def openapi_document(routes: RouteTable, *, title: str, version: str) -> dict[str, Any]:
    """An OpenAPI 3.1 document describing ``routes``."""
    paths: dict[str, dict[str, Any]] = {}
    for r in routes:
        params = [{"name": p, "in": "path", "required": True, "schema": {"type": "string"}}
                  for p in re.findall(r"\{([A-Za-z_][A-Za-z0-9_]*)(?::[^}]*)?\}", r.path)]
        path = re.sub(r"\{([A-Za-z_][A-Za-z0-9_]*):[^}]*\}", r"{\1}", r.path)
        op: dict[str, Any] = {
            "operationId": r.method.lower() + re.sub(r"[^A-Za-z0-9]+", "_", path).rstrip("_"),
            "summary": r.summary,
            "security": [] if r.scope == PUBLIC else [{"bearer": [r.scope]}],
            "responses": {
                **{str(s): {"description": d} for s, d in (r.responses or {200: "OK"}).items()},
                "default": {"description": "an error",
                            "content": {"application/json": {"schema": _ERROR_REF}}},
            },
        }
        if params:
            op["parameters"] = params
        if r.request_types:
            op["requestBody"] = {"required": True,
                                 "content": {t: {} for t in r.request_types}}
        paths.setdefault(path, {})[r.method.lower()] = op
    return {
        "openapi": "3.1.0",
        "info": {"title": title, "version": version},
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": _ERROR_SCHEMA},
        },
        "paths": paths,
    }


def make_app(
    routes: RouteTable,
    *,
    auth: Authenticator,
    title: str,
    version: str = "1",
    max_body_bytes: int,
    registry: CollectorRegistry | None = None,
    health: Callable[[], Mapping[str, Any]] | None = None,
) -> web.Application:
    """Build an aiohttp application serving ``routes`` with auth, errors, limits and metrics.

    Adds ``GET /healthz`` (public; ``{"status": "ok", **health()}``), ``GET /metrics`` (public,
    Prometheus text from ``registry``) and ``GET /openapi.json`` (``read``).

    Args:
        routes: the server's own routes, each with its scope.
        auth: from :meth:`Authenticator.from_options`.
        title: the service's name in ``/openapi.json``.
        max_body_bytes: larger request bodies get 413 ``body_too_large``.
        registry: where the server's metrics live (a new one if None); register the server's
            own collectors here too.
        health: extra fields for ``/healthz``.
    """
    if max_body_bytes <= 0:
        raise ValueError("max_body_bytes must be positive")
    registry = registry if registry is not None else CollectorRegistry()
    metrics = _Metrics(registry)
    app = web.Application(middlewares=_middlewares(auth, metrics), client_max_size=max_body_bytes)
    app[REGISTRY] = registry
    app[_MAX_BODY] = max_body_bytes

    async def healthz(request: web.Request) -> web.Response:
        return json_response({"status": "ok", **(health() if health else {})})

    async def metrics_handler(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(registry),
                            headers={"Content-Type": CONTENT_TYPE_LATEST})

    table = RouteTable()
    table.add("GET", "/healthz", healthz, scope=PUBLIC, summary="liveness")
    table.add("GET", "/metrics", metrics_handler, scope=PUBLIC,
              summary="Prometheus metrics (text format)")
    for r in routes:
        table._routes.append(r)
    doc: dict[str, Any] = {}

    async def openapi(request: web.Request) -> web.Response:
        return json_response(doc)

    table.add("GET", "/openapi.json", openapi, scope=READ, summary="this document")
    doc.update(openapi_document(table, title=title, version=version))

    scopes: dict[AbstractRoute, str] = {}
    for r in table:
        scopes[app.router.add_route(r.method, r.path, r.handler)] = r.scope
    app[_SCOPES] = scopes
    return app


def _port(text: str) -> int:
    try:
        port = int(text)
    except ValueError:
        port = -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return port


def positive_int(text: str) -> int:
    """An argparse type: a positive integer."""
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n <= 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive integer")
    return n


def add_server_options(
    parser: argparse.ArgumentParser, *, default_port: int, default_max_body_bytes: int
) -> None:
    """``--host``, ``--port``, ``--tokens-file``, ``--no-auth`` and ``--max-body-bytes``."""
    parser.add_argument("--host", default=DEFAULT_HOST,
                        help=f"address to listen on (default {DEFAULT_HOST})")
    parser.add_argument("--port", type=_port, default=default_port,
                        help=f"port to listen on (default {default_port})")
    parser.add_argument(
        "--tokens-file", default=None, metavar="PATH",
        help=f"bearer tokens, one a line: 'TOKEN SCOPE[,SCOPE] [NAME]' with scopes read/write; "
        f"# starts a comment (env {ENV_TOKENS_FILE})")
    parser.add_argument("--no-auth", action="store_true",
                        help="turn auth off: every request may read and write")
    parser.add_argument(
        "--max-body-bytes", type=positive_int, default=default_max_body_bytes, metavar="N",
        help=f"larger request bodies get 413 (default {default_max_body_bytes})")


def auth_from_args(args: argparse.Namespace) -> Authenticator:
    """The authenticator for :func:`add_server_options`' options.

    Raises:
        AuthNotConfigured: neither ``--tokens-file`` (nor its env variable) nor ``--no-auth``.
        InvalidTokensFile: a bad tokens file.
    """
    return Authenticator.from_options(tokens_file=args.tokens_file, no_auth=args.no_auth)


async def serve(
    app: web.Application,
    *,
    host: str,
    port: int,
    stop: asyncio.Event,
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
    on_listening: Callable[[str], None] | None = None,
) -> None:
    """Serve ``app`` until ``stop`` is set, then shut down gracefully: stop accepting, let
    requests in flight finish (up to ``shutdown_timeout_s``), and run the cleanup hooks."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=shutdown_timeout_s,
                           access_log=None)
    await runner.setup()  # runs the startup hooks: errors here propagate
    try:
        site = web.TCPSite(runner, host, port)
        try:
            await site.start()
        except OSError as exc:
            raise TimetravelError(f"cannot listen on {host}:{port}: {exc.strerror or exc}",
                                  code="listen_failed") from exc
        addrs = runner.addresses
        bound = addrs[0][1] if addrs else port
        url = f"http://{host}:{bound}"
        log.info("listening on %s", url)
        if on_listening is not None:
            on_listening(url)
        await stop.wait()
        log.info("shutting down")
    finally:
        await runner.cleanup()  # shutdown and cleanup hooks (e.g. a final flush)


def run_app(
    app: web.Application,
    *,
    host: str,
    port: int,
    shutdown_timeout_s: float = DEFAULT_SHUTDOWN_TIMEOUT_S,
) -> int:
    """Serve ``app`` until SIGTERM or SIGINT, then shut down gracefully; returns 0.

    Raises:
        TimetravelError: it cannot listen, or a startup hook failed with one.
    """

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        try:
            await serve(app, host=host, port=port, stop=stop,
                        shutdown_timeout_s=shutdown_timeout_s)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.remove_signal_handler(sig)

    asyncio.run(main())
    return 0
