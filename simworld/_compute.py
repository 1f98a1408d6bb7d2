"""The recommendation compute app: a real aiohttp service in the simulated world.

Routes::

    POST /v1/recommend          {"member_id": 42, "device": "tv"}
                                -> {"request_id", "at", "items": [{"video_id", "genre", "score",
                                    "position"}], "features": {...}}
    POST /v1/events/impression  {"rows": [...]}   the client rendered recommended titles
    POST /v1/events/playback    {"rows": [...]}   plays (``event_time`` given; late ones too)
    GET  /healthz

On each recommendation request, at the clock's now, it:

1. logs the ``recommendation_request`` fact (before computing anything, so the request counts
   itself, online and offline alike);
2. fetches the member's state from the world's services (viewing history, my list, profile)
   and takes the member's facts from its own event cache (every fact it logged, with the
   ``logged_at`` it got);
3. assembles the live :class:`~timetravel_api.View` and runs the feature repo's encoders on it,
   the same callables the training-set build runs offline;
4. scores candidate titles with a fixed-weight model and returns the top ones;
5. logs the served feature values with :func:`~timetravel_api.log_served_features`.

Every fact is logged with a ``fact_id`` the app makes from its own counter (unique, so a retried
log is idempotent, and deterministic for a given seed).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import numpy as np
from aiohttp import web

from factlog import FactLogger
from timetravel_api import FeatureRepo, View, log_served_features
from ttstore import Clock, format_timestamp, parse_timestamp

from ._server import serve_in_thread
from ._world import GENRES, World

__all__ = ["ComputeApp", "running_compute_app"]

TOP_K = 5
CANDIDATES_PER_GENRE = 15
#: The fixed-weight scoring model: a candidate's score is the sum of these weights over its
#: signals (genre is the member's favourite, second favourite, on the member's list,
#: popularity within its genre, already played this week).
WEIGHTS = {"favourite_genre": 1.0, "second_genre": 0.5, "on_my_list": 0.8, "popularity": 0.6,
           "played_7d": -1.5}
SERVICES = ("viewing_history", "my_list", "profile")


class ComputeApp:
    """The recommender's state: the repo, the logger, the clock and the member event cache.

    Args:
        repo: the feature repo (its encoders run online).
        logger: logs every fact the app uses or serves.
        clock: the app's now (the simulation's clock).
        world_url: the simulated world's base URL (its services).
        world: the world's catalog (videos, genres, popularity order).
        producer_tag: prefix of the app's fact ids (unique per run).
    """

    def __init__(self, *, repo: FeatureRepo, logger: FactLogger, clock: Clock, world_url: str,
                 world: World, producer_tag: str) -> None:
        self.repo = repo
        self.logger = logger
        self.clock = clock
        self.world_url = world_url.rstrip("/")
        self.tag = producer_tag
        self._n = 0
        self._cache: dict[tuple[str, int], list[dict[str, Any]]] = {}
        self.logged: dict[str, int] = {}
        self.fetch_errors = 0
        genre = world.video_genre
        self._by_genre = {g: (np.flatnonzero(genre == g) + 1)[:CANDIDATES_PER_GENRE].tolist()
                          for g in range(len(GENRES))}
        self._genre_of = {int(v): GENRES[int(g)] for v, g in enumerate(genre, start=1)}
        self._session: aiohttp.ClientSession | None = None

    # -- facts ---------------------------------------------------------------------------------
    def _fact_id(self, kind: str) -> str:
        self._n += 1
        return f"{self.tag}-{kind}-{self._n:010d}"

    def log(self, fact_type: str, row: dict[str, Any]) -> None:
        """Log one fact and keep it in the event cache, as the offline view will see it."""
        now = self.clock.now_us()
        row = dict(row, fact_id=row.get("fact_id") or self._fact_id(fact_type[:3]))
        event_us = row.get("event_time")
        if isinstance(event_us, str):
            event_us = parse_timestamp(event_us, field="event_time")
        event_us = now if event_us is None else int(event_us)
        if not self.logger.log(fact_type, {**row, "event_time": format_timestamp(event_us)}):
            raise RuntimeError(f"the fact logger dropped a {fact_type} fact")
        self.logged[fact_type] = self.logged.get(fact_type, 0) + 1
        cached = dict(row, event_time=event_us, logged_at=now)
        self._cache.setdefault((fact_type, int(row["member_id"])), []).append(cached)

    def member_facts(self, member: int) -> dict[str, list[dict[str, Any]]]:
        """The member's facts of every fact type the encoders read (what the app fetched)."""
        return {ft: self._cache.get((ft, member), [])
                for ft in ("playback", "recommendation_request", "impression")}

    # -- the request ---------------------------------------------------------------------------
    async def _fetch(self, service: str, member: int) -> dict[str, Any] | None:
        assert self._session is not None
        async with self._session.get(f"{self.world_url}/v1/{service}/{member}") as resp:
            if resp.status == 404:
                return None
            resp.raise_for_status()
            body: dict[str, Any] = await resp.json()
            return body

    async def recommend(self, member: int, device: str) -> dict[str, Any]:
        now = self.clock.now_us()
        request_id = self._fact_id("req")
        self.log("recommendation_request",
                 {"member_id": member, "request_id": request_id, "device": device})
        fetched = await asyncio.gather(*(self._fetch(s, member) for s in SERVICES),
                                       return_exceptions=True)
        snapshots: dict[str, dict[str, Any] | None] = {}
        statuses: dict[str, str] = {}
        for service, got in zip(SERVICES, fetched, strict=True):
            if isinstance(got, BaseException):
                self.fetch_errors += 1
                snapshots[service], statuses[service] = None, "error"
            else:
                snapshots[service] = got
        view = View.live(member, now, facts=self.member_facts(member), snapshots=snapshots,
                         snapshot_statuses=statuses)
        values: dict[str, Any] = {}
        for name, enc in self.repo.encoders.items():
            values[name], _status = enc.evaluate(view)
        items = self._score(member, view, snapshots)
        log_served_features(self.logger, member, values, request_id=request_id,
                            versions=self.repo.versions, entity_name="member_id")
        self.logged["served_features"] = self.logged.get("served_features", 0) + 1
        return {"request_id": request_id, "at": format_timestamp(now), "items": items,
                "features": values}

    def _score(self, member: int, view: View, snaps: dict[str, dict[str, Any] | None]) -> list[
        dict[str, Any]
    ]:
        """Candidates from the member's two favourite genres (live viewing history, else the
        app's own play events), scored with :data:`WEIGHTS`."""
        hist = snaps.get("viewing_history") or {}
        plays = self._cache.get(("playback", member), [])
        week_ago = view.at_us - 7 * 86_400_000_000
        counts = dict.fromkeys(GENRES, 0)
        for p in hist.get("recent") or []:
            counts[p["genre"]] += 2
        for p in plays:
            if p["event_time"] > week_ago and p.get("genre") in counts:
                counts[p["genre"]] += 1
        ranked = sorted(GENRES, key=lambda g: (-counts[g], (GENRES.index(g) + member) % 8))
        fav, second = ranked[0], ranked[1]
        on_list = set((snaps.get("my_list") or {}).get("video_ids") or [])
        played = {p["video_id"] for p in plays if p["event_time"] > week_ago}
        scored = []
        for g in (fav, second):
            pool = self._by_genre[GENRES.index(g)]
            for rank, v in enumerate(pool):
                score = (WEIGHTS["favourite_genre"] * (g == fav)
                         + WEIGHTS["second_genre"] * (g == second)
                         + WEIGHTS["on_my_list"] * (v in on_list)
                         + WEIGHTS["popularity"] * (1 - rank / len(pool))
                         + WEIGHTS["played_7d"] * (v in played))
                scored.append((round(score, 6), v))
        scored.sort(key=lambda sv: (-sv[0], sv[1]))
        return [{"video_id": v, "genre": self._genre_of[v], "score": s, "position": i}
                for i, (s, v) in enumerate(scored[:TOP_K])]

    # -- the HTTP app --------------------------------------------------------------------------
    def make_app(self) -> web.Application:
        app = web.Application()

        async def recommend(request: web.Request) -> web.Response:
            body = await request.json()
            return web.json_response(
                await self.recommend(int(body["member_id"]), str(body.get("device") or "tv")))

        def events(fact_type: str) -> Any:
            async def handler(request: web.Request) -> web.Response:
                rows = (await request.json())["rows"]
                for row in rows:
                    self.log(fact_type, row)
                return web.json_response({"accepted": len(rows)})
            return handler

        async def healthz(request: web.Request) -> web.Response:
            return web.json_response({"ok": True})

        async def on_startup(app: web.Application) -> None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))

        async def on_cleanup(app: web.Application) -> None:
            if self._session is not None:
                await self._session.close()

        app.router.add_post("/v1/recommend", recommend)
        app.router.add_post("/v1/events/impression", events("impression"))
        app.router.add_post("/v1/events/playback", events("playback"))
        app.router.add_get("/healthz", healthz)
        app.on_startup.append(on_startup)
        app.on_cleanup.append(on_cleanup)
        return app


@dataclass
class RunningApp:
    url: str
    app: ComputeApp


@contextlib.contextmanager
def running_compute_app(app: ComputeApp, *, host: str = "127.0.0.1") -> Iterator[RunningApp]:
    """Serve ``app`` on a free loopback port from a background thread, for the ``with``."""
    def runner() -> web.AppRunner:
        return web.AppRunner(app.make_app(), access_log=None, shutdown_timeout=2.0)

    with serve_in_thread(runner, host=host, port=0, name="compute-app") as url:
        yield RunningApp(url=url, app=app)


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x))
