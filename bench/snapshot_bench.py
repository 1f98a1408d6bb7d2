"""``snapshot run`` end to end: fetch, type, stage and commit N contexts x 3 services.

    .venv/bin/python -m bench.snapshot_bench [--quick] [--batch N] [--per-entity N]

The simulated world runs in its own process (``python -m simworld serve``) and adds a lognormal
latency with a 5 ms median (p99 20 ms) to every request of its three services; QPS limits are
off, 64 requests in flight per service, batch endpoints take 100 ids a request. The snapshot run
itself runs in a child process, so its peak RSS is its own (not the selection's, nor the
harness's); the figure is contexts per second from the start of the run to its committed
manifest, each context fetched from all three services. Every run's manifest is checked: all N
contexts requested and answered, for every service.

The per-entity run's baseline, measured right after it against the same answers: a bare aiohttp
client and server, each in its own process, moving the same requests and nothing else (see
``bench._bare_http``), the ceiling of any aiohttp client of aiohttp services on the host at that
moment. The host's speed varies by 2-3x from hour to hour; the ratio much less.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import urllib.request
from pathlib import Path

from simworld import ENTITY_SERVICES, World, spawn_world
from snapshotter import save_selection, select_contexts
from ttstore import ManualClock, Store, format_timestamp, parse_timestamp

from ._bare_http import bare_contexts_per_s
from ._types import Result, at_least, at_most

NOW = parse_timestamp("2026-11-01T00:00:00Z", field="now")
LATENCY = {"latency_median_ms": 5.0, "latency_p99_ms": 20.0}
SEED = 7

_CHILD = """
import json, resource, sys, time
from snapshotter import SnapshotRunner, load_services
from snapshotter._run import use_system_allocator
from ttstore import ManualClock, Store, parse_timestamp
use_system_allocator()  # as `timetravel snapshot run` does
now = parse_timestamp(sys.argv[3], field="slot")
runner = SnapshotRunner(Store(sys.argv[1]), load_services(sys.argv[2]), clock=ManualClock(now))
t0 = time.perf_counter()
out = runner.run(now)
seconds = time.perf_counter() - t0
print(json.dumps({
    "state": out.state, "seconds": seconds,
    "requested": {s: v.requested for s, v in out.manifest.services.items()},
    "fetched_ok": {s: v.fetched_ok for s, v in out.manifest.services.items()},
    "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
}))
"""


#: A child spawned (vfork + exec) straight from this process would report at least this
#: process's peak as its ``ru_maxrss`` (exec folds the old address space's high-water mark in);
#: spawned from a small launcher, its ``ru_maxrss`` is its own.
_LAUNCHER = [sys.executable, "-c",
             "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]


def _answers(url: str) -> dict[str, tuple[bytes, bytes]]:
    """Per service, the world's answer for member 1 and its batch answer for members 1-100."""
    out = {}
    for s in ENTITY_SERVICES:
        with urllib.request.urlopen(f"{url}/v1/{s}/1") as r:
            one = r.read()
        req = urllib.request.Request(f"{url}/v1/{s}:batchGet", method="POST",
                                     data=json.dumps({"ids": list(range(1, 101))}).encode())
        with urllib.request.urlopen(req) as r:
            out[s] = (one, r.read())
    return out


def _one_run(n: int, *, batch: bool, workdir: Path) -> dict[str, object]:
    """Snapshot ``n`` contexts of a world of ``n`` members; the child's figures, and
    ``bare_per_s``: the bare aiohttp pair's contexts per second right after."""
    world = World(seed=SEED, members=n, start_us=NOW)
    store = Store(str(workdir / f"store-{'batch' if batch else 'single'}-{n}"))
    cs = select_contexts(world.population(NOW - 1), n=n, selected_at_us=NOW - 1,
                         entity="member_id", strata=["region"], seed=1)
    save_selection(store, cs, report=False, clock=ManualClock(NOW - 1))
    del cs
    faults = dict.fromkeys(ENTITY_SERVICES, LATENCY)
    with spawn_world(seed=SEED, members=n, now_us=NOW, faults=faults) as w:
        services = workdir / "services.toml"
        services.write_text(w.services_toml(batch=batch, max_concurrency=64, batch_size=100,
                                            timeout_s=10.0, max_qps=None))
        r = subprocess.run([*_LAUNCHER, sys.executable, "-c", _CHILD, store.url,
                            str(services), format_timestamp(NOW)], capture_output=True, text=True)
        bodies = _answers(w.url)
    if r.returncode != 0:
        raise RuntimeError(f"snapshot run failed: {r.stderr[-2000:]}")
    got: dict[str, object] = json.loads(r.stdout)
    expected = dict.fromkeys(ENTITY_SERVICES, n)
    if got["state"] != "committed" or got["requested"] != expected or (
        got["fetched_ok"] != expected
    ):
        raise RuntimeError(f"incomplete run: {got}")
    # Per-entity runs are bound by HTTP at both ends, batch runs by parsing and typing the
    # answers (see the README): only the former has the bare pair for a ceiling.
    got["bare_per_s"] = None if batch else bare_contexts_per_s(bodies, n)
    return got


def run(quick: bool, *, n_batch: int | None = None, n_single: int | None = None) -> list[Result]:
    n_batch = n_batch or (20_000 if quick else 1_000_000)
    n_single = n_single or (3_000 if quick else 20_000)
    note = ("{n:,} contexts x 3 services; world in its own process, 5 ms median latency "
            "(p99 20 ms), QPS limits off, 64 in flight per service{extra}")
    out = []
    with tempfile.TemporaryDirectory(prefix="tt-snapshot-bench-") as tmp:
        for batch, n in ((True, n_batch), (False, n_single)):
            got = _one_run(n, batch=batch, workdir=Path(tmp))
            seconds = float(got["seconds"])  # type: ignore[arg-type]
            mode = "batch endpoints (100 ids)" if batch else "per-entity GETs"
            out.append(Result(
                metric=f"snapshot run, {mode}", unit="contexts/s", value=n / seconds,
                baseline=None if batch else float(got["bare_per_s"]),  # type: ignore[arg-type]
                baseline_name=None if batch else "bare aiohttp pair",
                target=at_least(10_000 if batch else 2_000),
                note=note.format(n=n, extra="; fetch, typing, staging and commit"),
            ))
            out.append(Result(
                metric=f"snapshot run peak RSS, {mode}, {n:,} contexts", unit="MB",
                value=float(got["maxrss_mb"]),  # type: ignore[arg-type]
                target=at_most(300) if n >= 1_000_000 else None,
                note=note.format(n=n, extra="; the run's own process (ru_maxrss)"),
            ))
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--batch", type=int, default=None, help="contexts for the batch run")
    ap.add_argument("--per-entity", type=int, default=None, help="contexts, per-entity run")
    args = ap.parse_args(argv)
    for r in run(args.quick, n_batch=args.batch, n_single=args.per_entity):
        base = "" if r.baseline is None else (
            f"; baseline {r.baseline_name}: {r.baseline:,.1f} {r.unit}, ratio {r.ratio:.2f}")
        print(f"{r.metric}: {r.value:,.1f} {r.unit}{base}  ({r.note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
