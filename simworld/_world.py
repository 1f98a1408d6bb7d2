"""The simulated world's truth: members whose state is a pure function of (seed, member, t).

Members are ``1..members``. Each has fixed traits (region, activity level, sign-up time, a base
device and plan) and traits that change at member-specific moments (the device in use and the
plan change every 30 days, favourite genres every 21 days, each epoch offset by a per-member
phase). Plays happen as a Poisson process per (member, day), weekends busier; my-list items are
added per (member, day) and removed after a random lifetime (at most 90 days). Every random draw
is a counter-based hash (:mod:`simworld._random`), so the truth at any ``t`` is computed from
scratch, in any process, with no state: ``World(seed=7, members=1000, start_us=T).my_list(42, t)``
is the same everywhere, and asking about ``t`` never depends on what was asked before.

The services (:mod:`simworld._services`) answer with these functions at the world's "now"; tests
ask them directly ("what was the true state of member 42 at t?").
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import compress
from typing import Any

import numpy as np
import pyarrow as pa

from ttstore import TIMESTAMP_TYPE, US_PER_DAY, US_PER_S

from ._random import cdf, pick, poisson, uniform, uniform_streams, uniforms4

__all__ = [
    "ACTIVITY_LEVELS", "DEVICES", "GENRES", "PLANS", "REGIONS", "TENURE_BUCKETS", "Plays", "World"
]

GENRES = ("action", "comedy", "documentary", "drama", "kids", "romance", "scifi", "thriller")
REGIONS = ("us", "br", "gb", "de", "in", "jp", "mx", "fr")
_REGION_W = np.array([30, 12, 10, 9, 14, 8, 9, 8], np.float64)
DEVICES = ("tv", "phone", "tablet", "web")
_DEVICE_W = np.array([45, 30, 10, 15], np.float64)
PLANS = ("basic", "standard", "premium")
_PLAN_W = np.array([35, 45, 20], np.float64)
_PLAN_STREAMS = np.array([1, 2, 4], np.int64)
ACTIVITY_LEVELS = ("low", "medium", "high")
_ACTIVITY_W = np.array([50, 35, 15], np.float64)
_PLAYS_PER_DAY = np.array([0.4, 1.5, 4.0], np.float64)
_ADDS_PER_DAY = np.array([0.05, 0.15, 0.3], np.float64)
#: Tenure buckets (upper bounds in days; the last is open).
TENURE_BUCKETS = ("<30d", "30-90d", "90d-1y", "1-2y", "2y+")
_TENURE_EDGES_D = np.array([30, 90, 365, 730], np.int64)

_DEVICE_EPOCH_US = 30 * US_PER_DAY
_TASTE_EPOCH_US = 21 * US_PER_DAY
_LIST_HORIZON_D = 90
HISTORY_WINDOW_D = 30
_CHUNK = 4096  # members per vectorized pass of the truth functions
RECENT_PLAYS = 5

# Random streams: one per kind of draw, so no two draws share a hash input.
(_S_REGION, _S_ACTIVITY, _S_RATE, _S_TENURE, _S_DEVICE, _S_DEVICE_SW, _S_DEVICE_NEW, _S_PLAN,
 _S_PLAN_SW, _S_PLAN_NEW, _S_PHASE_D, _S_PHASE_T, _S_FAV1, _S_FAV2, _S_PLAYS_N, _S_PLAY_T,
 _S_PLAY_U, _S_ADDS_N, _S_ADD_T, _S_ADD_U, _S_ADD_LIFE, _S_KIDS, _S_GENRE, _S_RUNTIME,
 ) = range(1, 25)


# What the traits draw, in the order of ``uniform_streams``' rows (see ``_traits``).
_TRAIT_STREAMS = (_S_ACTIVITY, _S_RATE, _S_TENURE, _S_REGION, _S_PHASE_D, _S_PHASE_T, _S_KIDS)
_ACTIVITY_CDF, _REGION_CDF = cdf(_ACTIVITY_W), cdf(_REGION_W)
_DEVICE_CDF, _PLAN_CDF = cdf(_DEVICE_W), cdf(_PLAN_W)
_GENRE_NAMES = np.asarray(GENRES, dtype=object)
_GENRE_CDF, _OTHER_GENRE_CDF = cdf(np.ones(len(GENRES))), cdf(np.ones(len(GENRES) - 1))

#: Member ids: a sequence or an integer array.
Ids = Sequence[int] | np.ndarray
#: One member's answer: a JSON object, or None for an unknown member.
Answer = dict[str, Any] | None


def _expand(n: np.ndarray, *cols: np.ndarray) -> tuple[np.ndarray, ...]:
    """Repeat each cell's columns ``n`` times, and number the copies ``k = 0..n-1``."""
    row = np.repeat(np.arange(len(n)), n)
    k = np.arange(len(row)) - np.repeat(np.cumsum(n) - n, n)
    return (*(c[row] for c in cols), k)


def timestamps(us: np.ndarray) -> list[str]:
    """RFC 3339 ``...Z`` strings with 6 fractional digits (``format_timestamp``, vectorized)."""
    text = np.datetime_as_string(np.asarray(us, np.int64).astype("datetime64[us]"), unit="us")
    out: list[str] = np.char.add(text, "Z").tolist()
    return out


@dataclass(frozen=True)
class Plays:
    """Plays of several members, sorted by (member position, ``played_at_us``).

    ``pos`` indexes the members array the plays were asked for.
    """

    pos: np.ndarray
    played_at_us: np.ndarray
    video_id: np.ndarray
    genre: np.ndarray  # index into GENRES
    seconds: np.ndarray
    device: np.ndarray | None  # index into DEVICES (when asked for)


class World:
    """A deterministic population of members and a catalog of videos.

    Args:
        seed: everything follows from it.
        members: members are ``1..members``.
        start_us: when the simulation starts; every member signed up before it.
        videos: catalog size (videos ``1..videos``).
    """

    def __init__(self, *, seed: int, members: int, start_us: int, videos: int = 500) -> None:
        if members < 1 or videos < len(GENRES):
            raise ValueError(f"need members >= 1 and videos >= {len(GENRES)}")
        self.seed = int(seed)
        self.members = int(members)
        self.start_us = int(start_us)
        self.videos = int(videos)
        v = np.arange(1, videos + 1)
        genre = pick(uniform(seed, _S_GENRE, v), _GENRE_CDF)
        genre[: len(GENRES)] = np.arange(len(GENRES))  # every genre has a video
        self.video_genre = genre
        self.video_runtime_s = np.round(600 + uniform(seed, _S_RUNTIME, v) * 8400).astype(np.int64)
        # Videos of each genre in catalog order; earlier ones are more popular.
        self._by_genre = np.argsort(genre, kind="stable") + 1
        counts = np.bincount(genre, minlength=len(GENRES))
        self._genre_count = counts
        self._genre_offset = np.concatenate([[0], np.cumsum(counts)[:-1]])

    # -- validity --------------------------------------------------------------------------------
    def known(self, member: Ids | int) -> np.ndarray:
        """Whether each id is a member of this world (``1 <= id <= members``)."""
        m = np.asarray(member, dtype=np.int64)
        out: np.ndarray = (m >= 1) & (m <= self.members)
        return out

    # -- fixed and slowly changing traits (vectorized) ----------------------------------------
    def _traits(self, m: np.ndarray) -> dict[str, np.ndarray]:
        u = uniform_streams(self.seed, _TRAIT_STREAMS, m)  # one hash pass for every trait
        activity = pick(u[0], _ACTIVITY_CDF)
        rate = _PLAYS_PER_DAY[activity] * (0.6 + 0.8 * u[1])
        # Tenure skews recent: u^2 over six years, to the second.
        tenure_us = (u[2] ** 2 * 6 * 365 * US_PER_DAY).astype(np.int64)
        return {
            "region": pick(u[3], _REGION_CDF),
            "activity": activity,
            "rate": rate,
            "add_rate": _ADDS_PER_DAY[activity],
            "signup_us": self.start_us - US_PER_S - tenure_us,
            "phase_d": (u[4] * _DEVICE_EPOCH_US).astype(np.int64),
            "phase_t": (u[5] * _TASTE_EPOCH_US).astype(np.int64),
            "kids": u[6] < 0.2,
        }

    def _device_plan(self, m: np.ndarray, t_us: np.ndarray, tr: dict[str, np.ndarray]) -> tuple[
        np.ndarray, np.ndarray
    ]:
        """Device in use and plan at ``t_us``: a base value, switched in some 30-day epochs."""
        s = self.seed
        e = (t_us + tr["phase_d"]) // _DEVICE_EPOCH_US
        base = uniform_streams(s, (_S_DEVICE, _S_PLAN), m)
        by_epoch = uniform_streams(s, (_S_DEVICE_NEW, _S_DEVICE_SW, _S_PLAN_NEW, _S_PLAN_SW), m, e)
        device = np.where(by_epoch[1] < 0.25, pick(by_epoch[0], _DEVICE_CDF),
                          pick(base[0], _DEVICE_CDF))
        plan = np.where(by_epoch[3] < 0.15, pick(by_epoch[2], _PLAN_CDF), pick(base[1], _PLAN_CDF))
        return device, plan

    def _favourites(self, m: np.ndarray, t_us: np.ndarray, phase_t: np.ndarray) -> tuple[
        np.ndarray, np.ndarray
    ]:
        e = (t_us + phase_t) // _TASTE_EPOCH_US
        g = len(GENRES)
        u = uniform_streams(self.seed, (_S_FAV1, _S_FAV2), m, e)
        fav1 = pick(u[0], _GENRE_CDF)
        # A second favourite different from the first.
        fav2 = (fav1 + 1 + pick(u[1], _OTHER_GENRE_CDF)) % g
        return fav1, fav2

    def _pick_video(
        self, m: np.ndarray, t_us: np.ndarray, phase_t: np.ndarray, u: tuple[np.ndarray, ...],
    ) -> tuple[np.ndarray, np.ndarray]:
        """(video_id, genre) of plays or adds: favourite genres preferred, popular videos first.

        ``u`` holds three uniforms per event (genre source, other genre, popularity)."""
        fav1, fav2 = self._favourites(m, t_us, phase_t)
        other = pick(u[1], _GENRE_CDF)
        genre = np.where(u[0] < 0.55, fav1, np.where(u[0] < 0.75, fav2, other))
        pop = u[2] ** 2
        idx = self._genre_offset[genre] + (pop * self._genre_count[genre]).astype(np.int64)
        return self._by_genre[idx], genre

    def _grid(self, m_all: np.ndarray, days: np.ndarray) -> tuple[
        np.ndarray, dict[str, np.ndarray], np.ndarray, np.ndarray, np.ndarray
    ]:
        """The (member, day) grid of the known members: their positions in ``m_all``, their
        traits (computed once per member), and per cell: the member's index, id and day."""
        pos = np.flatnonzero(self.known(m_all))
        tr = self._traits(m_all[pos])
        ri = np.repeat(np.arange(len(pos)), len(days))
        return pos, tr, ri, m_all[pos][ri], np.tile(days.astype(np.int64), len(pos))

    # -- plays ---------------------------------------------------------------------------------
    def plays(
        self, members: Ids, start_us: int, end_us: int, *, with_device: bool = False
    ) -> Plays:
        """Every play of ``members`` with ``start_us <= played_at_us < end_us`` (vectorized).

        A play is in the world from its start (``played_at_us``) with its watched ``seconds``;
        ``device`` (the member's device at that time) is filled when ``with_device``.
        """
        m_all = np.asarray(members, dtype=np.int64)
        d0, d1 = start_us // US_PER_DAY, (end_us - 1) // US_PER_DAY
        pos, tr, ri, m, d = self._grid(m_all, np.arange(d0, d1 + 1, dtype=np.int64))
        weekend = ((d + 3) % 7) >= 5  # 1970-01-01 was a Thursday
        lam = tr["rate"][ri] * np.where(weekend, 1.3, 1.0)
        n = poisson(uniform(self.seed, _S_PLAYS_N, m, d), lam)
        ri, m, d, k = _expand(n, ri, m, d)
        t = d * US_PER_DAY + (uniform(self.seed, _S_PLAY_T, m, d, k) * US_PER_DAY).astype(np.int64)
        keep = (t >= start_us) & (t < end_us) & (t >= tr["signup_us"][ri])
        ri, m, d, k, t = ri[keep], m[keep], d[keep], k[keep], t[keep]
        u = uniforms4(self.seed, _S_PLAY_U, m, d, k)
        video, genre = self._pick_video(m, t, tr["phase_t"][ri], u)
        frac = 0.05 + 0.95 * np.sqrt(u[3])
        seconds = np.round(self.video_runtime_s[video - 1] * frac, 1)
        device = (
            self._device_plan(m, t, {key: v[ri] for key, v in tr.items()})[0]
            if with_device else None
        )
        p = pos[ri]
        order = np.lexsort((k, t, p))
        return Plays(
            pos=p[order], played_at_us=t[order], video_id=video[order], genre=genre[order],
            seconds=seconds[order], device=None if device is None else device[order],
        )

    def plays_table(self, members: Ids, start_us: int, end_us: int) -> pa.Table:
        """:meth:`plays` as an Arrow table (``member_id, played_at, video_id, genre, seconds,
        device``), sorted by member then time."""
        m = np.asarray(members, dtype=np.int64)
        p = self.plays(m, start_us, end_us, with_device=True)
        assert p.device is not None
        return pa.table({
            "member_id": pa.array(m[p.pos], pa.int64()),
            "played_at": pa.array(p.played_at_us, TIMESTAMP_TYPE),
            "video_id": pa.array(p.video_id, pa.int64()),
            "genre": pa.array(np.asarray(GENRES, dtype=object)[p.genre], pa.string()),
            "seconds": pa.array(p.seconds, pa.float64()),
            "device": pa.array(np.asarray(DEVICES, dtype=object)[p.device], pa.string()),
        })

    # -- my list ---------------------------------------------------------------------------------
    def _list_items(self, m_all: np.ndarray, t_us: int) -> tuple[np.ndarray, ...]:
        """(pos, video_id, added_at_us) of the items on each member's list at ``t_us``, sorted
        by (pos, added_at) newest first; a video added twice counts from its earlier add."""
        dt = t_us // US_PER_DAY
        pos, tr, ri, m, d = self._grid(m_all, np.arange(dt - _LIST_HORIZON_D, dt + 1))
        n = poisson(uniform(self.seed, _S_ADDS_N, m, d), tr["add_rate"][ri], k_max=8)
        ri, m, d, k = _expand(n, ri, m, d)
        offset = (uniform(self.seed, _S_ADD_T, m, d, k) * US_PER_DAY).astype(np.int64)
        added = d * US_PER_DAY + offset
        life = np.minimum(
            -np.log1p(-uniform(self.seed, _S_ADD_LIFE, m, d, k)) * 25 * US_PER_DAY,
            _LIST_HORIZON_D * US_PER_DAY,
        ).astype(np.int64)
        keep = (added <= t_us) & (t_us < added + life) & (added >= tr["signup_us"][ri])
        ri, m, d, k, added = ri[keep], m[keep], d[keep], k[keep], added[keep]
        video, _ = self._pick_video(
            m, added, tr["phase_t"][ri], uniforms4(self.seed, _S_ADD_U, m, d, k)
        )
        p = pos[ri]
        order = np.lexsort((added, video, p))
        p, video, added = p[order], video[order], added[order]
        first = np.ones(len(p), bool)
        first[1:] = (p[1:] != p[:-1]) | (video[1:] != video[:-1])
        p, video, added = p[first], video[first], added[first]
        order = np.lexsort((-video, -added, p))
        return p[order], video[order], added[order]

    # -- truth functions (one member or many) ----------------------------------------------------
    def profiles(self, members: Ids, t_us: int) -> list[Answer]:
        """Each member's profile at ``t_us`` (None for an unknown id)."""
        m_all = np.asarray(members, dtype=np.int64)
        ok = self.known(m_all)
        m = m_all[ok]
        tr = self._traits(m)
        device, plan = self._device_plan(m, np.full(len(m), t_us, np.int64), tr)
        tenure_d = ((t_us - tr["signup_us"]) // US_PER_DAY).tolist()
        region = np.asarray(REGIONS, dtype=object)[tr["region"]].tolist()
        dev = np.asarray(DEVICES, dtype=object)[device].tolist()
        pl = np.asarray(PLANS, dtype=object)[plan].tolist()
        streams = _PLAN_STREAMS[plan].tolist()
        kids = tr["kids"].tolist()
        signup = timestamps(tr["signup_us"])
        ids = m.tolist()
        out: list[Answer] = [None] * len(m_all)
        for j, i in enumerate(np.flatnonzero(ok).tolist()):
            out[i] = {
                "member_id": ids[j],
                "region": region[j],
                "device": dev[j],
                "plan": pl[j],
                "max_streams": streams[j],
                "kids_profile": kids[j],
                "signup_at": signup[j],
                "tenure_days": tenure_d[j],
            }
        return out

    def viewing_histories(self, members: Ids, t_us: int) -> list[Answer]:
        """Each member's viewing history at ``t_us``: plays of the last 30 days (``(t - 30d,
        t]``) summarized (counts, seconds in 7 and 30 days, seconds per genre, the top genre),
        and the ``RECENT_PLAYS`` newest plays, newest first (None for an unknown id)."""
        m_all = np.asarray(members, dtype=np.int64)
        if len(m_all) > _CHUNK:  # bounded memory for whole populations
            return [a for lo in range(0, len(m_all), _CHUNK)
                    for a in self.viewing_histories(m_all[lo:lo + _CHUNK], t_us)]
        p = self.plays(m_all, t_us - HISTORY_WINDOW_D * US_PER_DAY + 1, t_us + 1)
        n = len(m_all)
        count = np.bincount(p.pos, minlength=n)
        secs30 = np.bincount(p.pos, weights=p.seconds, minlength=n)
        recent7 = p.played_at_us > t_us - 7 * US_PER_DAY
        secs7 = np.bincount(p.pos[recent7], weights=p.seconds[recent7], minlength=n)
        g = len(GENRES)
        # bincount adds in input order, as np.add.at does: the same sums, one pass.
        by_genre = np.bincount(p.pos * g + p.genre, weights=p.seconds,
                               minlength=n * g).reshape(n, g)
        top = by_genre.argmax(axis=1)  # ties: the first genre in GENRES order
        ends = np.cumsum(count)
        # Only the newest RECENT_PLAYS of each member are shown, newest first: build just those,
        # in one pass over all members, and hand each member its slice.
        shown = np.flatnonzero(np.arange(len(p.pos)) >= (ends - RECENT_PLAYS)[p.pos])
        shown = shown[np.lexsort((-shown, p.pos[shown]))]
        recent_all = [
            {"video_id": v, "genre": gn, "seconds": sc, "played_at": at}
            for v, gn, sc, at in zip(
                p.video_id[shown].tolist(), _GENRE_NAMES[p.genre[shown]].tolist(),
                p.seconds[shown].tolist(), timestamps(p.played_at_us[shown]), strict=True,
            )
        ]
        n_shown = np.minimum(count, RECENT_PLAYS)
        shown_hi = np.cumsum(n_shown).tolist()
        n_shown_l, counts = n_shown.tolist(), count.tolist()
        top_name = _GENRE_NAMES[top].tolist()
        genre_secs = np.round(by_genre, 1)
        genre_rows, genre_on = genre_secs.tolist(), (genre_secs > 0).tolist()
        s30, s7 = np.round(secs30, 1).tolist(), np.round(secs7, 1).tolist()
        ids = m_all.tolist()
        out: list[Answer] = [None] * n
        for i in np.flatnonzero(self.known(m_all)).tolist():
            hi = shown_hi[i]
            recent = recent_all[hi - n_shown_l[i]:hi]
            out[i] = {
                "member_id": ids[i],
                "plays_30d": counts[i],
                "seconds_30d": s30[i],
                "seconds_7d": s7[i],
                "top_genre_30d": top_name[i] if counts[i] else None,
                "genre_seconds_30d": dict(
                    compress(zip(GENRES, genre_rows[i], strict=True), genre_on[i])
                ),
                "last_played_at": recent[0]["played_at"] if recent else None,
                "recent": recent,
            }
        return out

    def my_lists(self, members: Ids, t_us: int) -> list[Answer]:
        """Each member's list at ``t_us``, newest first (None for an unknown id)."""
        m_all = np.asarray(members, dtype=np.int64)
        if len(m_all) > _CHUNK:
            return [a for lo in range(0, len(m_all), _CHUNK)
                    for a in self.my_lists(m_all[lo:lo + _CHUNK], t_us)]
        p, video, added = self._list_items(m_all, t_us)
        n = len(m_all)
        counts = np.bincount(p, minlength=n).tolist()
        ends = np.cumsum(counts).tolist()
        vid, at = video.tolist(), timestamps(added)
        out: list[Answer] = [None] * n
        for i in np.flatnonzero(self.known(m_all)).tolist():
            lo, hi = ends[i] - counts[i], ends[i]
            out[i] = {
                "member_id": int(m_all[i]),
                "size": hi - lo,
                "last_added_at": at[lo] if hi > lo else None,
                "video_ids": vid[lo:hi],
                "items": [{"video_id": vid[j], "added_at": at[j]} for j in range(lo, hi)],
            }
        return out

    def profile(self, member: int, t_us: int) -> dict[str, Any] | None:
        """Member ``member``'s profile at ``t_us``, or None if there is no such member."""
        return self.profiles([member], t_us)[0]

    def viewing_history(self, member: int, t_us: int) -> dict[str, Any] | None:
        """Member ``member``'s viewing history at ``t_us`` (see :meth:`viewing_histories`)."""
        return self.viewing_histories([member], t_us)[0]

    def my_list(self, member: int, t_us: int) -> dict[str, Any] | None:
        """Member ``member``'s list at ``t_us`` (see :meth:`my_lists`)."""
        return self.my_lists([member], t_us)[0]

    # -- populations and the catalog -------------------------------------------------------------
    def population(self, t_us: int) -> pa.Table:
        """Every member at ``t_us`` with strata columns: ``member_id``, ``region``, ``device``,
        ``plan``, ``activity_level``, ``tenure_bucket``, ``tenure_days`` and
        ``expected_minutes_per_day`` (a variability column for Neyman allocation)."""
        m = np.arange(1, self.members + 1, dtype=np.int64)
        tr = self._traits(m)
        device, plan = self._device_plan(m, np.full(len(m), t_us, np.int64), tr)
        tenure_d = (t_us - tr["signup_us"]) // US_PER_DAY
        bucket = np.searchsorted(_TENURE_EDGES_D, tenure_d, side="right")
        mean_watch_s = float(self.video_runtime_s.mean()) * 0.68  # E[0.05 + 0.95 sqrt(U)]

        def cat(values: tuple[str, ...], idx: np.ndarray) -> pa.Array:
            return pa.array(np.asarray(values, dtype=object)[idx], pa.string())

        return pa.table({
            "member_id": pa.array(m, pa.int64()),
            "region": cat(REGIONS, tr["region"]),
            "device": cat(DEVICES, device),
            "plan": cat(PLANS, plan),
            "activity_level": cat(ACTIVITY_LEVELS, tr["activity"]),
            "tenure_bucket": cat(TENURE_BUCKETS, bucket),
            "tenure_days": pa.array(tenure_d, pa.int64()),
            "expected_minutes_per_day": pa.array(
                np.round(tr["rate"] * 1.086 * mean_watch_s / 60, 2), pa.float64()
            ),
        })

    def catalog(self) -> pa.Table:
        """The videos: ``video_id``, ``genre``, ``runtime_s``."""
        return pa.table({
            "video_id": pa.array(np.arange(1, self.videos + 1), pa.int64()),
            "genre": pa.array(np.asarray(GENRES, dtype=object)[self.video_genre], pa.string()),
            "runtime_s": pa.array(self.video_runtime_s, pa.int64()),
        })
