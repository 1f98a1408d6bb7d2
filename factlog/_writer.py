"""The writer thread: buffer → validated Arrow → spool segments, with group commit.

One cycle drains the buffer, converts rows per fact type with :func:`rows_to_table` (ids and
timestamps vectorized here, never on the caller's thread), appends one frame per table to the
fact type's open segment, and, when a group commit is due, ``fdatasync``s the touched segments
and advances the durable counters. Segments rotate by size and age, and on flush; a sealed
segment goes to the uploader.

Facts whose fact type cannot be resolved because the store is down are *held* in memory and
retried; until they are spooled, no later checkpoint or flush is reported done.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from ttstore import Clock, StoreError

from ._buffer import Batch, Buffer, Marker, RateLimitedWarnings
from ._facttypes import FactType
from ._resolver import TypeResolver
from ._spool import OpenSegment, SealedSegment, Spool
from ._uploader import Uploader
from ._validate import rows_to_table

_log = logging.getLogger("factlog")
_CHUNK_ROWS = 16_384


@dataclass(frozen=True)
class WriterConfig:
    group_commit_interval_s: float
    segment_max_bytes: int
    segment_max_age_s: float
    max_backoff_s: float


_Hold = tuple[str, Sequence[Any], Sequence[int]]  # (fact type, rows, ticks)


@dataclass
class _Held:
    rows: list[Any]
    ticks: list[int]


class Writer(threading.Thread):
    """Drains a :class:`Buffer` into a :class:`Spool`."""

    def __init__(
        self,
        *,
        buffer: Buffer,
        spool: Spool,
        resolver: TypeResolver,
        uploader: Uploader,
        clock: Clock,
        tick_div: int,
        producer: str,
        config: WriterConfig,
        warnings: RateLimitedWarnings,
        on_fact_type: Callable[[str], None],
    ) -> None:
        super().__init__(name=f"factlog-writer-{spool.writer_id[:8]}", daemon=True)
        self._b = buffer
        self._spool = spool
        self._resolver = resolver
        self._uploader = uploader
        self._clock = clock
        self._tick_div = tick_div
        self._producer = producer
        self._cfg = config
        self._warn = warnings
        self._on_fact_type = on_fact_type
        self.lock = threading.Lock()  # guards what the watermark reads; taken before uploader's
        self._open: dict[str, OpenSegment] = {}
        self._held: dict[str, _Held] = {}
        self._held_retry_at = 0.0
        self._held_failures = 0
        self._unwritten: list[tuple[str, pa.Table, Batch | None]] = []
        self._write_retry_at = 0.0
        self._write_failures = 0
        self._deferred: list[Batch | Marker] = []  # drained; durable once spooled and synced
        self._markers: list[Marker] = []  # durable; flushes wait for sealing, then upload
        self._pending_release: list[Batch] = []
        self._unsynced_since: float | None = None
        self._stop_requested = False
        self.accepted_rows = 0  # rows taken from log() (each counted once, by this thread)
        self.durable_rows = 0
        self.retries = 0
        self.last_cycle_start_us = clock.now_us()

    # watermark -----------------------------------------------------------------------------
    def watermark_parts(self) -> list[int]:
        """Lower bounds on ``logged_at`` of everything this thread has not handed to the
        uploader. Call with :attr:`lock` held."""
        parts = [self.last_cycle_start_us]
        parts.extend(s.min_logged_at_us for s in self._open.values()
                     if s.min_logged_at_us is not None)
        div = self._tick_div
        parts.extend(min(h.ticks) // div for h in self._held.values() if h.ticks)
        for _ft, t, _b in self._unwritten:
            if t.num_rows:
                parts.append(int(np.min(t.column("logged_at").cast(pa.int64()).to_numpy())))
        return parts

    def unspooled_rows(self) -> int:
        """Rows this thread holds in memory: types not yet resolved, or spool writes failing."""
        with self.lock:
            return (sum(len(h.rows) for h in self._held.values())
                    + sum(int(t.num_rows) for _n, t, _b in self._unwritten))

    def open_segment_stats(self) -> tuple[int, int]:
        """(bytes, count) of open segments."""
        segs = list(self._open.values())
        return sum(s.size_bytes for s in segs), len(segs)

    # thread --------------------------------------------------------------------------------
    def stop(self) -> None:
        self._stop_requested = True
        self._b.wake.set()

    def run(self) -> None:
        interval = self._cfg.group_commit_interval_s
        while True:
            woken = self._b.wake.wait(interval)
            self._b.wake.clear()
            stopping = self._stop_requested
            try:
                self.cycle(final=stopping, timer=not woken)
            except Exception:  # a bug must not kill the thread that holds accepted facts
                _log.exception("factlog: writer cycle failed; retrying")
                time.sleep(min(1.0, interval))
                continue
            if stopping:
                return

    # one cycle -----------------------------------------------------------------------------
    def cycle(self, *, final: bool = False, timer: bool = False) -> None:
        """Drain, convert, spool; group-commit when something waits for durability, on the
        timer (so a fact is fsynced about one interval after acceptance), or when the oldest
        unsynced write is an interval old (under sustained load the timer never fires)."""
        start_us = self._clock.now_us()
        ctrl, n = self._b.drain()
        # Take ownership of the control entries first, so no failure below can lose them.
        self._deferred.extend(ctrl)
        with self.lock:
            for c in ctrl:
                if isinstance(c, Batch):
                    self._unwritten.append((c.fact_type, c.table, c))
        while n > 0:
            # Chunks keep the working set small; the lock is not held across them, which is
            # safe for the watermark because last_cycle_start_us moves only at the end.
            # Conversion (and any catalog lookup) runs without the lock, so stats() and the
            # heartbeat never wait for it.
            k = min(n, _CHUNK_ROWS)
            items = self._b.pop_rows(k)
            n -= k
            tables, holds = self._convert(items, start_us)
            with self.lock:
                self.accepted_rows += k
                for name, rows, ticks in holds:
                    held = self._held.setdefault(name, _Held([], []))
                    held.rows.extend(rows)
                    held.ticks.extend(ticks)
                for ft_name, table in tables:
                    self._unwritten.append((ft_name, table, None))
                self._write_unwritten(force=final)
        self._retry_held(start_us, force=final)
        with self.lock:
            self._write_unwritten(force=final)
            self.last_cycle_start_us = start_us
        # Checkpoints and flushes wait behind facts still held in memory.
        ready = bool(self._deferred) and not (self._held or self._unwritten)
        now = time.monotonic()
        due = (self._unsynced_since is not None
               and now - self._unsynced_since >= self._cfg.group_commit_interval_s)
        if ready or due or final or timer:
            self._sync()
        self._b.release(self._pending_release)
        self._pending_release = []
        if ready:
            releasable, self._deferred = self._deferred, []
            self._b.set_durable(max(c.seq for c in releasable))
            self._markers.extend(c for c in releasable if isinstance(c, Marker))
        self._rotate(seal_all=final or any(m.flush for m in self._markers), now=now)
        markers, self._markers = self._markers, []
        for m in markers:
            if m.flush:
                self._uploader.add_marker(m, through=self._spool.last_number())
            else:
                m.complete()

    def _convert(self, items: list[Any], now_us: int) -> tuple[list[tuple[str, pa.Table]],
                                                               list[_Hold]]:
        """Tables per fact type, and the rows to hold (their type cannot be looked up now)."""
        names, rows, ticks = items[0::3], items[1::3], items[2::3]
        try:
            distinct = set(names)
        except TypeError:  # an unhashable "fact type": group the slow way
            distinct = None
        groups: dict[Any, tuple[Sequence[Any], Sequence[int]]]
        if distinct is not None and len(distinct) == 1:
            groups = {names[0]: (rows, ticks)}
        else:
            lists: dict[Any, tuple[list[Any], list[int]]] = {}
            for name, row, tick in zip(names, rows, ticks, strict=True):
                k = name if type(name) is str else None
                g = lists.get(k)
                if g is None:
                    g = lists[k] = ([], [])
                g[0].append(row)
                g[1].append(tick)
            groups = dict(lists)
        out: list[tuple[str, pa.Table]] = []
        holds: list[_Hold] = []
        for name, (grows, gticks) in groups.items():
            if name in self._held:  # keep order behind rows already waiting for their type
                holds.append((name, grows, gticks))
                continue
            try:
                ft = self._resolver.resolve(name)
            except StoreError as exc:
                holds.append((name, grows, gticks))
                self._note_held(name, len(grows), exc)
                continue
            if ft is None:
                self._b.drop("unknown_fact_type", len(grows), f"fact type {name!r}")
                continue
            table = self._to_table(ft, grows, gticks, now_us)
            if table is not None and table.num_rows:
                out.append((ft.name, table))
        return out, holds

    def _to_table(self, ft: FactType, rows: Sequence[Any], ticks: Sequence[int], now_us: int
                  ) -> pa.Table | None:
        logged = np.array(ticks, dtype=np.int64)
        if self._tick_div != 1:
            logged //= self._tick_div
        try:
            table, rejections = rows_to_table(
                ft, rows, logged_at_us=logged, now_us=now_us, producer=self._producer
            )
            if any(r.code == "unknown_field" for r in rejections):
                newer = self._resolver.refresh(ft.name)
                if newer is not None:  # another producer added the field: use the new version
                    table, rejections = rows_to_table(
                        newer, rows, logged_at_us=logged, now_us=now_us, producer=self._producer
                    )
        except Exception:  # a validation bug: count the rows, keep the writer alive
            _log.exception("factlog: could not convert %d rows of %r", len(rows), ft.name)
            self._b.drop("invalid:internal", len(rows))
            return None
        if rejections:
            by_code: dict[str, int] = {}
            for r in rejections:
                by_code[r.code] = by_code.get(r.code, 0) + 1
            for code, n in by_code.items():
                first = next(r for r in rejections if r.code == code)
                self._b.drop(f"invalid:{code}", n, first.message)
        if table.num_rows and len(rows) >= 64:
            self._b.set_est_row_bytes(int(table.nbytes / table.num_rows) + 400)
        return table

    def _note_held(self, name: str, n: int, exc: Exception) -> None:
        self.retries += 1
        self._held_retry_at = max(self._held_retry_at, time.monotonic() + 0.05)
        self._warn.warn("held", "factlog: cannot look up fact type %r (%s); holding %d facts "
                        "in memory and retrying", name, exc, n)

    def _retry_held(self, now_us: int, *, force: bool) -> None:
        """Look up the types of held rows again. Only this thread changes ``_held``, so it is
        read without the lock; rows leave it and enter ``_unwritten`` in one locked step."""
        if not self._held or (time.monotonic() < self._held_retry_at and not force):
            return
        for name in list(self._held):
            try:
                ft = self._resolver.resolve(name)
            except StoreError:
                self.retries += 1
                self._held_failures += 1
                delay = min(self._cfg.max_backoff_s, 0.05 * 2 ** min(self._held_failures, 10))
                self._held_retry_at = time.monotonic() + delay
                return
            held = self._held[name]
            if ft is None:
                self._b.drop("unknown_fact_type", len(held.rows), f"fact type {name!r}")
                table = None
            else:
                table = self._to_table(ft, held.rows, held.ticks, now_us)
            with self.lock:
                del self._held[name]
                if table is not None and table.num_rows:
                    self._unwritten.append((name, table, None))
        self._held_failures = 0

    def _write_unwritten(self, *, force: bool) -> None:
        if not self._unwritten or (time.monotonic() < self._write_retry_at and not force):
            return
        while self._unwritten:
            name, table, batch = self._unwritten[0]
            seg = self._open.get(name)
            try:
                if seg is None or seg.broken:
                    if seg is not None:
                        self._seal(seg)
                    seg = self._open[name] = self._spool.new_segment(name)
                    self._on_fact_type(name)
                seg.append(table)
            except pa.ArrowException:  # cannot happen for validated tables; never block on it
                _log.exception("factlog: cannot encode %d facts of %r for the spool",
                               table.num_rows, name)
                self._b.drop("invalid:unencodable", table.num_rows)
                self._unwritten.pop(0)
                if batch is not None:
                    self._pending_release.append(batch)
                continue
            except OSError as exc:
                self.retries += 1
                self._write_failures += 1
                delay = min(self._cfg.max_backoff_s, 0.05 * 2 ** min(self._write_failures, 10))
                self._write_retry_at = time.monotonic() + delay
                self._warn.warn("spool_write", "factlog: spool write failed (%s); %d tables "
                                "kept in memory, retrying", exc, len(self._unwritten))
                return
            self._unwritten.pop(0)
            if batch is not None:
                self._pending_release.append(batch)
            if self._unsynced_since is None:
                self._unsynced_since = time.monotonic()
        self._write_failures = 0

    def _sync(self) -> None:
        synced = 0
        for seg in list(self._open.values()):
            if seg.unsynced_rows:
                n = seg.unsynced_rows
                seg.sync()
                synced += n
        self.durable_rows += synced
        self._unsynced_since = None

    def _seal(self, seg: OpenSegment) -> None:
        n = seg.unsynced_rows
        sealed: SealedSegment | None = self._spool.seal(seg)
        self.durable_rows += n
        self._open.pop(seg.fact_type, None)
        if sealed is not None:
            self._uploader.add_sealed(sealed)

    def _rotate(self, *, seal_all: bool, now: float) -> None:
        cfg = self._cfg
        with self.lock:
            for seg in list(self._open.values()):
                if (seal_all or seg.broken or seg.size_bytes >= cfg.segment_max_bytes
                        or now - seg.created_monotonic >= cfg.segment_max_age_s):
                    self._seal(seg)
