"""The logger's bounded in-memory buffer, its acceptance sequence and its durability waiters.

``log()`` extends the flat deque :attr:`Buffer.items` with ``fact_type, row, tick`` (three items
per fact) with no lock: in CPython ``deque.extend`` of a tuple runs without releasing the GIL, so
a fact's three items are always adjacent. Flat items, rather than one tuple per fact, keep the
backlog out of the cyclic GC: a tuple holding a dict stays GC-tracked, and a backlog of them
makes every full collection scan it. Everything else (tables from ``log_batch`` and
``append_facts``, flush and checkpoint markers) goes to :attr:`Buffer.ctrl` under a lock and takes
a sequence number. The writer drains ``ctrl`` *before* ``items``, so a marker's cycle also holds
every fact that was appended before the marker.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from itertools import repeat, starmap
from typing import Any, Literal

import pyarrow as pa

from ._errors import BufferFull, FlushTimeout, LoggerClosed

_log = logging.getLogger("factlog")
#: ``wake_at`` while a wake-up is already pending: no log() call reaches it.
NEVER = 1 << 62
_WARN_EVERY_S = 10.0


class Marker:
    """A point in the stream of accepted facts: a checkpoint (durable) or a flush (in store)."""

    def __init__(self, *, flush: bool) -> None:
        self.flush = flush
        self.seq = 0
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[], None]] = []

    def complete(self) -> None:
        with self._lock:
            if self._done.is_set():
                return
            self._done.set()
            callbacks, self._callbacks = self._callbacks, []
        for cb in callbacks:
            cb()

    def add_callback(self, cb: Callable[[], None]) -> None:
        with self._lock:
            if not self._done.is_set():
                self._callbacks.append(cb)
                return
        cb()

    def wait(self, timeout_s: float) -> bool:
        return self._done.wait(timeout_s)

    @property
    def done(self) -> bool:
        return self._done.is_set()


@dataclass
class Batch:
    """Facts already in the stored schema, waiting for the writer."""

    fact_type: str
    table: pa.Table
    seq: int
    rows: int
    nbytes: int


def future_setter(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None]) -> Callable[[], None]:
    """A callback, safe to call from any thread, that resolves ``fut`` on ``loop``."""

    def _set() -> None:
        if not fut.done():
            fut.set_result(None)

    def cb() -> None:
        try:
            loop.call_soon_threadsafe(_set)
        except RuntimeError:
            pass  # the loop is closed: nobody is waiting any more

    return cb


class RateLimitedWarnings:
    """At most one warning per key every few seconds, with a count of what was suppressed."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._last: dict[str, tuple[float, int]] = {}

    def warn(self, key: str, msg: str, *args: Any) -> None:
        now = time.monotonic()
        with self._lock:
            last, suppressed = self._last.get(key, (-1e18, 0))
            if now - last < _WARN_EVERY_S:
                self._last[key] = (last, suppressed + 1)
                return
            self._last[key] = (now, 0)
        if suppressed:
            msg += f" ({suppressed} similar warnings suppressed)"
        _log.warning(msg, *args)


class Buffer:
    """The bounded buffer between callers and the writer thread."""

    def __init__(
        self,
        *,
        max_rows: int,
        max_bytes: int,
        batch_rows: int,
        batch_bytes: int,
        full_policy: Literal["drop", "block"],
        block_timeout_s: float,
        tick: Callable[[], int],
        warnings: RateLimitedWarnings,
    ) -> None:
        self.items: deque[Any] = deque()
        self.ctrl: deque[Batch | Marker] = deque()
        self.wake = threading.Event()
        self.batch_rows = batch_rows
        self.batch_bytes = batch_bytes
        self.wake_rows = batch_rows  # the writer is woken early at this many rows
        self.wake_at = 3 * batch_rows  # the same, in items
        self.max_rows = max_rows
        self.max_bytes = max_bytes
        self.item_cap = 3 * max_rows  # log() accepts while len(items) is below this
        self.full_policy = full_policy
        self.block_timeout_s = block_timeout_s
        self.tick = tick
        self.closed = False
        self.est_row_bytes = 512  # refined by the writer from what it converts
        self._warn = warnings
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)
        self._seq = 0
        self._ctrl_rows = 0
        self._ctrl_bytes = 0
        self.batch_accepted = 0
        self.dropped: dict[str, int] = {}
        self._durable_seq = 0
        self._durable = threading.Condition()
        self._async_waiters: list[tuple[int, Callable[[], None]]] = []

    # capacity ------------------------------------------------------------------------------
    def _recompute_cap(self) -> None:
        if self.closed:
            self.item_cap = 0
            return
        by_bytes = (self.max_bytes - self._ctrl_bytes) // max(1, self.est_row_bytes)
        self.item_cap = 3 * max(0, min(self.max_rows - self._ctrl_rows, by_bytes))

    def set_est_row_bytes(self, est: int) -> None:
        with self._lock:
            self.est_row_bytes = max(64, est)
            self.wake_rows = max(1, min(self.batch_rows, self.batch_bytes // self.est_row_bytes))
            self._recompute_cap()

    def buffered(self) -> int:
        return len(self.items) // 3 + self._ctrl_rows

    # drops ---------------------------------------------------------------------------------
    def drop(self, reason: str, n: int = 1, detail: str = "") -> None:
        with self._lock:
            self.dropped[reason] = self.dropped.get(reason, 0) + n
        self._warn.warn(f"drop:{reason}", "factlog: dropped %d fact(s): %s%s", n, reason,
                        f" ({detail})" if detail else "")

    def log_full(self, fact_type: Any, row: Any) -> bool:
        """``log()``'s slow path: the buffer is full (or closed)."""
        if self.closed:
            self.drop("closed")
            return False
        if self.full_policy == "block" and self.block_timeout_s > 0:
            deadline = time.monotonic() + self.block_timeout_s
            with self._room:
                while len(self.items) >= self.item_cap and not self.closed:
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        break
                    self._room.wait(remaining)
                if len(self.items) < self.item_cap and not self.closed:
                    self.items.extend((fact_type, row, self.tick()))
                    self.wake.set()
                    return True
        self.drop("closed" if self.closed else "buffer_full")
        return False

    # tables and markers --------------------------------------------------------------------
    def add_batch(self, fact_type: str, table: pa.Table, timeout_s: float) -> int:
        """Queue ``table`` once there is room; returns its sequence number.

        Raises:
            BufferFull: no room within ``timeout_s``; nothing was queued.
            LoggerClosed: the logger is closed.
        """
        n, nbytes = table.num_rows, int(table.nbytes)
        deadline = time.monotonic() + timeout_s
        with self._room:
            while True:
                if self.closed:
                    raise LoggerClosed("the logger is closed")
                queued = len(self.items) // 3
                pending = queued + self._ctrl_rows
                pending_bytes = queued * self.est_row_bytes + self._ctrl_bytes
                if pending == 0 or (pending + n <= self.max_rows
                                    and pending_bytes + nbytes <= self.max_bytes):
                    break
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise BufferFull(
                        f"no buffer room for {n} facts of {fact_type!r} within {timeout_s:g}s "
                        f"({pending} facts waiting for the writer); the batch was not accepted"
                    )
                self._room.wait(remaining)
            self._seq += 1
            seq = self._seq
            self._ctrl_rows += n
            self._ctrl_bytes += nbytes
            self.batch_accepted += n
            self._recompute_cap()
            self.ctrl.append(Batch(fact_type, table, seq, n, nbytes))
        self.wake.set()
        return seq

    def add_marker(self, marker: Marker) -> int:
        with self._lock:
            self._seq += 1
            marker.seq = self._seq
            self.ctrl.append(marker)
        self.wake.set()
        return marker.seq

    # the writer's side ---------------------------------------------------------------------
    def drain(self) -> tuple[list[Batch | Marker], int]:
        """Take the control entries, and count the rows queued before them (see the module
        doc): the writer then takes exactly that many rows with :meth:`pop_rows`."""
        with self._lock:
            ctrl = list(self.ctrl)
            self.ctrl.clear()
        self.wake_at = 3 * self.wake_rows
        return ctrl, len(self.items) // 3

    def pop_rows(self, n: int) -> list[Any]:
        """The next ``n`` facts, flat: ``[fact_type, row, tick, fact_type, row, tick, ...]``."""
        # starmap calls popleft from C: about a third of the cost of a comprehension.
        return list(starmap(self.items.popleft, repeat((), 3 * n)))

    def release(self, batches: list[Batch]) -> None:
        """The writer has written ``batches``: free their room and wake blocked callers."""
        with self._room:
            for b in batches:
                self._ctrl_rows -= b.rows
                self._ctrl_bytes -= b.nbytes
            self._recompute_cap()
            self._room.notify_all()

    def close(self) -> None:
        with self._room:
            self.closed = True
            self._recompute_cap()
            self._room.notify_all()
        self.wake.set()

    # durability ----------------------------------------------------------------------------
    @property
    def durable_seq(self) -> int:
        return self._durable_seq

    def set_durable(self, seq: int) -> None:
        with self._durable:
            if seq <= self._durable_seq:
                return
            self._durable_seq = seq
            self._durable.notify_all()
            ready = [cb for s, cb in self._async_waiters if s <= seq]
            self._async_waiters = [(s, cb) for s, cb in self._async_waiters if s > seq]
        for cb in ready:
            cb()

    def wait_durable(self, seq: int, timeout_s: float) -> None:
        with self._durable:
            if not self._durable.wait_for(lambda: self._durable_seq >= seq, timeout_s):
                raise FlushTimeout(
                    f"facts up to sequence {seq} were not durable within {timeout_s:g}s"
                )

    async def await_durable(self, seq: int, timeout_s: float) -> None:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        cb = future_setter(loop, fut)
        with self._durable:
            if self._durable_seq >= seq:
                return
            self._async_waiters.append((seq, cb))
        try:
            await asyncio.wait_for(fut, timeout_s)
        except TimeoutError:
            with self._durable:
                self._async_waiters = [(s, c) for s, c in self._async_waiters if c is not cb]
            raise FlushTimeout(
                f"facts up to sequence {seq} were not durable within {timeout_s:g}s"
            ) from None
