"""The uploader thread: sealed spool segments → Parquet objects in the store, and heartbeats.

A sealed segment (one fact type) is split by the UTC date of ``event_time``; each part becomes
``facts/<fact_type>/date=YYYY-MM-DD/<writer_id>-<segment:010d>.parquet``, written create-if-absent.
The segment is immutable and the Parquet bytes depend only on it, so a retry (in this process,
or by the next logger after a crash) writes the same object under the same name. ``ObjectExists``
is success once the stored object holds the same facts; if it holds others, the segment is kept
in the spool and reported, never deleted. The segment file is deleted only after every part is
in the store.

Store errors are retried with exponential backoff and full jitter; a flush wakes the thread to
retry at once.
"""

from __future__ import annotations

import logging
import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import pyarrow as pa

from ttstore import (
    US_PER_DAY,
    Clock,
    ObjectExists,
    Store,
    StoreError,
    day_to_date,
    key,
)

from ._buffer import Marker, RateLimitedWarnings
from ._errors import FactlogError, FactTypeError
from ._facttypes import FactType, FactTypeCatalog
from ._heartbeat import Heartbeat, publish
from ._resolver import TypeResolver
from ._spool import SealedSegment, Spool, read_segment

_log = logging.getLogger("factlog")
_BACKOFF_BASE_S = 0.05


@dataclass(frozen=True)
class UploaderConfig:
    heartbeat_interval_s: float
    max_backoff_s: float


def split_by_date(table: pa.Table) -> list[tuple[int, pa.Table]]:
    """Parts of ``table`` per UTC day of ``event_time`` (day number, rows in input order)."""
    ev = table.column("event_time").cast(pa.int64()).to_numpy()
    days = np.floor_divide(ev, US_PER_DAY)
    if len(days) == 0:
        return []
    if days.min() == days.max():
        return [(int(days[0]), table.combine_chunks())]
    order = np.argsort(days, kind="stable")
    sorted_days = days[order]
    table = table.take(pa.array(order)).combine_chunks()
    cuts = np.flatnonzero(np.diff(sorted_days)) + 1
    bounds = [0, *cuts.tolist(), len(sorted_days)]
    return [(int(sorted_days[a]), table.slice(a, b - a)) for a, b in zip(bounds, bounds[1:],
                                                                          strict=False)]


def object_key(fact_type: str, day: int, writer_id: str, number: int) -> str:
    return key("facts", fact_type, f"date={day_to_date(day)}", f"{writer_id}-{number:010d}.parquet")


class Uploader(threading.Thread):
    """Uploads sealed segments in number order, declares pending fact types, and publishes the
    heartbeat."""

    def __init__(
        self,
        *,
        store: Store,
        spool: Spool,
        producer: str,
        clock: Clock,
        config: UploaderConfig,
        catalog: FactTypeCatalog,
        resolver: TypeResolver,
        pending_declarations: list[FactType],
        warnings: RateLimitedWarnings,
    ) -> None:
        super().__init__(name=f"factlog-uploader-{spool.writer_id[:8]}", daemon=True)
        self._store = store
        self._spool = spool
        self.writer_id = spool.writer_id
        self._producer = producer
        self._clock = clock
        self._cfg = config
        self._catalog = catalog
        self._resolver = resolver
        self._declare = list(pending_declarations)
        self._warn = warnings
        self.lock = threading.Lock()
        self._sealed: dict[int, SealedSegment] = {}
        self._stuck: set[int] = set()
        self._done_keys: dict[int, set[str]] = {}
        self._markers: list[tuple[int, Marker]] = []
        self._wake = threading.Event()
        self._stop_requested = False
        self._failures = 0
        self.written_rows = 0
        self.retries = 0
        self.fact_types: set[str] = set()
        self.watermark_fn: Callable[[], int] = clock.now_us
        self._started_us = clock.now_us()
        self._last_heartbeat = -1e18

    # called by other threads ---------------------------------------------------------------
    def add_sealed(self, seg: SealedSegment) -> None:
        with self.lock:
            self._sealed[seg.number] = seg
            self.fact_types.add(seg.fact_type)
        self._wake.set()

    def add_marker(self, marker: Marker, *, through: int) -> None:
        with self.lock:
            self._markers.append((through, marker))
            self._failures = 0  # a flush retries at once, whatever the backoff said
        self._wake.set()

    def note_fact_type(self, name: str) -> None:
        """Name ``name`` in the heartbeat from now on."""
        with self.lock:
            self.fact_types.add(name)

    def stop(self) -> None:
        self._stop_requested = True
        self._wake.set()

    def sealed_stats(self) -> tuple[int, int, int]:
        """(bytes, count, stuck) of sealed segments not yet uploaded."""
        with self.lock:
            segs = list(self._sealed.values())
            stuck = len(self._stuck)
        return sum(s.size_bytes for s in segs), len(segs), stuck

    def sealed_min_logged_at(self) -> int | None:
        """Call with the writer's lock held (lock order: writer, then uploader)."""
        with self.lock:
            mins = [s.min_logged_at_us for s in self._sealed.values()
                    if s.min_logged_at_us is not None]
        return min(mins) if mins else None

    def pending(self) -> bool:
        with self.lock:
            return bool(self._sealed) or bool(self._declare)

    # the thread ----------------------------------------------------------------------------
    def run(self) -> None:
        while not self._stop_requested:
            uploaded = self._round()
            now = time.monotonic()
            if uploaded or now - self._last_heartbeat >= self._cfg.heartbeat_interval_s:
                self.heartbeat(closed=False)  # before flushes return: they see its watermark
            self._complete_markers()
            if self._stop_requested:
                return
            with self.lock:
                failures = self._failures
                work = bool(self._sealed.keys() - self._stuck) or bool(self._declare)
            if failures:
                delay = min(self._cfg.max_backoff_s, _BACKOFF_BASE_S * 2 ** min(failures, 16))
                timeout = random.uniform(delay / 2, delay)
            elif work:
                continue
            else:
                timeout = self._cfg.heartbeat_interval_s
            due = self._last_heartbeat + self._cfg.heartbeat_interval_s - time.monotonic()
            self._wake.wait(max(0.0, min(timeout, due)))
            self._wake.clear()

    def _failed(self, what: str, exc: Exception) -> None:
        with self.lock:
            self._failures += 1
        self.retries += 1
        self._warn.warn(f"upload:{type(exc).__name__}", "factlog: %s failed, will retry: %s",
                        what, exc)

    def _round(self) -> bool:
        """Declare what is pending, then upload sealed segments in order. True if anything
        was uploaded."""
        while self._declare:
            ft = self._declare[0]
            try:
                declared = self._catalog.declare(ft)
            except FactTypeError as exc:
                _log.error("factlog: fact type %r conflicts with the store's (%s); uploading "
                           "its facts with the given schema", ft.name, exc)
            except StoreError as exc:
                self._failed(f"declaring fact type {ft.name!r}", exc)
                return False
            else:
                self._resolver.set_stored(declared.fact_type)
            with self.lock:
                self._declare.pop(0)
        uploaded = False
        while not self._stop_requested:
            with self.lock:
                todo = sorted(n for n in self._sealed if n not in self._stuck)
                seg = self._sealed[todo[0]] if todo else None
            if seg is None:
                break
            try:
                ok = self._upload(seg)
            except StoreError as exc:
                self._failed(f"uploading segment {seg.number}", exc)
                break
            except (OSError, FactlogError, pa.ArrowException) as exc:
                _log.error("factlog: cannot read spool segment %s (%s); keeping it", seg.path,
                           exc)
                ok = False
            with self.lock:
                if ok:
                    del self._sealed[seg.number]
                    self._done_keys.pop(seg.number, None)
                    self.written_rows += seg.rows
                    self._failures = 0
                else:
                    self._stuck.add(seg.number)
            if ok:
                self._spool.remove(seg)
                uploaded = True
            if time.monotonic() - self._last_heartbeat >= self._cfg.heartbeat_interval_s:
                self.heartbeat(closed=False)
        return uploaded

    def _upload(self, seg: SealedSegment) -> bool:
        """Write every part of ``seg``. False if the store holds different facts under one of
        its names (the segment must then be kept)."""
        table = read_segment(seg.path)
        done = self._done_keys.setdefault(seg.number, set())
        for day, part in split_by_date(table):
            k = object_key(seg.fact_type, day, self.writer_id, seg.number)
            if k in done:
                continue
            try:
                self._store.write_parquet(k, part)
            except ObjectExists:
                existing = self._store.read_parquet(k)
                if not _same_facts(existing, part):
                    _log.error("factlog: %s already exists with other facts; keeping spool "
                               "segment %s (nothing is deleted)", k, seg.path)
                    return False
            done.add(k)
        return True

    def _complete_markers(self) -> None:
        with self.lock:
            if self._declare:
                return
            floor = min(self._sealed) if self._sealed else None
            ready = [m for through, m in self._markers if floor is None or floor > through]
            self._markers = [(t, m) for t, m in self._markers if not (floor is None or floor > t)]
        for m in ready:
            m.complete()

    def heartbeat(self, *, closed: bool) -> bool:
        """Publish the heartbeat now; False if the store refused (retried later)."""
        self._last_heartbeat = time.monotonic()
        with self.lock:
            types = tuple(sorted(self.fact_types))
        hb = Heartbeat(
            writer_id=self.writer_id, producer=self._producer, fact_types=types,
            watermark_us=self.watermark_fn(), updated_at_us=self._clock.now_us(),
            started_at_us=self._started_us, closed=closed,
        )
        try:
            publish(self._store, hb)
        except StoreError as exc:
            self.retries += 1
            self._warn.warn("heartbeat", "factlog: heartbeat failed, will retry: %s", exc)
            return False
        return True


def _same_facts(existing: pa.Table, part: pa.Table) -> bool:
    if existing.num_rows != part.num_rows:
        return False
    try:
        if existing.schema != part.schema:
            existing = existing.select(part.column_names).cast(part.schema)
        return bool(existing.equals(part))
    except (pa.ArrowException, KeyError, ValueError):
        return False
