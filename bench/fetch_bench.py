"""Fetching alone: ``ServiceFetcher`` against the simulated world in its own process.

    .venv/bin/python -m bench.fetch_bench [--contexts 20000] [--members 100000]

The world (``python -m simworld serve``) adds a lognormal latency with a 5 ms median (p99 20 ms)
to every request of its three services. For each mode (batch endpoints with 100 ids per
request; per-entity GETs), the three services are fetched at once for the same contexts, in
chunks of 5,000 as a snapshot run does, with QPS limits off and 64 requests in flight per
service. The figure is contexts per second, each context fetched from all three services. It is
the ceiling of ``snapshot run`` (which also types and stages the answers, see
``snapshot_bench``); the issue's targets for the whole run apply to it too.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time

import numpy as np

from simworld import ENTITY_SERVICES, spawn_world
from snapshotter import ServiceConfig, ServiceFetcher
from snapshotter._run import fewer_collections
from ttstore import parse_timestamp

from ._support import peak_rss_mb
from ._types import Result, at_least

NOW = parse_timestamp("2026-11-01T00:00:00Z", field="now")
CHUNK = 5_000
LATENCY = {"latency_median_ms": 5.0, "latency_p99_ms": 20.0}


async def _fetch_all(url: str, ids: np.ndarray, *, batch: bool) -> tuple[float, dict[str, int]]:
    configs = [
        ServiceConfig(
            name=s, url=f"{url}/v1/{s}/{{entity_id}}",
            batch_url=f"{url}/v1/{s}:batchGet" if batch else None,
            max_concurrency=64, batch_size=100, timeout_s=10.0,
        )
        for s in ENTITY_SERVICES
    ]
    ok = dict.fromkeys(ENTITY_SERVICES, 0)
    fetchers = [ServiceFetcher(c) for c in configs]
    t0 = time.perf_counter()
    try:
        async def one(f: ServiceFetcher) -> None:
            for lo in range(0, len(ids), CHUNK):
                res = await f.fetch(ids[lo:lo + CHUNK].tolist())
                ok[f.config.name] += sum(r.status == "ok" for r in res)

        await asyncio.gather(*(one(f) for f in fetchers))
        return time.perf_counter() - t0, ok
    finally:
        for f in fetchers:
            await f.aclose()


def _cpu_s(pid: int | None = None) -> float:
    """CPU seconds (user + system) used so far by this process, or by ``pid`` (Linux)."""
    if pid is None:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run(quick: bool, *, contexts: int | None = None, members: int = 100_000) -> list[Result]:
    n_batch = contexts or (10_000 if quick else 50_000)
    n_single = contexts or (2_000 if quick else 10_000)
    rng = np.random.default_rng(5)
    faults = dict.fromkeys(ENTITY_SERVICES, LATENCY)
    out = []
    with spawn_world(seed=7, members=members, now_us=NOW, faults=faults) as world:
        for batch, n in ((True, n_batch), (False, n_single)):
            ids = rng.choice(np.arange(1, members + 1), n, replace=False)
            pid = world.process.pid if world.process is not None else None
            cpu0, wcpu0 = _cpu_s(), _cpu_s(pid)
            with fewer_collections():  # as a snapshot run fetches
                seconds, ok = asyncio.run(_fetch_all(world.url, ids, batch=batch))
            cpu, wcpu = _cpu_s() - cpu0, _cpu_s(pid) - wcpu0
            assert all(v == n for v in ok.values()), ok
            mode = "batch endpoints (100 ids)" if batch else "per-entity GETs"
            out.append(Result(
                metric=f"fetch 3 services, {mode}", unit="contexts/s", value=n / seconds,
                target=None if quick else at_least(10_000 if batch else 2_000),
                note=f"{n:,} contexts x 3 services; world in its own process, 5 ms median "
                     "latency, QPS limits off, 64 in flight per service; "
                     f"load average {os.getloadavg()[0]:.1f} at the end",
            ))
            out.append(Result(
                metric=f"fetch CPU per context, {mode}: client", unit="µs",
                value=cpu / n * 1e6, note="user+system CPU of the fetching process",
            ))
            out.append(Result(
                metric=f"fetch CPU per context, {mode}: simulated world", unit="µs",
                value=wcpu / n * 1e6, note="user+system CPU of the world's process",
            ))
    out.append(Result(metric="fetch bench peak RSS (client process)", unit="MB",
                      value=peak_rss_mb()))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--contexts", type=int, default=None)
    ap.add_argument("--members", type=int, default=100_000)
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args(argv)
    for r in run(args.quick, contexts=args.contexts, members=args.members):
        print(f"{r.metric}: {r.value:,.1f} {r.unit}" + (f"  ({r.note})" if r.note else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
