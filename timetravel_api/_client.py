"""``timetravel_api.Client``: the Python SDK for the query service (SPEC §7).

Every method is a coroutine; each has a sync twin with the suffix ``_sync`` (``features`` and
``features_sync``, ...). A sync twin runs its coroutine on a private event loop in a background
thread that the client owns, so it works the same in a plain script and where an event loop is
already running (Jupyter, an async web handler). Tabular answers travel as Arrow IPC streams and
come back as :class:`pyarrow.Table` (``.to_pandas()`` when pandas is installed).

Example::

    from timetravel_api import Client

    with Client("http://127.0.0.1:8080", token="s3cr3t-reader") as tt:
        table = tt.features_sync([42, 43], "2026-11-20T10:00:00Z",
                                 ["playback.seconds.sum.7d", "playback.count.1d"])
        df = table.to_pandas()

Errors answered by the server raise :class:`ApiRequestError` (``.status``, ``.code``,
``.message``, ``.field``); a server that cannot be reached raises :class:`ApiUnavailable`.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Coroutine, Sequence
from datetime import UTC, datetime
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
import numpy as np
import pyarrow as pa

from ttstore import ARROW_STREAM, InvalidInput, format_timestamp

from ._codec import MAX_SAFE_INT, arrow_from_ipc
from ._errors import TimetravelApiError

T = TypeVar("T")
#: The schema metadata key of a features table that says whether the answer is complete.
COMPLETE_KEY = b"timetravel.complete"


class ApiRequestError(TimetravelApiError):
    """The server answered with an error.

    Attributes:
        status: the HTTP status.
        code: the error ``code`` from the body (as the README lists them).
        field: the offending field, when the server named one.
    """

    def __init__(self, status: int, code: str, message: str, *, field: str | None = None) -> None:
        super().__init__(message, code=code)
        self.status = status
        self.http_status = status
        self.field = field

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class ApiUnavailable(ApiRequestError):
    """The server could not be reached (connection refused, reset, or timed out)."""

    def __init__(self, message: str) -> None:
        super().__init__(503, "unavailable", message)


class TrainingSetFailed(ApiRequestError):
    """A training-set job ended ``failed`` (``code``/``message`` are the job's error)."""


class Client:
    """A client of ``timetravel api serve``.

    Args:
        base_url: e.g. ``http://127.0.0.1:8080``.
        token: a bearer token with the ``read`` scope (``write`` to start training sets).
        timeout_s: per-request timeout.

    Use it as a context manager (``with`` or ``async with``), or call :meth:`close` /
    :meth:`aclose`, to release its connections and background thread.
    """

    def __init__(self, base_url: str, token: str | None = None, *, timeout_s: float = 300.0
                 ) -> None:
        self.base_url = base_url.rstrip("/")
        self.token = token
        self.timeout_s = timeout_s
        self._sessions: dict[asyncio.AbstractEventLoop, aiohttp.ClientSession] = {}
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    # -- plumbing --------------------------------------------------------------------------------
    def _session(self) -> aiohttp.ClientSession:
        loop = asyncio.get_running_loop()
        s = self._sessions.get(loop)
        if s is None or s.closed:
            headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}
            s = aiohttp.ClientSession(headers=headers,
                                      timeout=aiohttp.ClientTimeout(total=self.timeout_s))
            self._sessions[loop] = s
        return s

    async def _request(self, method: str, path: str, *, json_body: Any = None,
                       params: dict[str, str] | None = None, arrow: bool = False
                       ) -> tuple[bytes, dict[str, str]]:
        headers = {"Accept": ARROW_STREAM if arrow else "application/json"}
        try:
            async with self._session().request(method, self.base_url + path, json=json_body,
                                               params=params, headers=headers) as resp:
                body = await resp.read()
                if resp.status >= 400:
                    raise _error(resp.status, body)
                return body, dict(resp.headers)
        except aiohttp.ClientError as exc:
            raise ApiUnavailable(f"{method} {self.base_url}{path}: {exc}") from exc
        except TimeoutError as exc:
            raise ApiUnavailable(f"{method} {self.base_url}{path}: timed out after "
                                 f"{self.timeout_s}s") from exc

    async def _json(self, method: str, path: str, **kw: Any) -> Any:
        import json  # noqa: PLC0415

        body, _ = await self._request(method, path, **kw)
        return json.loads(body)

    def _run(self, coro: Coroutine[Any, Any, T]) -> T:
        with self._lock:
            if self._loop is None:
                loop = asyncio.new_event_loop()
                thread = threading.Thread(target=loop.run_forever, name="timetravel-client",
                                          daemon=True)
                thread.start()
                self._loop, self._thread = loop, thread
            loop = self._loop
        return asyncio.run_coroutine_threadsafe(coro, loop).result()

    async def aclose(self) -> None:
        """Close the connections opened on the running loop."""
        s = self._sessions.pop(asyncio.get_running_loop(), None)
        if s is not None:
            await s.close()

    def close(self) -> None:
        """Close every connection and stop the background loop of the sync twins."""
        with self._lock:
            loop, thread = self._loop, self._thread
            self._loop = self._thread = None
        if loop is not None and thread is not None:
            async def _close_all() -> None:
                s = self._sessions.pop(loop, None)
                if s is not None:
                    await s.close()
            asyncio.run_coroutine_threadsafe(_close_all(), loop).result()
            loop.call_soon_threadsafe(loop.stop)
            thread.join()
            loop.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()
        self.close()

    # -- features --------------------------------------------------------------------------------
    async def features(
        self, entities: Any, at: Any, features: Sequence[str], *,
        knowledge: str = "as_known", provenance: bool = False,
    ) -> pa.Table:
        """Point-in-time features of each (entity, ``at``) row (``POST /v1/features``).

        Args:
            entities: entity keys (list, numpy or pyarrow array; int or str).
            at: one time for every row, or one per row: aware ``datetime``s, RFC 3339
                strings, or a pyarrow timestamp array.
            features: feature names; the output has one column each, in this order.
            knowledge: ``as_known`` or ``event``.
            provenance: add a ``provenance`` struct column.

        Returns:
            ``entity_id``, ``at``, the features, and a ``status`` struct; the schema metadata
            key ``timetravel.complete`` is ``true`` or ``false`` (see :func:`is_complete`).
        """
        ids = _entity_list(entities)
        ats = _time_list(at, len(ids))
        body = {"rows": [{"entity_id": e, "at": t} for e, t in zip(ids, ats, strict=True)],
                "features": list(features), "knowledge": knowledge, "provenance": provenance}
        data, headers = await self._request("POST", "/v1/features", json_body=body, arrow=True)
        return _with_complete(arrow_from_ipc(data), headers)

    async def feature_row(self, entity_id: Any, at: Any, features: Sequence[str], *,
                          knowledge: str = "as_known") -> pa.Table:
        """One entity's features at one time (``GET /v1/features/{entity_id}``): a one-row
        table shaped like :meth:`features`."""
        params = {"at": _time_list(at, 1)[0], "features": ",".join(features),
                  "knowledge": knowledge}
        data, headers = await self._request(
            "GET", f"/v1/features/{quote(str(entity_id), safe='')}", params=params, arrow=True)
        return _with_complete(arrow_from_ipc(data), headers)

    async def facts(self, fact_type: str, entity_id: Any, at: Any, *, window: str | None = None,
                    knowledge: str = "as_known", limit: int | None = None) -> pa.Table:
        """The raw facts of one entity visible at ``at``, newest first
        (``GET /v1/facts/{fact_type}/{entity_id}``)."""
        params = {"at": _time_list(at, 1)[0], "knowledge": knowledge}
        if window is not None:
            params["window"] = window
        if limit is not None:
            params["limit"] = str(limit)
        data, _ = await self._request(
            "GET", f"/v1/facts/{quote(fact_type, safe='')}/{quote(str(entity_id), safe='')}",
            params=params, arrow=True)
        return arrow_from_ipc(data)

    async def snapshot(self, service: str, entity_id: Any, at: Any, *,
                       knowledge: str = "as_known") -> pa.Table:
        """The as-of snapshot row of one entity, with its provenance (``run_id``,
        ``captured_at``, ``age_s``) (``GET /v1/snapshots/{service}/{entity_id}``)."""
        params = {"at": _time_list(at, 1)[0], "knowledge": knowledge}
        data, _ = await self._request(
            "GET", f"/v1/snapshots/{quote(service, safe='')}/{quote(str(entity_id), safe='')}",
            params=params, arrow=True)
        return arrow_from_ipc(data)

    async def catalog(self) -> dict[str, Any]:
        """Fact types, services, runs, selections and watermarks (``GET /v1/catalog``)."""
        out: dict[str, Any] = await self._json("GET", "/v1/catalog")
        return out

    # -- training sets ---------------------------------------------------------------------------
    async def start_training_set(self, labels: str, features: Sequence[str], out: str, *,
                                 knowledge: str = "as_known") -> str:
        """Start a training-set job (needs ``write``); its id. ``labels`` and ``out`` are keys
        in the server's store."""
        doc = await self._json("POST", "/v1/training-sets", json_body={
            "labels": labels, "features": list(features), "out": out, "knowledge": knowledge})
        return str(doc["id"])

    async def training_set_status(self, job_id: str) -> dict[str, Any]:
        """A job's state: ``id``, ``state``, ``progress``, ``out``, ``error``, ..."""
        out: dict[str, Any] = await self._json(
            "GET", f"/v1/training-sets/{quote(job_id, safe='')}")
        return out

    async def wait_training_set(self, job_id: str, *, poll_s: float = 0.5,
                                timeout_s: float | None = None) -> dict[str, Any]:
        """Poll until the job is ``done``; its final state.

        Raises:
            TrainingSetFailed: the job failed.
            TimeoutError: still not finished after ``timeout_s``.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        while True:
            doc = await self.training_set_status(job_id)
            if doc["state"] == "done":
                return doc
            if doc["state"] == "failed":
                err = doc.get("error") or {}
                raise TrainingSetFailed(200, str(err.get("code", "failed")),
                                        str(err.get("message", "the job failed")))
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"training-set job {job_id} still {doc['state']} after "
                                   f"{timeout_s}s")
            await asyncio.sleep(poll_s)

    # -- sync twins ------------------------------------------------------------------------------
    def features_sync(self, *args: Any, **kwargs: Any) -> pa.Table:
        """:meth:`features`, blocking."""
        return self._run(self.features(*args, **kwargs))

    def feature_row_sync(self, *args: Any, **kwargs: Any) -> pa.Table:
        """:meth:`feature_row`, blocking."""
        return self._run(self.feature_row(*args, **kwargs))

    def facts_sync(self, *args: Any, **kwargs: Any) -> pa.Table:
        """:meth:`facts`, blocking."""
        return self._run(self.facts(*args, **kwargs))

    def snapshot_sync(self, *args: Any, **kwargs: Any) -> pa.Table:
        """:meth:`snapshot`, blocking."""
        return self._run(self.snapshot(*args, **kwargs))

    def catalog_sync(self) -> dict[str, Any]:
        """:meth:`catalog`, blocking."""
        return self._run(self.catalog())

    def start_training_set_sync(self, *args: Any, **kwargs: Any) -> str:
        """:meth:`start_training_set`, blocking."""
        return self._run(self.start_training_set(*args, **kwargs))

    def training_set_status_sync(self, job_id: str) -> dict[str, Any]:
        """:meth:`training_set_status`, blocking."""
        return self._run(self.training_set_status(job_id))

    def wait_training_set_sync(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """:meth:`wait_training_set`, blocking."""
        return self._run(self.wait_training_set(*args, **kwargs))


def is_complete(table: pa.Table) -> bool | None:
    """Whether a :meth:`Client.features` answer is complete (None if it does not say)."""
    meta = table.schema.metadata or {}
    v = meta.get(COMPLETE_KEY)
    return None if v is None else v == b"true"


def _with_complete(table: pa.Table, headers: dict[str, str]) -> pa.Table:
    flag = headers.get("X-Timetravel-Complete")
    if flag is None:
        return table
    return table.replace_schema_metadata({**(table.schema.metadata or {}),
                                          COMPLETE_KEY: flag.encode()})


def _error(status: int, body: bytes) -> ApiRequestError:
    import json  # noqa: PLC0415

    try:
        err = json.loads(body)["error"]
        return ApiRequestError(status, str(err["code"]), str(err["message"]),
                               field=err.get("field"))
    except (ValueError, KeyError, TypeError):
        return ApiRequestError(status, "http_error", body[:200].decode("utf-8", "replace"))


def _entity_list(entities: Any) -> list[Any]:
    if isinstance(entities, pa.ChunkedArray | pa.Array):
        values = entities.to_pylist()
    elif isinstance(entities, np.ndarray):
        values = entities.tolist()
    elif isinstance(entities, str | int | np.integer):
        values = [entities]
    else:
        values = list(entities)
    out = []
    for v in values:
        if isinstance(v, np.integer):
            v = int(v)
        if isinstance(v, int) and not isinstance(v, bool) and abs(v) > MAX_SAFE_INT:
            v = str(v)
        out.append(v)
    return out


def _one_time(v: Any) -> str:
    if isinstance(v, str):
        return v
    if isinstance(v, datetime):
        if v.tzinfo is None or v.utcoffset() is None:
            raise InvalidInput(f"at: {v!r} has no time zone", field="at")
        return v.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    if hasattr(v, "to_pydatetime"):  # pandas Timestamp
        return _one_time(v.to_pydatetime())
    raise InvalidInput(f"at: expected an aware datetime or an RFC 3339 string, not "
                       f"{type(v).__name__}", field="at")


def _time_list(at: Any, n: int) -> list[str]:
    if isinstance(at, pa.ChunkedArray | pa.Array):
        if not pa.types.is_timestamp(at.type) or at.type.tz is None:
            raise InvalidInput("at: a pyarrow array of at must be a timestamp with a time zone",
                               field="at")
        us = at.cast(pa.timestamp("us", tz="UTC")).cast(pa.int64()).to_pylist()
        out = [format_timestamp(v) for v in us]
    elif isinstance(at, str | datetime) or not hasattr(at, "__len__"):
        out = [_one_time(at)] * n
    else:
        out = [_one_time(v) for v in at]
    if len(out) != n:
        raise InvalidInput(f"at: {len(out)} times for {n} entities", field="at")
    return out
