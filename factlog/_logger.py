"""``FactLogger``: durable, fast fact logging for services (SPEC §7).

The path of a fact::

    log(row) ─▶ Buffer (deque, no I/O) ─▶ Writer thread: rows_to_table, append a frame to the
    spool segment, group commit (fdatasync) ─▶ sealed segment ─▶ Uploader thread: Parquet per
    UTC date, create-if-absent in the store ─▶ segment deleted; heartbeat with the watermark.

*Accepted* means ``log()`` returned True (or ``log_batch`` returned a sequence number). *Durable*
means the spool group commit holding the fact was fsynced: it survives a crash of the process,
and the next logger on the same spool uploads it. *Written* means it is in the store.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import os
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Literal

import pyarrow as pa
from prometheus_client import CollectorRegistry

from ttstore import Clock, InvalidInput, Store, StoreError, SystemClock, check_name

from ._buffer import Buffer, Marker, RateLimitedWarnings, future_setter
from ._errors import FactTypeError, FlushTimeout, LoggerClosed, UnknownFactType
from ._facttypes import FactType, FactTypeCatalog
from ._metrics import LoggerCollector, LoggerStats
from ._resolver import TypeResolver
from ._spool import Spool
from ._uploader import Uploader, UploaderConfig
from ._validate import table_to_facts
from ._writer import Writer, WriterConfig

_log = logging.getLogger("factlog")
_MiB = 1024 * 1024


@dataclass(frozen=True)
class LoggerConfig:
    """A logger's tuning, validated when built. See :class:`FactLogger` for each field."""

    full_policy: Literal["drop", "block"] = "drop"
    block_timeout_s: float = 0.05
    log_batch_timeout_s: float = 5.0
    max_buffer_rows: int = 500_000
    max_buffer_bytes: int = 256 * _MiB
    batch_rows: int = 8192
    batch_bytes: int = 4 * _MiB
    group_commit_interval_s: float = 0.1
    segment_max_bytes: int = 64 * _MiB
    segment_max_age_s: float = 10.0
    heartbeat_interval_s: float = 10.0
    max_backoff_s: float = 5.0

    def __post_init__(self) -> None:
        if self.full_policy not in ("drop", "block"):
            raise InvalidInput(f"full_policy must be 'drop' or 'block', not {self.full_policy!r}",
                               field="full_policy")
        for name in ("block_timeout_s", "log_batch_timeout_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or v < 0:
                raise InvalidInput(f"{name} must be a number >= 0, not {v!r}", field=name)
        for name in ("group_commit_interval_s", "segment_max_age_s", "heartbeat_interval_s",
                     "max_backoff_s"):
            v = getattr(self, name)
            if not isinstance(v, int | float) or isinstance(v, bool) or v <= 0:
                raise InvalidInput(f"{name} must be a number > 0, not {v!r}", field=name)
        for name in ("max_buffer_rows", "max_buffer_bytes", "batch_rows", "batch_bytes",
                     "segment_max_bytes"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise InvalidInput(f"{name} must be an integer >= 1, not {v!r}", field=name)


class FactLogger:
    """Log facts from a service: never slows it down, never loses what it acknowledged, never
    writes a fact twice.

    Args:
        store: the store, or its URL.
        producer: who logs (recorded in every fact's ``producer`` column and the heartbeat).
        spool_dir: the local write-ahead spool. One logger per directory (locked); the next
            logger started on it uploads whatever a crash left behind.
        fact_types: declarations to declare (or check) in the store's catalog now. If the store
            is down they are used locally and declared in the background. Other fact types are
            looked up in the catalog.
        clock: where ``logged_at`` comes from (the system clock by default).
        full_policy: what ``log()`` does when the buffer is full: ``"drop"`` at once, or
            ``"block"`` up to ``block_timeout_s`` and then drop. Drops are counted by reason.
        block_timeout_s: ``log()``'s bound when blocking.
        log_batch_timeout_s: default bound for ``log_batch``/``append_facts`` to wait for room.
        max_buffer_rows: facts in memory at most (rows and tables not yet spooled).
        max_buffer_bytes: approximate memory bound of the buffer.
        batch_rows: wake the writer early when this many rows are waiting...
        batch_bytes: ...or about this many bytes (estimated from the facts converted so far);
            otherwise it wakes every ``group_commit_interval_s``.
        group_commit_interval_s: a fact is fsynced at most about this long after acceptance
            (at once on flush, checkpoint, ``log_batch`` and ``append_facts``).
        segment_max_bytes: rotate (seal) a spool segment at this size...
        segment_max_age_s: ...or at this age; sealed segments are uploaded.
        heartbeat_interval_s: how often the heartbeat (with the upload watermark) is published.
        max_backoff_s: the cap of the exponential upload retry backoff.

    Raises:
        SpoolLocked: another logger holds ``spool_dir``.
        FactTypeError: a given declaration conflicts with the stored schema.
        InvalidInput: a bad setting, naming it.
    """

    def __init__(
        self,
        *,
        store: Store | str,
        producer: str,
        spool_dir: str | os.PathLike[str],
        fact_types: Sequence[FactType] = (),
        clock: Clock | None = None,
        full_policy: Literal["drop", "block"] = "drop",
        block_timeout_s: float = 0.05,
        log_batch_timeout_s: float = 5.0,
        max_buffer_rows: int = 500_000,
        max_buffer_bytes: int = 256 * _MiB,
        batch_rows: int = 8192,
        batch_bytes: int = 4 * _MiB,
        group_commit_interval_s: float = 0.1,
        segment_max_bytes: int = 64 * _MiB,
        segment_max_age_s: float = 10.0,
        heartbeat_interval_s: float = 10.0,
        max_backoff_s: float = 5.0,
    ) -> None:
        self.config = cfg = LoggerConfig(
            full_policy=full_policy, block_timeout_s=block_timeout_s,
            log_batch_timeout_s=log_batch_timeout_s, max_buffer_rows=max_buffer_rows,
            max_buffer_bytes=max_buffer_bytes, batch_rows=batch_rows, batch_bytes=batch_bytes,
            group_commit_interval_s=group_commit_interval_s, segment_max_bytes=segment_max_bytes,
            segment_max_age_s=segment_max_age_s, heartbeat_interval_s=heartbeat_interval_s,
            max_backoff_s=max_backoff_s,
        )
        if not isinstance(producer, str) or not producer or len(producer) > 256:
            raise InvalidInput("producer must be a non-empty string of at most 256 characters",
                               field="producer")
        fact_types = list(fact_types)
        for ft in fact_types:
            if not isinstance(ft, FactType):
                raise InvalidInput(f"fact_types must hold FactType objects, not {ft!r}",
                                   field="fact_types")
        self.producer = producer
        self.store = store if isinstance(store, Store) else Store(store)
        self._clock: Clock = clock if clock is not None else SystemClock()
        if type(self._clock) is SystemClock:
            self._tick: Any = time.time_ns  # µs are taken in the writer, vectorized
            tick_div = 1000
        else:
            self._tick = self._clock.now_us
            tick_div = 1
        self._warn = RateLimitedWarnings()
        self._catalog = FactTypeCatalog(self.store, clock=self._clock)
        self._resolver = TypeResolver(self._catalog, fact_types)
        self._spool = Spool(spool_dir)
        self._closed = False
        self._close_lock = threading.Lock()
        try:
            pending = self._declare(fact_types)
            recovered = self._spool.recover()
        except BaseException:
            self._spool.release()
            raise
        self._b = Buffer(
            max_rows=cfg.max_buffer_rows, max_bytes=cfg.max_buffer_bytes,
            batch_rows=cfg.batch_rows, batch_bytes=cfg.batch_bytes, full_policy=cfg.full_policy,
            block_timeout_s=cfg.block_timeout_s, tick=self._tick, warnings=self._warn,
        )
        self._items = self._b.items
        self._uploader = Uploader(
            store=self.store, spool=self._spool, producer=producer, clock=self._clock,
            config=UploaderConfig(heartbeat_interval_s=cfg.heartbeat_interval_s,
                                  max_backoff_s=cfg.max_backoff_s),
            catalog=self._catalog, resolver=self._resolver, pending_declarations=pending,
            warnings=self._warn,
        )
        for ft in fact_types:
            self._uploader.note_fact_type(ft.name)
        for seg in recovered:
            self._uploader.add_sealed(seg)
        self._writer = Writer(
            buffer=self._b, spool=self._spool, resolver=self._resolver, uploader=self._uploader,
            clock=self._clock, tick_div=tick_div, producer=producer,
            config=WriterConfig(group_commit_interval_s=cfg.group_commit_interval_s,
                                segment_max_bytes=cfg.segment_max_bytes,
                                segment_max_age_s=cfg.segment_max_age_s,
                                max_backoff_s=cfg.max_backoff_s),
            warnings=self._warn, on_fact_type=self._uploader.note_fact_type,
        )
        self._uploader.watermark_fn = self.upload_watermark_us
        self._writer.start()
        self._uploader.start()
        atexit.register(self._atexit)
        if recovered:
            _log.info("factlog: recovered %d spool segment(s) in %s for upload",
                      len(recovered), self._spool.path)

    def _declare(self, fact_types: list[FactType]) -> list[FactType]:
        """Declare now what the store accepts; return what must wait for the store."""
        pending: list[FactType] = []
        for i, ft in enumerate(fact_types):
            try:
                declared = self._catalog.declare(ft)
            except StoreError as exc:
                _log.warning("factlog: store unavailable (%s); declaring %d fact type(s) in the "
                             "background", exc, len(fact_types) - i)
                return fact_types[i:]
            self._resolver.set_stored(declared.fact_type)
        return pending

    @property
    def writer_id(self) -> str:
        """This spool's writer id: the prefix of every object this logger writes."""
        return self._spool.writer_id

    @property
    def spool_dir(self) -> str:
        return str(self._spool.path)

    # the hot path ----------------------------------------------------------------------------
    def log(self, fact_type: str, row: dict[str, Any]) -> bool:
        """Accept one fact. Never raises, never does I/O, never blocks longer than its bound.

        Args:
            fact_type: a declared fact type name.
            row: the entity key, fields by name, optionally ``event_time`` (aware ``datetime``
                or RFC 3339 string; default: the acceptance time), ``fact_id`` and ``logged_at``.

        Returns:
            True if accepted. False if dropped (buffer full, or the logger is closed). A row
            that later fails validation, or names an unknown fact type, is accepted here and
            counted as dropped (``invalid:<code>``, ``unknown_fact_type``) by the writer.
        """
        items = self._items
        b = self._b
        if len(items) >= b.item_cap:
            return b.log_full(fact_type, row)
        items.extend((fact_type, row, self._tick()))  # atomic: see _buffer's module doc
        if len(items) >= b.wake_at:
            b.wake_at = 1 << 62
            b.wake.set()
        return True

    def log_batch(self, fact_type: str, table: pa.Table | pa.RecordBatch, *,
                  timeout_s: float | None = None) -> int:
        """Accept a table of facts (the fast path for bulk producers). Never drops.

        Args:
            fact_type: a declared fact type name.
            table: the entity key, ``event_time`` (``timestamp[us, tz=UTC]``), any declared
                fields, optionally ``fact_id`` and ``logged_at``.
            timeout_s: how long to wait for buffer room (default ``log_batch_timeout_s``).

        Returns:
            The acceptance sequence number, for :meth:`wait_durable`. Rows rejected by
            validation are counted as dropped (``invalid:<code>``) and not accepted.

        Raises:
            BufferFull: no room within the bound; nothing was accepted.
            LoggerClosed: the logger is closed.
            UnknownFactType: the fact type is not declared.
            FactValidationError: the table as a whole is malformed (a column of the wrong type,
                an unknown column, no ``event_time``).
            StoreUnavailable: the fact type is not known locally and the catalog is unreachable.
        """
        if self._b.closed:
            raise LoggerClosed("the logger is closed")
        if isinstance(table, pa.RecordBatch):
            table = pa.Table.from_batches([table])
        if not isinstance(table, pa.Table):
            raise InvalidInput("log_batch needs a pyarrow.Table", field="table")
        ft = self._resolver.resolve(fact_type)
        if ft is None:
            raise UnknownFactType(f"fact type {fact_type!r} is not declared")
        now = self._clock.now_us()
        facts, rejections = table_to_facts(ft, table, logged_at_us=now, now_us=now,
                                           producer=self.producer)
        if rejections:
            by_code: dict[str, int] = {}
            for r in rejections:
                by_code[r.code] = by_code.get(r.code, 0) + 1
            for code, n in by_code.items():
                first = next(r for r in rejections if r.code == code)
                self._b.drop(f"invalid:{code}", n, first.message)
        return self.append_facts(ft.name, facts, timeout_s=timeout_s)

    def append_facts(self, fact_type: str, facts: pa.Table, *,
                     timeout_s: float | None = None) -> int:
        """Accept facts already validated into the stored schema (``fact_id``, ``logged_at``,
        ``ingested_at`` and ``producer`` set by the caller), as the ingest server does.

        Returns:
            The acceptance sequence number, for :meth:`wait_durable`/:meth:`await_durable`.

        Raises:
            BufferFull: no room within the bound; nothing was accepted.
            LoggerClosed: the logger is closed.
            FactTypeError: ``fact_type`` is not a valid name.
        """
        try:
            check_name(fact_type, what="fact type")
        except InvalidInput as exc:
            raise FactTypeError(exc.message, fact_type=str(fact_type),
                                code="invalid_name") from None
        if facts.num_rows == 0:
            return self.checkpoint()
        timeout = self.config.log_batch_timeout_s if timeout_s is None else timeout_s
        return self._b.add_batch(fact_type, facts, timeout)

    # durability and flushing ------------------------------------------------------------------
    def checkpoint(self) -> int:
        """A sequence number covering every fact accepted before the call; pass it to
        :meth:`wait_durable` to wait until all of them are durable (fsynced in the spool)."""
        return self._b.add_marker(Marker(flush=False))

    def wait_durable(self, seq: int, timeout_s: float) -> None:
        """Return once the group commit holding ``seq`` is fsynced.

        Raises:
            FlushTimeout: not durable within ``timeout_s``.
        """
        self._b.wait_durable(seq, timeout_s)

    async def await_durable(self, seq: int, timeout_s: float) -> None:
        """:meth:`wait_durable` for asyncio; never blocks the event loop."""
        await self._b.await_durable(seq, timeout_s)

    def _flush_marker(self) -> Marker:
        if self._closed:
            raise LoggerClosed("the logger is closed")
        marker = Marker(flush=True)
        self._b.add_marker(marker)
        return marker

    def flush(self, timeout_s: float = 30.0) -> None:
        """Return once every fact accepted before the call is in the store, visible to readers.

        Raises:
            FlushTimeout: not done within ``timeout_s``; the facts stay in the spool and keep
                being uploaded.
            LoggerClosed: the logger is closed.
        """
        marker = self._flush_marker()
        if not marker.wait(timeout_s):
            raise self._flush_timeout(timeout_s)

    async def aflush(self, timeout_s: float = 30.0) -> None:
        """:meth:`flush` for asyncio; never blocks the event loop."""
        marker = self._flush_marker()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        marker.add_callback(future_setter(loop, fut))
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            raise self._flush_timeout(timeout_s) from None

    def _flush_timeout(self, timeout_s: float) -> FlushTimeout:
        s = self.stats()
        return FlushTimeout(
            f"flush did not finish within {timeout_s:g}s ({s.buffered} facts buffered, "
            f"{s.spool_segments} spool segments waiting, {s.retries} store retries so far); "
            f"the facts stay in the spool {self._spool.path}"
        )

    # closing --------------------------------------------------------------------------------
    def close(self, timeout_s: float = 30.0) -> None:
        """Stop accepting facts, flush, and stop the threads. Idempotent.

        Raises:
            FlushTimeout: the flush did not finish in time; what is left stays in the spool for
                the next logger on the same directory.
        """
        deadline = time.monotonic() + timeout_s
        with self._close_lock:
            if self._closed:
                return
            marker = self._begin_close()
            done = marker.wait(timeout_s)
            self._finish_close(deadline)
        if not done:
            raise self._flush_timeout(timeout_s)

    async def aclose(self, timeout_s: float = 30.0) -> None:
        """:meth:`close` for asyncio; never blocks the event loop."""
        deadline = time.monotonic() + timeout_s
        with self._close_lock:
            if self._closed:
                return
            marker = self._begin_close()
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        marker.add_callback(future_setter(loop, fut))
        done = True
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            done = False
        await asyncio.to_thread(self._finish_close, deadline)
        if not done:
            raise self._flush_timeout(timeout_s)

    def _begin_close(self) -> Marker:
        marker = Marker(flush=True)
        self._b.add_marker(marker)  # everything accepted before close() is flushed...
        self._b.close()  # ...and nothing after it is accepted
        self._closed = True
        return marker

    def _finish_close(self, deadline: float) -> None:
        self._writer.stop()
        # The writer's final group commit is worth a little more than the caller's bound.
        self._writer.join(max(0.0, deadline - time.monotonic()) + 1.0)
        self._uploader.stop()
        self._uploader.join(max(0.0, deadline - time.monotonic()) + 0.1)
        left = self._b.buffered() + self._writer.unspooled_rows()
        if left:
            _log.error("factlog: %d accepted facts could not be spooled before close (see the "
                       "warnings above) and are lost", left)
        if not self._uploader.is_alive():
            clean = not self._uploader.pending() and not self._writer.open_segment_stats()[1]
            self._uploader.heartbeat(closed=clean)
        self._spool.release()
        atexit.unregister(self._atexit)

    def _atexit(self) -> None:
        with contextlib.suppress(Exception):
            self.close(timeout_s=10.0)

    def __enter__(self) -> FactLogger:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    async def __aenter__(self) -> FactLogger:
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.aclose()

    # observability ----------------------------------------------------------------------------
    def upload_watermark_us(self) -> int:
        """Every fact accepted with ``logged_at`` before this time is in the store."""
        with self._writer.lock:
            parts = self._writer.watermark_parts()
            sealed = self._uploader.sealed_min_logged_at()
        if sealed is not None:
            parts.append(sealed)
        return min(parts)

    def stats(self) -> LoggerStats:
        """The counters now (see :class:`LoggerStats`)."""
        b, w, u = self._b, self._writer, self._uploader
        sealed_bytes, sealed_n, stuck = u.sealed_stats()
        open_bytes, open_n = w.open_segment_stats()
        wm = self.upload_watermark_us()
        with b._lock:
            dropped = dict(b.dropped)
            batch_accepted = b.batch_accepted
        return LoggerStats(
            producer=self.producer, writer_id=self.writer_id,
            accepted=w.accepted_rows + len(self._items) // 3 + batch_accepted,
            durable=w.durable_rows, written=u.written_rows, dropped=dropped,
            retries=w.retries + u.retries, buffered=b.buffered(),
            spool_bytes=sealed_bytes + open_bytes, spool_segments=sealed_n + open_n,
            upload_watermark_us=wm,
            last_flush_age_s=max(0.0, (self._clock.now_us() - wm) / 1e6),
            stuck_segments=stuck,
        )

    def metrics_collector(self, registry: CollectorRegistry | None = None) -> LoggerCollector:
        """A Prometheus collector for this logger's counters, registered into ``registry`` if
        one is given (the ingest server's ``/metrics``)."""
        collector = LoggerCollector(self.stats)
        if registry is not None:
            registry.register(collector)
        return collector
