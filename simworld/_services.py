"""The simulated world's microservices: aiohttp handlers answering with the truth at "now".

Routes (``<service>`` is ``viewing_history``, ``my_list`` or ``profile``)::

    GET  /v1/<service>/{entity_id}      one member's state at the world's now; 404 if unknown
    POST /v1/<service>:batchGet         {"ids": [...]} -> {"results": {"<id>": {...}}}
                                         (unknown ids left out)
    GET  /v1/population?format=json|csv|parquet    every member with strata columns
    GET  /v1/catalog?format=json|csv|parquet       the videos
    GET  /healthz
    GET  /_sim/clock      POST /_sim/clock   {"now": RFC3339} | {"advance": "1h"} [, "rate": r]
    GET  /_sim/faults     POST /_sim/faults  {"service": name|"*", <Faults fields>...}
    GET  /_sim/stats      POST /_sim/stats/reset

Faults apply per service (``population`` and ``catalog`` count as services too): a latency
drawn from a lognormal with the given median and p99, then ``down`` (503), a hang
(``timeout_rate``: the answer never comes within ``hang_s``), or a 500 (``error_rate``).

Stats count every request *started* (on arrival, before any latency or fault) per service, and
per one-second window of wall time: ``started_per_s`` (aligned to whole seconds) and
``max_started_in_any_1s`` (the sliding maximum), which is what a QPS-limit test asserts on.
"""

from __future__ import annotations

import asyncio
import io
import json
import math
import random
import threading
import time
from array import array
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, fields, replace
from typing import Any

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
from aiohttp import web

from ttstore import (
    InvalidInput,
    TimetravelError,
    format_timestamp,
    parse_duration,
    parse_timestamp,
)

from ._world import Answer, World

__all__ = ["ENTITY_SERVICES", "Faults", "SimClock", "SimState", "make_app"]

#: The per-member services and the truth function each answers with.
ENTITY_SERVICES: dict[str, Callable[[World, np.ndarray, int], list[Answer]]] = {
    "viewing_history": World.viewing_histories,
    "my_list": World.my_lists,
    "profile": World.profiles,
}
TABLE_SERVICES = ("population", "catalog")
ALL_SERVICES = (*ENTITY_SERVICES, *TABLE_SERVICES)
MAX_BATCH = 10_000
_Z99 = 2.3263478740408408  # the standard normal's 99th percentile


class SimClock:
    """The world's "now": frozen unless told, or advancing at ``rate`` simulated seconds per
    wall second. Thread-safe.

    Args:
        now_us: where it starts.
        rate: simulated seconds per wall second (0: frozen).
    """

    def __init__(self, now_us: int, *, rate: float = 0.0) -> None:
        self._lock = threading.Lock()
        self._base_us = int(now_us)
        self._t0 = time.monotonic()
        self._rate = float(rate)

    def now_us(self) -> int:
        with self._lock:
            return self._base_us + int((time.monotonic() - self._t0) * self._rate * 1e6)

    @property
    def rate(self) -> float:
        return self._rate

    def set(self, now_us: int, *, rate: float | None = None) -> None:
        """Jump to ``now_us`` (and change the rate, if given)."""
        with self._lock:
            self._base_us, self._t0 = int(now_us), time.monotonic()
            if rate is not None:
                self._rate = float(rate)

    def advance(self, delta_us: int) -> None:
        """Move forward by ``delta_us``."""
        self.set(self.now_us() + int(delta_us))


@dataclass(frozen=True, kw_only=True)
class Faults:
    """What goes wrong with one service.

    Args:
        latency_median_ms: median added latency (0: none).
        latency_p99_ms: its 99th percentile (lognormal); None or equal to the median: constant.
        error_rate: share of requests answered 500.
        timeout_rate: share of requests that hang for ``hang_s`` before a 500.
        hang_s: how long a hang lasts (shutdown cuts it short).
        down: every request is answered 503 at once.
    """

    latency_median_ms: float = 0.0
    latency_p99_ms: float | None = None
    error_rate: float = 0.0
    timeout_rate: float = 0.0
    hang_s: float = 30.0
    down: bool = False

    def __post_init__(self) -> None:
        for f in ("latency_median_ms", "hang_s"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not v >= 0:
                raise InvalidInput(f"{f} must be a number >= 0, not {v!r}", field=f)
        p99 = self.latency_p99_ms
        number = isinstance(p99, int | float) and not isinstance(p99, bool)
        if p99 is not None and (not number or p99 < self.latency_median_ms):
            raise InvalidInput(f"latency_p99_ms must be >= the median, not {p99!r}",
                               field="latency_p99_ms")
        for f in ("error_rate", "timeout_rate"):
            v = getattr(self, f)
            if isinstance(v, bool) or not isinstance(v, int | float) or not 0 <= v <= 1:
                raise InvalidInput(f"{f} must be in [0, 1], not {v!r}", field=f)
        if not isinstance(self.down, bool):
            raise InvalidInput(f"down must be true or false, not {self.down!r}", field="down")

    def latency_s(self, rng: random.Random) -> float:
        """One draw of the added latency."""
        m = self.latency_median_ms
        if m <= 0:
            return 0.0
        p99 = self.latency_p99_ms
        if p99 is None or p99 <= m:
            return m / 1e3
        sigma = math.log(p99 / m) / _Z99
        return m * math.exp(sigma * rng.gauss(0.0, 1.0)) / 1e3


_FAULT_KEYS = frozenset(f.name for f in fields(Faults))


class _Counts:
    """Requests started by one service (arrival times kept compactly for the window figures)."""

    def __init__(self) -> None:
        self.starts = array("d")
        self.by_status: dict[str, int] = {}
        self.batch_requests = 0
        self.ids_requested = 0
        self.hangs = 0
        self.in_flight = 0
        self.max_in_flight = 0

    def body(self) -> dict[str, Any]:
        ts = np.frombuffer(self.starts.tobytes(), dtype=np.float64)
        return {
            "requests": len(ts),
            "batch_requests": self.batch_requests,
            "ids_requested": self.ids_requested,
            "by_status": dict(sorted(self.by_status.items())),
            "hangs": self.hangs,
            "max_in_flight": self.max_in_flight,
            **window_figures(ts),
        }


def window_figures(ts: np.ndarray) -> dict[str, Any]:
    """Per-second start counts (aligned windows, keyed by unix second) and the largest count in
    any sliding one-second window ``[t, t + 1)``."""
    if not len(ts):
        return {"started_per_s": {}, "max_started_in_any_1s": 0}
    ts = np.sort(ts)
    secs, counts = np.unique(np.floor(ts).astype(np.int64), return_counts=True)
    ends = np.searchsorted(ts, ts + 1.0, side="left")
    return {
        "started_per_s": dict(zip(map(str, secs.tolist()), counts.tolist(), strict=True)),
        "max_started_in_any_1s": int((ends - np.arange(len(ts))).max()),
    }


class _Coalescer:
    """Answers per-entity GETs of one service together, inside their simulated latency.

    A request is submitted when it arrives, with the time its answer is due (arrival plus its
    latency draw). The truth is computed when the earliest due time among the waiting requests
    comes, for every request waiting then, in one vectorized call; each answer is still sent at
    its own due time. So an answer shows the state at an instant between the request's arrival
    and its answer, as a real service's read would, and the world computes its truth in batches
    of the requests in flight (a handful to dozens) rather than one or two at a time: the truth
    is most of the world's CPU, which it shares with the snapshot run it serves.
    """

    def __init__(self, truth: Callable[[World, np.ndarray, int], list[Answer]]) -> None:
        self.truth = truth
        self.pending: list[tuple[int, asyncio.Future[Answer]]] = []
        self._flush_at: asyncio.TimerHandle | None = None

    def submit(self, state: SimState, member: int, due: float) -> asyncio.Future[Answer]:
        """The answer for ``member``, computed at the latest at ``due`` (``loop.time()``)."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Answer] = loop.create_future()
        self.pending.append((member, fut))
        at = self._flush_at
        if at is None or due < at.when():
            if at is not None:
                at.cancel()
            self._flush_at = loop.call_at(due, self._flush, state)
        return fut

    def _flush(self, state: SimState) -> None:
        self._flush_at = None
        batch, self.pending = self.pending, []
        try:
            answers = self.truth(
                state.world, np.array([m for m, _ in batch], np.int64), state.clock.now_us()
            )
        except Exception as exc:  # delivered to every waiting request
            for _, fut in batch:
                if not fut.done():
                    fut.set_exception(exc)
            return
        for (_, fut), a in zip(batch, answers, strict=True):
            if not fut.done():
                fut.set_result(a)


class SimState:
    """What the world's server holds: the world, its clock, faults and counters.

    Args:
        world: the truth.
        clock: the world's now.
        seed: seeds the fault draws (None: entropy).
    """

    def __init__(self, world: World, clock: SimClock, *, seed: int | None = None) -> None:
        self.world = world
        self.clock = clock
        self.faults: dict[str, Faults] = {s: Faults() for s in ALL_SERVICES}
        self.counts: dict[str, _Counts] = {s: _Counts() for s in ALL_SERVICES}
        self.rng = random.Random(seed)
        self.shutdown = asyncio.Event()
        self.coalescers = {s: _Coalescer(f) for s, f in ENTITY_SERVICES.items()}

    def set_faults(self, service: str, **kw: Any) -> dict[str, Faults]:
        """Replace fields of one service's faults (``"*"``: every service's)."""
        targets = list(ALL_SERVICES) if service == "*" else [service]
        for s in targets:
            if s not in self.faults:
                raise InvalidInput(f"unknown service {s!r} (known: {', '.join(ALL_SERVICES)})",
                                   field="service")
        unknown = sorted(set(kw) - _FAULT_KEYS)
        if unknown:
            raise InvalidInput(f"unknown fault {unknown[0]!r} (known: {sorted(_FAULT_KEYS)})",
                               field=unknown[0])
        for s in targets:
            self.faults[s] = replace(self.faults[s], **kw)
        return self.faults

    def stats(self) -> dict[str, Any]:
        """Counters per service and in total (see the module docstring). Safe to call from any
        thread: arrival logs are copied (``tobytes``), never exported while they grow."""
        counts = list(self.counts.values())
        all_ts = np.concatenate(
            [np.frombuffer(c.starts.tobytes(), dtype=np.float64) for c in counts]
        )
        return {
            "now": format_timestamp(self.clock.now_us()),
            "services": {s: c.body() for s, c in self.counts.items()},
            "total": {"requests": len(all_ts), **window_figures(all_ts)},
        }

    def reset_stats(self) -> None:
        """Start counting afresh."""
        self.counts = {s: _Counts() for s in ALL_SERVICES}


# -- request handling -------------------------------------------------------------------------

_STATE: web.AppKey[SimState] = web.AppKey("simworld_state", SimState)


def _json(body: Any, status: int = 200) -> web.Response:
    # orjson: compact, and many times the stdlib's speed (a batch answer is ~100 KB).
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


def _loads(data: bytes) -> Any:
    """A request body's JSON. orjson reads an integer beyond 64 bits as a float, which as an
    id is unknown all the same (ids are int64); what orjson refuses, the stdlib reads."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def _error(status: int, code: str, message: str) -> web.Response:
    return _json({"error": {"code": code, "message": message}}, status)


def _arrive(state: SimState, service: str, *, ids: int, batch: bool) -> float:
    """Count a request's start; returns its latency draw in seconds."""
    c = state.counts[service]
    c.starts.append(time.time())
    c.ids_requested += ids
    c.batch_requests += batch
    return state.faults[service].latency_s(state.rng)


async def _fault(state: SimState, service: str) -> web.Response | None:
    """Apply the service's faults once its latency has passed: a response to send instead of
    the answer, or None."""
    f = state.faults[service]
    if f.down:
        return _error(503, "unavailable", f"{service} is down (simulated)")
    u = state.rng.random()
    if u < f.timeout_rate:
        state.counts[service].hangs += 1
        try:
            await asyncio.wait_for(state.shutdown.wait(), f.hang_s)
        except TimeoutError:
            pass
        return _error(500, "hung", f"{service} hung (simulated)")
    if u < f.timeout_rate + f.error_rate:
        return _error(500, "internal", f"{service} failed (simulated)")
    return None


async def _enter(state: SimState, service: str, *, ids: int, batch: bool) -> web.Response | None:
    """Count the start, wait out the latency, then apply the faults: a response to send instead,
    or None."""
    delay = _arrive(state, service, ids=ids, batch=batch)
    if delay > 0:
        await asyncio.sleep(delay)
    return await _fault(state, service)


def _count(state: SimState, service: str, resp: web.Response) -> web.Response:
    by = state.counts[service].by_status
    key = str(resp.status)
    by[key] = by.get(key, 0) + 1
    return resp


def _parse_id(raw: object) -> int | None:
    if isinstance(raw, bool):
        return None
    if isinstance(raw, int):
        return raw
    if isinstance(raw, str) and raw.lstrip("-").isdigit() and len(raw) <= 20:
        v = int(raw)
        return v if -(2**63) <= v < 2**63 else None
    return None


def _entity_handlers(service: str) -> tuple[Callable[..., Any], Callable[..., Any]]:
    truth = ENTITY_SERVICES[service]

    # In-flight counting inline (not a context manager): these run ~6,000 times a second in
    # the per-entity snapshot benchmark, where every microsecond of the world's is the run's.
    async def get_one(request: web.Request) -> web.Response:
        state = request.app[_STATE]
        c = state.counts[service]
        c.in_flight += 1
        c.max_in_flight = max(c.max_in_flight, c.in_flight)
        try:
            return await _get_one(request, state)
        finally:
            c.in_flight -= 1

    async def batch_get(request: web.Request) -> web.Response:
        state = request.app[_STATE]
        c = state.counts[service]
        c.in_flight += 1
        c.max_in_flight = max(c.max_in_flight, c.in_flight)
        try:
            return await _batch_get(request, state)
        finally:
            c.in_flight -= 1

    async def _get_one(request: web.Request, state: SimState) -> web.Response:
        delay = _arrive(state, service, ids=1, batch=False)
        raw = request.match_info["entity_id"]
        m = _parse_id(raw)
        due = asyncio.get_running_loop().time() + delay
        fut = None if m is None else state.coalescers[service].submit(state, m, due)
        try:
            if delay > 0:
                await asyncio.sleep(delay)
            fault = await _fault(state, service)
            if fault is not None:
                return _count(state, service, fault)
            answer = None if fut is None else await fut
        finally:
            if fut is not None and not fut.done():
                fut.cancel()  # cancelled or faulted: the flush skips it
            elif fut is not None and not fut.cancelled():
                fut.exception()  # retrieved, so asyncio does not log it as lost
        if answer is None:
            return _count(state, service, _error(404, "not_found", f"no member {raw!r}"))
        return _count(state, service, _json(answer))

    async def _batch_get(request: web.Request, state: SimState) -> web.Response:
        try:
            body = _loads(await request.read())
        except (json.JSONDecodeError, UnicodeDecodeError):
            body = None
        ids = body.get("ids") if isinstance(body, dict) else None
        n = len(ids) if isinstance(ids, list) else 0
        fault = await _enter(state, service, ids=n, batch=True)
        if fault is not None:
            return _count(state, service, fault)
        if not isinstance(ids, list) or len(ids) > MAX_BATCH:
            return _count(state, service, _error(
                400, "invalid_body", f'the body must be {{"ids": [...]}} with at most {MAX_BATCH}'
            ))
        parsed = [_parse_id(x) for x in ids]
        keep = [(str(raw), m) for raw, m in zip(ids, parsed, strict=True) if m is not None]
        answers = truth(state.world, np.array([m for _, m in keep], np.int64),
                        state.clock.now_us()) if keep else []
        results = {k: a for (k, _), a in zip(keep, answers, strict=True) if a is not None}
        return _count(state, service, _json({"results": results}))

    return get_one, batch_get


def _table_response(table: pa.Table, fmt: str) -> web.Response:
    if fmt == "json":
        return _json({"rows": table.to_pylist()})
    sink = io.BytesIO()
    if fmt == "csv":
        pacsv.write_csv(table, sink)
        return web.Response(body=sink.getvalue(), content_type="text/csv")
    pq.write_table(table, sink)
    return web.Response(body=sink.getvalue(), content_type="application/vnd.apache.parquet")


def _table_handler(service: str) -> Callable[..., Any]:
    async def handler(request: web.Request) -> web.Response:
        state = request.app[_STATE]
        fault = await _enter(state, service, ids=0, batch=False)
        if fault is not None:
            return _count(state, service, fault)
        fmt = request.query.get("format", "json")
        if fmt not in ("json", "csv", "parquet"):
            return _count(state, service, _error(400, "invalid_format",
                                                 "format must be json, csv or parquet"))
        w = state.world
        table = w.population(state.clock.now_us()) if service == "population" else w.catalog()
        return _count(state, service, _table_response(table, fmt))

    return handler


async def _control_body(request: web.Request) -> dict[str, Any]:
    try:
        body = _loads(await request.read())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise InvalidInput("the body must be a JSON object") from exc
    if not isinstance(body, dict):
        raise InvalidInput("the body must be a JSON object")
    return body


def _clock_body(state: SimState) -> dict[str, Any]:
    return {"now": format_timestamp(state.clock.now_us()), "rate": state.clock.rate}


async def _clock(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    if request.method == "POST":
        body = await _control_body(request)
        unknown = sorted(set(body) - {"now", "advance", "rate"})
        if unknown:
            raise InvalidInput(f"unknown key {unknown[0]!r} (known: now, advance, rate)",
                               field=unknown[0])
        if ("now" in body and "advance" in body) or not body:
            raise InvalidInput('give "now" (RFC 3339) or "advance" (e.g. "1h"), and/or "rate"',
                               field="now")
        rate = body.get("rate")
        if rate is not None and (isinstance(rate, bool) or not isinstance(rate, int | float)
                                 or rate < 0):
            raise InvalidInput("rate must be a number >= 0", field="rate")
        if "now" in body:
            state.clock.set(parse_timestamp(body["now"], field="now"), rate=rate)
        elif "advance" in body:
            state.clock.advance(parse_duration(body["advance"], field="advance"))
            if rate is not None:
                state.clock.set(state.clock.now_us(), rate=rate)
        else:
            state.clock.set(state.clock.now_us(), rate=rate)
    return _json(_clock_body(state))


async def _faults(request: web.Request) -> web.Response:
    state = request.app[_STATE]
    if request.method == "POST":
        body = await _control_body(request)
        service = body.pop("service", "*")
        state.set_faults(str(service), **body)
    return _json({s: asdict(f) for s, f in state.faults.items()})


async def _stats(request: web.Request) -> web.Response:
    return _json(request.app[_STATE].stats())


async def _reset(request: web.Request) -> web.Response:
    request.app[_STATE].reset_stats()
    return _json({"reset": True})


async def _healthz(request: web.Request) -> web.Response:
    return _json({"ok": True, "now": format_timestamp(request.app[_STATE].clock.now_us())})


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _errors(handler: Handler) -> Handler:
    """``handler`` answering a TimetravelError as its error body. Per handler, not as a
    middleware: the entity services raise none, and a middleware costs every request."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            return await handler(request)
        except TimetravelError as exc:
            status = exc.http_status if exc.http_status < 500 else 400
            return _error(status, exc.code, exc.message)

    return wrapped


def make_app(state: SimState) -> web.Application:
    """The world's aiohttp application over ``state``."""
    app = web.Application(client_max_size=16 * 1024 * 1024)
    app[_STATE] = state
    r = app.router
    for service in ENTITY_SERVICES:
        get_one, batch_get = _entity_handlers(service)
        r.add_post(f"/v1/{service}:batchGet", batch_get)
        r.add_get(f"/v1/{service}/{{entity_id}}", get_one)
    for service in TABLE_SERVICES:
        r.add_get(f"/v1/{service}", _errors(_table_handler(service)))
    r.add_get("/healthz", _errors(_healthz))
    r.add_route("*", "/_sim/clock", _errors(_clock))
    r.add_route("*", "/_sim/faults", _errors(_faults))
    r.add_get("/_sim/stats", _errors(_stats))
    r.add_post("/_sim/stats/reset", _errors(_reset))

    async def on_shutdown(app: web.Application) -> None:
        state.shutdown.set()  # hung requests answer now

    app.on_shutdown.append(on_shutdown)
    return app
