"""A QPS limit that holds in every one-second window, bursts included.

A token bucket that starts full lets ``2 × rate`` requests start within one second (the burst,
then a refill). A service that says "at most 500 per second" means any second, so this limiter
keeps a sliding-window log instead: the start times of the last ``capacity`` requests. A request
may start only when fewer than ``capacity`` started within the last ``window_s``; otherwise it
waits until the oldest leaves the window. Every attempt, retries included, takes a start.

Shards: ``--shard i/n`` gives each shard ``max_qps / n``, rounded down to whole requests per
window. Each shard alone keeps to its share in every window, so the shards together keep to
``max_qps`` in every window with no coordination between them.

The window is slightly longer than one second (``margin_s``): the service sees a request a
little after the client starts it, and the delay varies; counting over 1 s + margin on the
client keeps the count the service sees in any one-second window within the limit as long as
that jitter stays under the margin.
"""

from __future__ import annotations

import asyncio
import collections
import math
import time
from collections.abc import Callable

from ._errors import ServiceConfigError

__all__ = ["QpsLimiter"]

#: Extra window length covering client→server delay jitter (see the module docstring).
DEFAULT_MARGIN_S = 0.05


class QpsLimiter:
    """At most ``floor(qps)`` starts in any window of ``1 s + margin_s``.

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
        self._starts: collections.deque[float] = collections.deque()
        self._lock = asyncio.Lock()
        self.waited_s = 0.0

    async def acquire(self) -> float:
        """Wait until a request may start, and record its start.

        Waiters are served in arrival order (the lock is FIFO), so none starves.

        Returns:
            The recorded start time (the clock's value).
        """
        async with self._lock:
            while True:
                now = self._clock()
                starts = self._starts
                horizon = now - self.window_s
                while starts and starts[0] <= horizon:
                    starts.popleft()
                if len(starts) < self.capacity:
                    starts.append(now)
                    return now
                wait = starts[0] - horizon
                self.waited_s += wait
                await asyncio.sleep(wait)

    def starts_in_window(self) -> int:
        """How many starts the last ``window_s`` holds (for tests and stats)."""
        horizon = self._clock() - self.window_s
        return sum(1 for s in self._starts if s > horizon)
