"""The snapshot benchmark's baseline: what bare aiohttp alone moves on this host, right now.

A snapshot run's per-entity figure is bound by HTTP: every context is three requests, each
through aiohttp's client in the run and aiohttp's server in the world, both on the same two
cores. The host's speed also varies by 2-3x from hour to hour. So beside each run the benchmark
measures a bare pair: the same three services' routes on an aiohttp server that answers a
fixed body (no truth, no latency, no faults, no counters) in its own process, and a client
that only sends the same requests (one ``ClientSession`` per service, the same concurrency)
and reads the answers (no parsing, typing, staging or commit), in a process of its own. Its
contexts per second are a ceiling for the run on the host at that moment; the ratio says how
much of it the run keeps.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import subprocess
import sys
import time
from collections.abc import Mapping

import aiohttp
from aiohttp import web

from snapshotter._run import fewer_collections

from ._support import free_port

_READY = "bare ready"


def _app(bodies: Mapping[str, tuple[bytes, bytes]]) -> web.Application:
    """Routes answering ``bodies[service] = (one answer, one batch answer)``."""
    app = web.Application()
    for service, (one, many) in bodies.items():
        async def get_one(request: web.Request, body: bytes = one) -> web.Response:
            return web.Response(body=body, content_type="application/json")

        async def batch_get(request: web.Request, body: bytes = many) -> web.Response:
            await request.read()
            return web.Response(body=body, content_type="application/json")

        app.router.add_get(f"/v1/{service}/{{entity_id}}", get_one)
        app.router.add_post(f"/v1/{service}:batchGet", batch_get)
    return app


def _serve(port: int, bodies: Mapping[str, tuple[bytes, bytes]]) -> None:
    """Serve :func:`_app` on ``port`` until killed."""
    async def main() -> None:
        runner = web.AppRunner(_app(bodies), access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        print(_READY, flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _fetch(url: str, services: list[str], n: int, *, batch: int | None,
                 concurrency: int) -> float:
    """Seconds to fetch ``n`` contexts from every service at once, as a run would ask."""
    async def one(service: str) -> None:
        if batch is None:
            units: list[tuple[str, bytes | None]] = [
                (f"{url}/v1/{service}/{i}", None) for i in range(1, n + 1)]
        else:
            units = [(f"{url}/v1/{service}:batchGet",
                      json.dumps({"ids": list(range(lo + 1, min(lo + batch, n) + 1))}).encode())
                     for lo in range(0, n, batch)]
        todo = iter(units)
        conn = aiohttp.TCPConnector(limit=concurrency)
        async with aiohttp.ClientSession(connector=conn) as session:
            async def work() -> None:
                for u, body in todo:
                    method = "GET" if body is None else "POST"
                    async with session.request(method, u, data=body) as resp:
                        await resp.read()
                        if resp.status != 200:
                            raise RuntimeError(f"bare server answered {resp.status} to {u}")

            async with asyncio.TaskGroup() as tg:  # one failure stops them all
                for _ in range(concurrency):
                    tg.create_task(work())

    t0 = time.perf_counter()
    with fewer_collections():  # as a snapshot run fetches
        async with asyncio.TaskGroup() as tg:
            for s in services:
                tg.create_task(one(s))
    return time.perf_counter() - t0


def bare_contexts_per_s(bodies: Mapping[str, tuple[bytes, bytes]], n: int, *,
                        batch: int | None = None, concurrency: int = 64) -> float:
    """Contexts per second of the bare pair: a server process answering ``bodies`` and this
    module's client in a second process, fetching ``n`` contexts from every service.

    Args:
        bodies: per service, the fixed answer to a GET and to a batch POST.
        n: contexts.
        batch: ids per batch POST; None: per-entity GETs.
        concurrency: requests in flight per service.
    """
    port = free_port()
    spec = json.dumps({s: [one.decode(), many.decode()] for s, (one, many) in bodies.items()})
    server = subprocess.Popen(
        [sys.executable, "-m", "bench._bare_http", "--serve", str(port)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert server.stdin is not None and server.stdout is not None
        server.stdin.write(spec)
        server.stdin.close()
        if server.stdout.readline().strip() != _READY:
            raise RuntimeError("the bare server did not start")
        args = [sys.executable, "-m", "bench._bare_http", "--fetch", f"http://127.0.0.1:{port}",
                str(n), "--concurrency", str(concurrency), "--services", ",".join(bodies)]
        if batch is not None:
            args += ["--batch", str(batch)]
        r = subprocess.run(args, capture_output=True, text=True, check=False)
        if r.returncode != 0:
            raise RuntimeError(f"the bare client failed: {r.stderr[-2000:]}")
        return n / float(r.stdout)
    finally:
        server.kill()
        server.wait()
        if server.stdout is not None:
            server.stdout.close()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--serve", type=int, metavar="PORT",
                    help="serve the bodies read as JSON from stdin on PORT")
    ap.add_argument("--fetch", metavar="URL", help="fetch from a bare server; prints seconds")
    ap.add_argument("n", type=int, nargs="?", default=0, help="contexts to fetch")
    ap.add_argument("--services", default="")
    ap.add_argument("--batch", type=int, default=None, help="ids per batch POST")
    ap.add_argument("--concurrency", type=int, default=64)
    args = ap.parse_args(argv)
    if args.serve is not None:
        spec = json.loads(sys.stdin.read())
        _serve(args.serve, {s: (one.encode(), many.encode()) for s, (one, many) in spec.items()})
        return 0
    if args.fetch is None or args.n < 1:
        ap.error("give --serve PORT, or --fetch URL N")
    seconds = asyncio.run(_fetch(args.fetch, args.services.split(","), args.n,
                                 batch=args.batch, concurrency=args.concurrency))
    print(seconds)
    return 0


if __name__ == "__main__":
    sys.exit(main())
