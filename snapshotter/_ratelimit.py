"""A QPS limit that holds in every one-second window, bursts included, as the service sees it.

A token bucket that starts full lets ``2 × rate`` requests start within one second (the burst,
then a refill). A service that says "at most 500 per second" means any second, so this limiter
keeps a sliding-window log instead: the send times of recent requests. Every attempt, retries
included, takes a place.

**When a request starts.** What the service counts is when a request reaches it, and a request
granted now may go out much later: opening a new connection under load can take longer than the
window. So a granted request is *pending* until it is actually sent (:meth:`QpsLimiter.started`,
called from aiohttp's "request headers sent" hook, or when the attempt ends if it never was
sent), and only then is its time logged. A new request may be granted only while

    (requests logged within the last window) + (pending requests) < capacity

so no window of sends can ever hold more than ``capacity``, however late each one goes out.

**The window** is slightly longer than one second (``margin_s``): the service sees a request a
little after the client sends it, and that delay varies; counting over 1 s + margin keeps the
count the service sees in any one-second window within the limit while the jitter stays under the
margin.

**Shards.** ``--shard i/n`` gives each shard ``max_qps / n``, rounded down to whole requests. Each
shard alone keeps to its share in every window, so the shards together keep to ``max_qps`` in
every window with no coordination between them.
"""

from __future__ import annotations

import asyncio
import bisect
import math
import time
from collections.abc import Callable

from ._errors import ServiceConfigError

__all__ = ["QpsLimiter", "Ticket"]

#: Extra window length covering send→arrival jitter (see the module docstring).
DEFAULT_MARGIN_S = 0.05


class Ticket:
    """One granted request, pending until :meth:`QpsLimiter.started` logs its send time."""

    __slots__ = ("granted_at", "sent_at")

    def __init__(self, granted_at: float) -> None:
        self.granted_at = granted_at
        self.sent_at: float | None = None


class QpsLimiter:
    """At most ``floor(qps)`` requests sent in any window of ``1 s + margin_s``.

    Args:
        qps: the limit (requests started per second), already multiplied by the shard share.
        margin_s: added to the one-second window (see the module docstring).
        clock: a monotonic clock in seconds (``time.monotonic``).

    Raises:
        ServiceConfigError: ``qps`` below 1: a one-second window cannot hold a fraction of a
            request, so a shard's share must be at least one request per second.
    """

    def __init__(
        self,
        qps: float,
        *,
        margin_s: float = DEFAULT_MARGIN_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not qps >= 1:
            raise ServiceConfigError(
                f"a QPS limit of {qps:g} per process is below 1: max_qps split over the "
                "shards must leave each shard at least one request per second",
                field="max_qps",
            )
        self.capacity = math.floor(qps + 1e-9)
        self.window_s = 1.0 + margin_s
        self._clock = clock
        self._log: list[float] = []  # send times, ascending
        self._pending = 0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()
        self.waited_s = 0.0

    async def acquire(self) -> Ticket:
        """Wait until a request may be sent; the returned ticket is pending until
        :meth:`started`. Waiters are served in arrival order (the lock is FIFO).
        """
        async with self._lock:
            t0 = self._clock()
            while True:
                now = self._clock()
                self._expire(now)
                if len(self._log) + self._pending < self.capacity:
                    self._pending += 1
                    self.waited_s += now - t0
                    return Ticket(now)
                # Full: wait for the oldest logged send to leave the window, or for a pending
                # request to be sent (which may free nothing yet, so the loop checks again).
                wait = self._log[0] + self.window_s - now if self._log else None
                self._changed.clear()
                try:
                    await asyncio.wait_for(self._changed.wait(), wait)
                except TimeoutError:
                    pass

    def started(self, ticket: Ticket, at: float | None = None) -> None:
        """Log ``ticket``'s send time (default: now). Idempotent: the first call counts."""
        if ticket.sent_at is not None:
            return
        t = self._clock() if at is None else at
        ticket.sent_at = t
        self._pending -= 1
        bisect.insort(self._log, t)
        self._changed.set()

    def _expire(self, now: float) -> None:
        cut = bisect.bisect_right(self._log, now - self.window_s)
        if cut:
            del self._log[:cut]

    @property
    def pending(self) -> int:
        """Granted requests not yet sent."""
        return self._pending
