"""A lean open-loop HTTP/1.1 load generator for the API benchmark (its own process).

On a 2-core machine the load generator competes with the server for CPU, so it must cost little
per request, as wrk does: every request is pre-encoded bytes, sent on a pooled keep-alive
connection (one request in flight per connection, no pipelining) through a bare
``asyncio.Protocol``; a response is parsed only as far as its status and ``Content-Length``.
Requests start on a fixed schedule (open loop), so a slow answer never slows the offered rate,
and a latency is measured from the request's *scheduled* start to the end of its answer
(queueing behind a slow request counts: no coordinated omission).

The schedule must be kept to the microsecond, or the load generator's own lateness counts as
the server's latency. asyncio's default selector on Linux (epoll) waits in whole milliseconds,
rounded up: a request due in 0.3 ms is sent 1 ms later, so every open-loop latency would carry
about 0.6 ms (median) of the generator's timer error. :func:`run` therefore uses ``select()``,
whose timeout has microsecond resolution (fine for the few connections here), and
:func:`run_load` reports how late each request was actually sent (``late_ns``).
"""

from __future__ import annotations

import asyncio
import selectors
import time
from collections import deque
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import numpy as np

_HEADER_END = b"\r\n\r\n"
T = TypeVar("T")


def run(main: Coroutine[Any, Any, T]) -> T:
    """``asyncio.run`` on an event loop whose timers keep microseconds (see the module doc)."""
    with asyncio.Runner(loop_factory=lambda: asyncio.SelectorEventLoop(
            selectors.SelectSelector())) as runner:
        return runner.run(main)


class _Conn(asyncio.Protocol):
    """One keep-alive connection; answers one request at a time."""

    def __init__(self, done: Callable[[_Conn, int, int, bytes], None],
                 lost: Callable[[_Conn, int, int], None]) -> None:
        self.done, self.lost = done, lost
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.want: int | None = None  # total bytes of the answer, once headers are in
        self.body_at = 0
        self.status = 0
        self.current: tuple[int, int] | None = None  # (request index, scheduled ns)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def send(self, i: int, scheduled_ns: int, request: bytes) -> None:
        assert self.transport is not None
        self.current = (i, scheduled_ns)
        self.buf.clear()
        self.want = None
        self.transport.write(request)

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if self.want is None:
            end = self.buf.find(_HEADER_END)
            if end < 0:
                return
            head = bytes(self.buf[:end]).split(b"\r\n")
            self.status = int(head[0].split(b" ", 2)[1])
            length = 0
            for h in head[1:]:
                name, _, value = h.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            self.body_at = end + len(_HEADER_END)
            self.want = self.body_at + length
        if len(self.buf) >= self.want and self.current is not None:
            i, _ = self.current
            self.current = None
            self.done(self, i, self.status, bytes(self.buf[self.body_at:self.want]))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.current is not None:
            i, scheduled = self.current
            self.current = None
            self.lost(self, i, scheduled)


async def run_load(
    host: str, port: int, requests: Sequence[bytes], *, rate: float, ok: Callable[[int, bytes],
                                                                                  bool],
    max_connections: int = 256,
) -> dict[str, object]:
    """Send ``requests`` (complete HTTP/1.1 requests) at ``rate`` per second (0: one at a time,
    closed loop) and return ``lat_ns`` (-1 for a failed request), ``late_ns`` (how long after
    its scheduled start each request was sent), ``errors`` by kind and ``elapsed_s``."""
    loop = asyncio.get_running_loop()
    n = len(requests)
    lat_ns = np.full(n, -1, dtype=np.int64)
    errors: dict[str, int] = {}
    idle: deque[_Conn] = deque()
    opened = 0
    finished = asyncio.Event()
    left = n
    scheduled_at = np.zeros(n, dtype=np.int64)
    late_ns = np.zeros(n, dtype=np.int64)
    closed_loop_next: asyncio.Future[None] | None = None

    def settle() -> None:
        nonlocal left, closed_loop_next
        left -= 1
        if left == 0:
            finished.set()
        if closed_loop_next is not None and not closed_loop_next.done():
            closed_loop_next.set_result(None)

    def done(conn: _Conn, i: int, status: int, body: bytes) -> None:
        if ok(status, body):
            lat_ns[i] = time.perf_counter_ns() - int(scheduled_at[i])
        else:
            errors[str(status)] = errors.get(str(status), 0) + 1
        idle.append(conn)
        settle()

    def lost(conn: _Conn, i: int, scheduled: int) -> None:
        errors["connection_lost"] = errors.get("connection_lost", 0) + 1
        settle()

    async def start(i: int) -> None:
        nonlocal opened
        conn = idle.popleft() if idle else None
        if conn is None:
            if opened >= max_connections:
                errors["no_connection"] = errors.get("no_connection", 0) + 1
                settle()
                return
            opened += 1
            try:
                _, conn = await loop.create_connection(lambda: _Conn(done, lost), host, port)
            except OSError as exc:
                errors[type(exc).__name__] = errors.get(type(exc).__name__, 0) + 1
                settle()
                return
        conn.send(i, int(scheduled_at[i]), requests[i])

    t0 = time.perf_counter_ns() + (0 if rate <= 0 else 50_000_000)
    if rate <= 0:
        for i in range(n):
            closed_loop_next = loop.create_future()
            scheduled_at[i] = time.perf_counter_ns()
            await start(i)
            await closed_loop_next
    else:
        step = 1e9 / rate
        pending = set()
        for i in range(n):
            due = t0 + int(i * step)
            delay = (due - time.perf_counter_ns()) / 1e9
            if delay > 0:
                await asyncio.sleep(delay)
            scheduled_at[i] = due
            late_ns[i] = time.perf_counter_ns() - due
            if idle:
                idle.popleft().send(i, due, requests[i])
            else:
                task = asyncio.ensure_future(start(i))
                pending.add(task)
                task.add_done_callback(pending.discard)
    await finished.wait()
    elapsed_s = (time.perf_counter_ns() - t0) / 1e9
    for conn in idle:
        if conn.transport is not None:
            conn.transport.close()
    return {"lat_ns": lat_ns.tolist(), "late_ns": late_ns.tolist(), "errors": errors,
            "elapsed_s": elapsed_s}
