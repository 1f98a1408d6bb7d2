"""Running the world: in a background thread (tests), in its own process (benchmarks, the demo),
a small synchronous control client, and the services TOML that points a snapshot run at it."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from snapshotter import render_services
from ttstore import format_timestamp, parse_timestamp

from ._services import ENTITY_SERVICES, SimClock, SimState, make_app
from ._world import World

__all__ = [
    "READY_PREFIX",
    "RunningWorld",
    "SimControl",
    "WorldProcess",
    "running_world",
    "serve",
    "services_toml",
    "spawn_world",
]

#: The first line ``python -m simworld serve`` prints once it accepts requests.
READY_PREFIX = "simworld ready"


def services_toml(
    base_url: str,
    *,
    batch: bool = True,
    services: tuple[str, ...] = tuple(ENTITY_SERVICES),
    timeout_s: float = 2.0,
    retries: int = 3,
    max_concurrency: int = 64,
    max_qps: float | None = None,
    max_staleness: str = "48h",
    batch_size: int = 100,
) -> str:
    """A services TOML (SPEC §2) for the world at ``base_url``, one table per service.

    Args:
        base_url: the world's URL (``http://127.0.0.1:PORT``).
        batch: whether to give each service its ``batch_url``.
        services: which of ``viewing_history``, ``my_list``, ``profile`` to include.
        timeout_s, retries, max_concurrency, max_qps, max_staleness, batch_size: the same for
            every service (``max_qps=None``: no limit).
    """
    base = base_url.rstrip("/")
    body: dict[str, dict[str, Any]] = {}
    for name in services:
        if name not in ENTITY_SERVICES:
            raise ValueError(f"the world has no service {name!r}")
        body[name] = {
            "url": f"{base}/v1/{name}/{{entity_id}}",
            "batch_url": f"{base}/v1/{name}:batchGet" if batch else None,
            "entity_type": "int64",
            "timeout_s": timeout_s,
            "retries": retries,
            "max_concurrency": max_concurrency,
            "max_qps": max_qps,
            "max_staleness": max_staleness,
            "batch_size": batch_size,
        }
    return render_services(body)


class SimControl:
    """A synchronous client of the world's control API (``/_sim/...``) and its population.

    Args:
        url: the world's base URL.
        timeout_s: per call.
    """

    def __init__(self, url: str, *, timeout_s: float = 30.0) -> None:
        self.url = url.rstrip("/")
        self.timeout_s = timeout_s

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=self.timeout_s) as resp:
            return json.loads(resp.read())

    def now_us(self) -> int:
        """The world's now."""
        return parse_timestamp(self._call("GET", "/_sim/clock")["now"], field="now")

    def set_now(self, now_us: int, *, rate: float | None = None) -> None:
        """Set the world's now (and its rate: simulated seconds per wall second)."""
        body: dict[str, Any] = {"now": format_timestamp(now_us)}
        if rate is not None:
            body["rate"] = rate
        self._call("POST", "/_sim/clock", body)

    def advance(self, duration: str) -> int:
        """Move the world's now forward by a duration like ``"12h"``; returns the new now."""
        body = self._call("POST", "/_sim/clock", {"advance": duration})
        return parse_timestamp(body["now"], field="now")

    def set_faults(self, service: str = "*", **faults: Any) -> dict[str, Any]:
        """Change faults of one service (``"*"``: all); see :class:`simworld.Faults`."""
        out: dict[str, Any] = self._call("POST", "/_sim/faults", {"service": service, **faults})
        return out

    def faults(self) -> dict[str, Any]:
        out: dict[str, Any] = self._call("GET", "/_sim/faults")
        return out

    def stats(self) -> dict[str, Any]:
        """Requests started per service and per one-second window (see ``_services``)."""
        out: dict[str, Any] = self._call("GET", "/_sim/stats")
        return out

    def reset_stats(self) -> None:
        self._call("POST", "/_sim/stats/reset", {})

    def population_bytes(self, fmt: str = "parquet") -> bytes:
        """The population at the world's now, as ``parquet``, ``csv`` or ``json`` bytes."""
        with urllib.request.urlopen(f"{self.url}/v1/population?format={fmt}",
                                    timeout=self.timeout_s) as resp:
            data: bytes = resp.read()
            return data

    def wait_ready(self, *, timeout_s: float = 30.0) -> None:
        """Wait until ``/healthz`` answers."""
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                self._call("GET", "/healthz")
                return
            except (urllib.error.URLError, OSError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)


@dataclass
class RunningWorld:
    """A world serving on loopback (from :func:`running_world` or :func:`spawn_world`)."""

    url: str
    control: SimControl
    state: SimState | None = None  # in-process only

    def services_toml(self, **kw: Any) -> str:
        """:func:`services_toml` for this world."""
        return services_toml(self.url, **kw)


def _app_runner(state: SimState) -> web.AppRunner:
    # handler_cancellation: a client that gives up (its timeout) cancels the hung handler.
    return web.AppRunner(make_app(state), handler_cancellation=True, access_log=None,
                         shutdown_timeout=2.0)


@contextlib.contextmanager
def running_world(
    world: World,
    *,
    clock: SimClock | None = None,
    host: str = "127.0.0.1",
    port: int = 0,
    fault_seed: int | None = None,
) -> Iterator[RunningWorld]:
    """Serve ``world`` on a free loopback port from a background thread, for the ``with``.

    Args:
        world: the truth.
        clock: the world's now (default: frozen at ``world.start_us``).
        host, port: where to listen (port 0: a free one).
        fault_seed: seeds the fault draws.

    Yields:
        The running world; its ``state`` gives direct access to clock, faults and counters.
    """
    state = SimState(world, clock or SimClock(world.start_us), seed=fault_seed)
    with serve_in_thread(lambda: _app_runner(state), host=host, port=port, name="simworld") as url:
        yield RunningWorld(url=url, control=SimControl(url), state=state)


@contextlib.contextmanager
def serve_in_thread(
    make_runner: Callable[[], web.AppRunner], *, host: str, port: int, name: str
) -> Iterator[str]:
    """Serve an aiohttp app from a background thread with its own event loop, for the ``with``.

    Yields:
        The base URL (``port`` 0 picks a free one). Start-up errors are raised here.
    """
    box: dict[str, Any] = {}
    ready = threading.Event()

    async def main() -> None:
        stop = asyncio.Event()
        box["loop"], box["stop"] = asyncio.get_running_loop(), stop
        runner = make_runner()
        try:
            await runner.setup()
            site = web.TCPSite(runner, host, port)
            await site.start()
            box["port"] = runner.addresses[0][1]
        except BaseException as exc:
            box["error"] = exc
            ready.set()
            await runner.cleanup()
            return
        ready.set()
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    thread = threading.Thread(target=asyncio.run, args=(main(),), name=name, daemon=True)
    thread.start()
    ready.wait()
    if "error" in box:
        thread.join()
        raise box["error"]
    try:
        yield f"http://{host}:{box['port']}"
    finally:
        box["loop"].call_soon_threadsafe(box["stop"].set)
        thread.join()


@dataclass
class WorldProcess(RunningWorld):
    """A world in its own process (:func:`spawn_world`)."""

    process: subprocess.Popen[str] | None = None


@contextlib.contextmanager
def spawn_world(
    *,
    seed: int,
    members: int,
    now_us: int,
    videos: int | None = None,
    faults: Mapping[str, Mapping[str, Any]] | None = None,
    ready_timeout_s: float = 60.0,
) -> Iterator[WorldProcess]:
    """Run ``python -m simworld serve`` on a free port for the ``with``; stop it after.

    Args:
        seed, members, now_us, videos: the world (see :class:`World`).
        faults: per-service faults to start with (``{"profile": {"error_rate": 0.2}}``).
        ready_timeout_s: how long to wait for the ready line.
    """
    cmd = [sys.executable, "-m", "simworld", "serve", "--port", "0", "--seed", str(seed),
           "--members", str(members), "--now", format_timestamp(now_us)]
    if videos is not None:
        cmd += ["--videos", str(videos)]
    if faults:
        cmd += ["--faults", json.dumps(faults)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env=os.environ.copy())
    try:
        assert proc.stdout is not None
        ready, _, _ = select.select([proc.stdout], [], [], ready_timeout_s)
        line = proc.stdout.readline() if ready else ""
        if not line.startswith(READY_PREFIX):
            raise RuntimeError(f"simworld did not start (exit {proc.poll()}): {line!r}")
        url = dict(kv.split("=", 1) for kv in line.split()[2:])["url"]
        yield WorldProcess(url=url, control=SimControl(url), process=proc)
    finally:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc.stdout is not None:
            proc.stdout.close()


def serve(
    world: World,
    *,
    host: str = "127.0.0.1",
    port: int = 0,
    rate: float = 0.0,
    now_us: int | None = None,
    faults: Mapping[str, Mapping[str, Any]] | None = None,
    fault_seed: int | None = None,
) -> None:
    """Serve ``world`` in this process until SIGTERM or SIGINT; print the ready line first
    (``simworld ready url=http://HOST:PORT ...``) on stdout."""
    clock = SimClock(world.start_us if now_us is None else now_us, rate=rate)
    state = SimState(world, clock, seed=fault_seed)
    for service, f in (faults or {}).items():
        state.set_faults(service, **dict(f))

    async def main() -> None:
        runner = _app_runner(state)
        await runner.setup()
        await web.TCPSite(runner, host, port).start()
        bound = runner.addresses[0][1]
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        print(
            f"{READY_PREFIX} url=http://{host}:{bound} seed={world.seed} "
            f"members={world.members} now={format_timestamp(clock.now_us())}",
            flush=True,
        )
        try:
            await stop.wait()
        finally:
            await runner.cleanup()

    asyncio.run(main())
