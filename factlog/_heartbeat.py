"""Producer heartbeats and completeness (SPEC §3).

Each logger keeps one mutable object, ``catalog/heartbeats/<writer_id>.json``::

    {"writer_id": "...", "producer": "...", "fact_types": ["playback", ...],
     "watermark": "2026-11-20T10:00:00.000000Z", "watermark_us": 1795...,
     "updated_at": "...", "updated_at_us": ..., "started_at": "...", "closed": false,
     "host": "...", "pid": 1234}

``watermark``: every fact the writer accepted with ``logged_at`` before it is in the store.
A producer is *live* while its heartbeat is fresh and it has not closed. Per fact type, the
completeness watermark is the minimum over the live producers that handle it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from ttstore import ObjectNotFound, Store, format_timestamp, key

HEARTBEATS_PREFIX = "catalog/heartbeats"
#: A heartbeat older than this (seconds) means the producer is not live.
DEFAULT_LIVE_TTL_S = 30.0

_log = logging.getLogger("factlog")


@dataclass(frozen=True)
class Heartbeat:
    """One producer's published state."""

    writer_id: str
    producer: str
    fact_types: tuple[str, ...]
    watermark_us: int
    updated_at_us: int
    started_at_us: int
    closed: bool

    def to_json(self) -> dict[str, Any]:
        return {
            "writer_id": self.writer_id,
            "producer": self.producer,
            "fact_types": list(self.fact_types),
            "watermark": format_timestamp(self.watermark_us),
            "watermark_us": self.watermark_us,
            "updated_at": format_timestamp(self.updated_at_us),
            "updated_at_us": self.updated_at_us,
            "started_at": format_timestamp(self.started_at_us),
            "closed": self.closed,
            "host": socket.gethostname(),
            "pid": os.getpid(),
        }

    @classmethod
    def from_json(cls, body: dict[str, Any]) -> Heartbeat:
        return cls(
            writer_id=str(body["writer_id"]),
            producer=str(body["producer"]),
            fact_types=tuple(str(t) for t in body.get("fact_types", [])),
            watermark_us=int(body["watermark_us"]),
            updated_at_us=int(body["updated_at_us"]),
            started_at_us=int(body.get("started_at_us", body["updated_at_us"])),
            closed=bool(body.get("closed", False)),
        )

    def is_live(self, now_us: int, live_ttl_s: float) -> bool:
        return not self.closed and now_us - self.updated_at_us <= live_ttl_s * 1_000_000


def heartbeat_key(writer_id: str) -> str:
    return key(HEARTBEATS_PREFIX, f"{writer_id}.json")


def publish(store: Store, hb: Heartbeat) -> None:
    """Write ``hb`` (a mutable pointer: plain put). Raises the store's errors."""
    store.put(heartbeat_key(hb.writer_id), json.dumps(hb.to_json(), indent=1).encode())


def _read_one(store: Store, k: str) -> Heartbeat | None:
    try:
        return Heartbeat.from_json(json.loads(store.get(k)))
    except ObjectNotFound:
        return None  # deleted since the listing
    except (ValueError, KeyError, TypeError) as exc:
        _log.warning("skipping unreadable heartbeat %s: %s", k, exc)
        return None


def read_heartbeats(store: Store) -> list[Heartbeat]:
    """Every readable heartbeat in the store (malformed ones are skipped with a warning).

    Raises:
        StoreError: the store could not be listed or read.
    """
    keys = list(store.iter_keys(HEARTBEATS_PREFIX + "/", ".json"))
    if len(keys) <= 4:
        got = [_read_one(store, k) for k in keys]
    else:  # one round trip each: overlap them
        with ThreadPoolExecutor(max_workers=min(16, len(keys))) as pool:
            got = list(pool.map(lambda k: _read_one(store, k), keys))
    return [hb for hb in got if hb is not None]


def watermarks_from(
    heartbeats: Iterable[Heartbeat], *, now_us: int, live_ttl_s: float = DEFAULT_LIVE_TTL_S
) -> dict[str, int | None]:
    """Per fact type, the minimum watermark over live producers; None when none is live."""
    out: dict[str, int | None] = {}
    for hb in heartbeats:
        live = hb.is_live(now_us, live_ttl_s)
        for ft in hb.fact_types:
            cur = out.get(ft)
            if not live:
                out.setdefault(ft, None)
            elif cur is None or hb.watermark_us < cur:
                out[ft] = hb.watermark_us
    return out


def producer_watermarks(
    store: Store | str, *, now_us: int, live_ttl_s: float = DEFAULT_LIVE_TTL_S
) -> dict[str, int | None]:
    """The completeness watermark of each fact type (SPEC §3, Completeness).

    Args:
        store: the store, or its URL.
        now_us: the reader's now; a heartbeat older than ``live_ttl_s`` at this time is not live.
        live_ttl_s: how fresh a heartbeat must be for its producer to count as live.

    Returns:
        Fact type → the minimum upload watermark (µs) over live producers that handle it, or
        None when no live producer handles it (nothing is waiting in a live spool). Only fact
        types some heartbeat names appear.

    Raises:
        StoreError: the heartbeats could not be listed.
    """
    st = store if isinstance(store, Store) else Store(store)
    return watermarks_from(read_heartbeats(st), now_us=now_us, live_ttl_s=live_ttl_s)


class WatermarkCache:
    """:func:`producer_watermarks` through a short-lived cache, for hot read paths (the query
    server answers every lookup with a completeness flag; without a cache each one lists and
    reads every heartbeat).

    Heartbeats are re-read when the copy in hand is older than ``ttl_s`` (real seconds, on a
    monotonic clock). Liveness is judged at the earlier of the caller's now and the now of the
    read, i.e. exactly as a fresh call would have answered at the time of the read.

    Why a stale answer is safe: a producer's watermark only rises, so a cached watermark is
    lower (more conservative: ``complete`` is False more often, never wrongly True); a producer
    that closed or stopped heartbeating since the read still counts as live (again
    conservative). The one exception: a producer that appears (or restarts after it stopped
    being live) after the read is unseen for at most ``ttl_s``, so for that long its fact types
    may be reported complete although facts wait in its spool. Fact objects themselves are never
    cached: a flushed object is visible at once.

    Args:
        store: the store with the heartbeats.
        ttl_s: how long one reading of the heartbeats is used; 0 reads them on every call.
        live_ttl_s: as for :func:`producer_watermarks`.
        monotonic: the clock (seconds) that ages the cache; ``time.monotonic`` by default.

    Thread-safe.
    """

    def __init__(
        self, store: Store, *, ttl_s: float, live_ttl_s: float = DEFAULT_LIVE_TTL_S,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if ttl_s < 0:
            raise ValueError("ttl_s must not be negative")
        self.store = store
        self.ttl_s = ttl_s
        self.live_ttl_s = live_ttl_s
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._read: tuple[float, int, list[Heartbeat]] | None = None  # (mono, now_us, hbs)

    def watermarks(self, *, now_us: int) -> dict[str, int | None]:
        """As :func:`producer_watermarks` (``now_us`` the caller's now), at most ``ttl_s`` old.

        Raises:
            StoreError: the heartbeats could not be listed.
        """
        if self.ttl_s <= 0:
            return watermarks_from(read_heartbeats(self.store), now_us=now_us,
                                   live_ttl_s=self.live_ttl_s)
        with self._lock:
            mono = self._monotonic()
            got = self._read
            if got is None or mono - got[0] > self.ttl_s or mono < got[0]:
                got = self._read = (mono, now_us, read_heartbeats(self.store))
        return watermarks_from(got[2], now_us=min(now_us, got[1]), live_ttl_s=self.live_ttl_s)
