"""Fetching entities' state from one service: the aiohttp client a snapshot run uses.

What it keeps to, per :class:`~snapshotter.ServiceConfig`:

- at most ``max_concurrency`` requests in flight;
- at most ``max_qps × qps_share`` requests *started* in any one-second window, every attempt
  counted (:class:`~snapshotter._ratelimit.QpsLimiter`);
- ``timeout_s`` per attempt;
- ``retries`` further attempts after a 5xx, 408, 429, a timeout or a connection error, each after
  an exponential backoff with jitter; other 4xx answers and unparseable bodies are not retried.

What it answers: one :class:`FetchResult` per requested entity, in input order (or the same
answers as columns, :meth:`ServiceFetcher.fetch_answers`, which is what a run stages). A fetch never
raises for a service's failure: a 404 (or an id left out of a batch answer) is ``missing``, and a
failure after the last attempt is ``error`` with its kind. Where ``batch_url`` is configured,
ids go ``batch_size`` at a time in one ``POST {"ids": [...]}``.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal
from urllib.parse import urlsplit

import aiohttp
import numpy as np
import orjson
from yarl import URL

from ._answer_json import batch_results, parse_answer
from ._answers import Answers
from ._errors import ServiceConfigError
from ._ratelimit import QpsLimiter, Ticket
from ._services import ENTITY_ID_PLACEHOLDER, ServiceConfig

__all__ = ["ERROR_KINDS", "FetchResult", "ServiceFetcher"]

#: Every ``error_kind`` a :class:`FetchResult` can carry.
ERROR_KINDS = ("timeout", "http_5xx", "http_4xx", "connection", "invalid_json")

Status = Literal["ok", "missing", "error"]

#: Keys above this go to a batch endpoint as decimal strings (SPEC §2: JSON numbers are exact
#: only up to 2^53).
_JSON_EXACT_INT = 2**53
#: Latency samples kept for :meth:`ServiceFetcher.stats` (a uniform reservoir beyond this).
_RESERVOIR = 50_000
#: Workers per unit of concurrency: enough to keep every slot busy while a few rows wait out
#: a backoff.
_ADMIT_PER_SLOT = 4
#: A batch answer's row by the type of its value: an object is ok, an id left out or null is
#: missing, anything else is an invalid answer.
_STATUS_OF: dict[type, str] = {dict: "ok", type(None): "missing"}
_NOT_FOUND: tuple[None, None] = (None, None)


@dataclass(frozen=True)
class FetchResult:
    """One entity's answer.

    Attributes:
        entity: the key as requested.
        status: ``ok`` (a JSON object), ``missing`` (404, or left out of a batch answer) or
            ``error`` (after the last attempt).
        payload: the parsed JSON object when ``ok``.
        raw_json: the answer's JSON text when ``ok``.
        latency_s: how long the attempt that gave this answer took.
        attempts: attempts made (1 + retries used).
        error_kind: for ``error``: one of :data:`ERROR_KINDS`.
    """

    entity: int | str
    status: Status
    payload: dict[str, Any] | None
    raw_json: str | None
    latency_s: float
    attempts: int
    error_kind: str | None


@dataclass(frozen=True)
class _Answer:
    """The outcome of one attempt."""

    status: int | None  # HTTP status; None when no answer came
    body: bytes | None
    error_kind: str | None  # set when the attempt failed
    retry: bool
    latency_s: float


class ServiceFetcher:
    """Fetches entities from one service within its limits.

    Args:
        config: the service.
        qps_share: this process's share of ``max_qps`` (``1/n`` for ``--shard i/n``).
        session: an aiohttp session to use (and not close); by default one is made on first
            use, with a connection pool of ``max_concurrency``, and closed by :meth:`aclose`.
            With a session of your own, a request counts toward ``max_qps`` from when it was
            granted until its answer (a conservative stand-in for when it was sent, which only
            the fetcher's own session observes).
        batch_size: ids per batch request (default: the config's ``batch_size``).
        environ: where header ``${VAR}`` are read (default ``os.environ``).
        seed: seeds the backoff jitter (tests); None for entropy.

    Raises:
        ServiceConfigError: a header variable is not set, ``qps_share`` is not in (0, 1], or
            the QPS share is below one request per second.
    """

    def __init__(
        self,
        config: ServiceConfig,
        *,
        qps_share: float = 1.0,
        session: aiohttp.ClientSession | None = None,
        batch_size: int | None = None,
        environ: dict[str, str] | None = None,
        seed: int | None = None,
    ) -> None:
        if not 0 < qps_share <= 1:
            raise ServiceConfigError(
                f"qps_share must be in (0, 1], not {qps_share!r}",
                service=config.name,
                field="qps_share",
            )
        self.config = config
        # None when there are none: aiohttp then has nothing to merge per request.
        self._headers: dict[str, str] | None = config.resolve_headers(environ) or None
        self._post_headers = dict(self._headers or {})
        if not any(h.lower() == "content-type" for h in self._post_headers):
            self._post_headers["Content-Type"] = "application/json"
        self._limiter = (
            QpsLimiter(config.max_qps * qps_share) if config.max_qps is not None else None
        )
        self.batch_size = config.batch_size if batch_size is None else int(batch_size)
        if self.batch_size < 1:
            raise ServiceConfigError(
                "batch_size must be at least 1", service=config.name, field="batch_size"
            )
        self._session = session
        self._own_session = session is None
        self._entity_url = entity_urls(config)
        self._slots = asyncio.Semaphore(config.max_concurrency)
        self._timeout = aiohttp.ClientTimeout(total=config.timeout_s)
        self._rng = random.Random(seed)
        self._requests = 0
        self._retries = 0
        self._attempt_errors: Counter[str] = Counter()
        self._final: Counter[str] = Counter()
        self._errors: Counter[str] = Counter()
        self._latency_ms: list[float] = []
        self._latency_seen = 0

    # -- lifecycle -----------------------------------------------------------------------------
    async def __aenter__(self) -> ServiceFetcher:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the session if this fetcher made it."""
        if self._own_session and self._session is not None:
            await self._session.close()
            self._session = None

    def _get_session(self) -> aiohttp.ClientSession:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=self.config.max_concurrency)
            traces = []
            if self._limiter is not None:
                # A request counts toward the QPS limit when it is sent, not when it was
                # granted: a new connection can take longer to open than the window.
                tc = aiohttp.TraceConfig()
                tc.on_request_headers_sent.append(self._on_sent)
                traces.append(tc)
            self._session = aiohttp.ClientSession(connector=connector, trace_configs=traces)
        return self._session

    async def _on_sent(self, session: Any, ctx: Any, params: Any) -> None:
        ticket = ctx.trace_request_ctx
        if isinstance(ticket, Ticket) and self._limiter is not None:
            self._limiter.started(ticket)

    # -- fetching ------------------------------------------------------------------------------
    async def fetch(self, entities: Sequence[int | str]) -> list[FetchResult]:
        """Answers for ``entities``, in input order. Never raises for a service's failure.

        Args:
            entities: keys of the service's ``entity_type``.

        Returns:
            One :class:`FetchResult` per entity, in input order.
        """
        a = await self.fetch_answers(entities)
        return [
            FetchResult(e, st, p, raw, lat, n, kind)  # type: ignore[arg-type]
            for e, st, p, raw, lat, n, kind in zip(
                entities, a.status, a.payload, a.raw_json, a.latency_s, a.attempts,
                a.error_kind, strict=True,
            )
        ]

    async def fetch_answers(
        self, entities: Sequence[int | str], *, now: Callable[[], int] | None = None
    ) -> Answers:
        """:meth:`fetch` as columns (what a run stages): no object per row.

        Args:
            entities: keys of the service's ``entity_type``.
            now: a clock (microseconds); when given, each row's ``captured_us`` is its reading
                as the row's answer came back (once per batch request).

        Returns:
            The answers, aligned with ``entities``.
        """
        n = len(entities)
        out = Answers.blank(n)
        captured = out.captured_us = None if now is None else [0] * n
        if self.config.uses_batch:
            units = [(i, min(i + self.batch_size, n)) for i in range(0, n, self.batch_size)]
        else:
            units = [(i, i + 1) for i in range(n)]
        todo = iter(units)

        # A fixed set of workers takes the units in order (not one task per row): each attempt
        # still waits for one of max_concurrency slots, and the spare workers keep every slot
        # busy while a few rows wait out a backoff.
        async def work() -> None:
            for lo, hi in todo:
                if self.config.uses_batch:
                    await self._fetch_batch(entities, lo, hi, out)
                    if captured is not None and now is not None:
                        captured[lo:hi] = [now()] * (hi - lo)
                else:
                    await self._fetch_one(entities[lo], lo, out)
                    if captured is not None and now is not None:
                        captured[lo] = now()

        async with asyncio.TaskGroup() as tg:
            for _ in range(min(len(units), self.config.max_concurrency * _ADMIT_PER_SLOT)):
                tg.create_task(work())
        self._final.update(out.status)
        self._errors.update(k for k in out.error_kind if k is not None)
        return out

    async def _fetch_one(self, entity: int | str, i: int, out: Answers) -> None:
        url = self._entity_url(entity)
        attempts = 0
        while True:
            attempts += 1
            a = await self._attempt("GET", url, None)
            out.latency_s[i], out.attempts[i] = a.latency_s, attempts
            if a.error_kind is None and a.status == 404:
                out.status[i] = "missing"
                return
            if a.error_kind is None:
                assert a.body is not None
                payload, text = parse_answer(a.body)
                if isinstance(payload, dict):
                    out.status[i], out.payload[i], out.raw_json[i] = "ok", payload, text
                    return
                self._attempt_errors["invalid_json"] += 1
                out.error_kind[i] = "invalid_json"
                return
            if not a.retry or attempts > self.config.retries:
                out.error_kind[i] = a.error_kind
                return
            await self._backoff(attempts)

    async def _fetch_batch(
        self, entities: Sequence[int | str], lo: int, hi: int, out: Answers
    ) -> None:
        ids = list(entities[lo:hi])
        body = orjson.dumps({"ids": [_json_id(e) for e in ids]})
        url = self.config.batch_url
        assert url is not None
        attempts = 0
        while True:
            attempts += 1
            a = await self._attempt("POST", url, body)
            if a.error_kind is None and a.status != 404:
                results = batch_results(a.body)
                if results is None:
                    self._attempt_errors["invalid_json"] += 1
                    kind: str | None = "invalid_json"
                    break
                got = [results.get(str(e), _NOT_FOUND) for e in ids]
                status = [_STATUS_OF.get(type(v), "error") for v, _ in got]
                out.status[lo:hi] = status
                out.payload[lo:hi] = [v if st == "ok" else None for (v, _), st in zip(
                    got, status, strict=True)]
                out.raw_json[lo:hi] = [t if st == "ok" else None for (_, t), st in zip(
                    got, status, strict=True)]
                out.error_kind[lo:hi] = [None if st != "error" else "invalid_json"
                                         for st in status]
                self._fill(out, lo, hi, a.latency_s, attempts)
                return
            if a.status == 404:  # the batch endpoint itself is not there: a config error
                kind = "http_4xx"
                break
            kind = a.error_kind
            if not a.retry or attempts > self.config.retries:
                break
            await self._backoff(attempts)
        out.error_kind[lo:hi] = [kind] * (hi - lo)  # status is "error" from the start
        self._fill(out, lo, hi, a.latency_s, attempts)

    @staticmethod
    def _fill(out: Answers, lo: int, hi: int, latency_s: float, attempts: int) -> None:
        out.latency_s[lo:hi] = [latency_s] * (hi - lo)
        out.attempts[lo:hi] = [attempts] * (hi - lo)

    async def _attempt(self, method: str, url: str | URL, body: bytes | None) -> _Answer:
        """One request, holding a concurrency slot and a QPS start."""
        async with self._slots:
            ticket = None if self._limiter is None else await self._limiter.acquire()
            self._requests += 1
            t0 = time.perf_counter()
            status: int | None = None
            data: bytes | None = None
            kind: str | None = None
            try:
                async with self._get_session().request(
                    method, url, data=body, headers=self._headers if body is None else
                    self._post_headers, timeout=self._timeout, trace_request_ctx=ticket,
                ) as resp:
                    status = resp.status
                    data = await resp.read()
            except TimeoutError:  # aiohttp's timeouts subclass it
                kind = "timeout"
            except (aiohttp.ClientError, OSError):
                kind = "connection"
            finally:
                if ticket is not None and self._limiter is not None:
                    # Sent (logged by the hook) or never sent: log it now at the latest.
                    self._limiter.started(ticket)
            latency = time.perf_counter() - t0
        self._sample(latency)
        retry = kind is not None
        if status is not None:
            if 200 <= status < 300 or status == 404:
                pass
            elif status >= 500:
                kind, retry = "http_5xx", True
            else:
                kind, retry = "http_4xx", status in (408, 429)
        if kind is not None:
            self._attempt_errors[kind] += 1
        return _Answer(status, data, kind, retry, latency)

    async def _backoff(self, attempts: int) -> None:
        """Sleep before attempt ``attempts + 1``: exponential, capped, with "equal jitter"
        (half fixed, half random) so retries of many rows do not arrive in lockstep."""
        self._retries += 1
        cap = min(self.config.backoff_max_s, self.config.backoff_base_s * 2 ** (attempts - 1))
        await asyncio.sleep(cap / 2 + self._rng.random() * cap / 2)

    def _sample(self, latency_s: float) -> None:
        self._latency_seen += 1
        ms = latency_s * 1e3
        if len(self._latency_ms) < _RESERVOIR:
            self._latency_ms.append(ms)
        else:
            j = self._rng.randrange(self._latency_seen)
            if j < _RESERVOIR:
                self._latency_ms[j] = ms

    # -- figures -------------------------------------------------------------------------------
    def stats(self) -> dict[str, Any]:
        """What this fetcher did so far.

        Returns:
            ``requests`` (attempts started), ``retries``, ``rows`` by final status,
            ``errors`` (final errors by kind), ``attempt_errors`` (failed attempts by kind),
            ``latency_ms`` (``samples``, ``p50``, ``p90``, ``p99``, ``max`` over attempts) and
            ``qps_wait_s`` (time spent waiting for the QPS limit).
        """
        lat = np.asarray(self._latency_ms, dtype=np.float64)
        pct: dict[str, float | None]
        if len(lat):
            p50, p90, p99 = np.percentile(lat, [50, 90, 99])
            pct = {"p50": float(p50), "p90": float(p90), "p99": float(p99), "max": float(lat.max())}
        else:
            pct = {"p50": None, "p90": None, "p99": None, "max": None}
        return {
            "service": self.config.name,
            "requests": self._requests,
            "retries": self._retries,
            "rows": {s: self._final.get(s, 0) for s in ("ok", "missing", "error")},
            "errors": dict(sorted(self._errors.items())),
            "attempt_errors": dict(sorted(self._attempt_errors.items())),
            "latency_ms": {"samples": self._latency_seen, **pct},
            "qps_wait_s": self._limiter.waited_s if self._limiter is not None else 0.0,
        }


def entity_urls(config: ServiceConfig) -> Callable[[int | str], str | URL]:
    """``config.entity_url`` as a function giving what aiohttp would make of its string: a
    ready ``yarl.URL`` for an integer key in the path of a template already in the form yarl
    gives it, so aiohttp does not parse and encode every URL again (several microseconds a
    request, at thousands of requests a second); otherwise the string, as before."""
    probe = config.entity_url("x")
    try:
        ready = str(URL(probe)) == probe
    except ValueError:
        ready = False
    if not ready:
        return config.entity_url
    parts = urlsplit(config.url)
    head, hole, tail = parts.path.partition(ENTITY_ID_PLACEHOLDER)
    if not hole or parts.query or parts.fragment:
        return config.entity_url  # the key outside the path: yarl treats a query otherwise
    base = URL(probe)

    def url(e: int | str) -> str | URL:
        if type(e) is int:  # digits and "-": the same in any encoding
            return base.with_path(f"{head}{e}{tail}", encoded=True)
        return config.entity_url(e)  # yarl normalizes some escapes (%3B -> ;): as before

    return url


def _json_id(e: int | str) -> int | str:
    if isinstance(e, int) and not isinstance(e, bool) and abs(e) < _JSON_EXACT_INT:
        return e
    return str(e)
