"""Online as-of lookups through the query server: ``GET /v1/features/{entity_id}`` of 3 built-in
features at random past times, at a fixed request rate from a separate load-generator process.

Data (``bench/_pitdata.py``, compacted): facts of ``t`` over 30 days (300k facts / 10k entities
with ``--quick``, 3M / 100k otherwise). The real CLI server (``timetravel api serve --no-auth``,
local store) runs in its own process; the load generator (another process, ``bench/_loadgen``:
pre-encoded requests on keep-alive connections through a bare asyncio protocol, so it costs the
shared 2 cores little, as wrk would) sends requests open-loop on a fixed schedule (500/s), so a
slow answer never slows the offered rate. A latency is measured from the request's *scheduled*
start to the end of its answer, so queueing behind a slow request counts. The first seconds warm
the server further (the server itself decodes row groups into its cache when it starts, newest
dates first, and the benchmark waits for that) and are not measured.

    .venv/bin/python -m bench.api_bench [--quick]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from ttstore import US_PER_DAY, Store, format_timestamp

from ._loadgen import run as run_loop
from ._loadgen import run_load
from ._pitdata import FEATURES, T0, generate_facts
from ._support import free_port, percentiles_us
from ._types import Result, at_most

RATE_PER_S = 500
P50_TARGET_MS = 2.0
P99_TARGET_MS = 10.0
NOW = format_timestamp(T0 + 40 * US_PER_DAY)
#: The server's memory budget: enough for every decoded row group of the full data set (3M
#: facts are ~270 MB decoded, half the budget goes to row groups), so "warm" means warm.
CACHE_BYTES = 1 << 30


def say(msg: str) -> None:
    print(f"[api_bench] {msg}", file=sys.stderr, flush=True)


# -- the load generator (its own process) --------------------------------------------------------


def _requests(port: int, n: int, n_entities: int, seed: int) -> list[bytes]:
    """``n`` pre-encoded GETs of the benchmark's features, one entity and past time each."""
    rng = np.random.default_rng(seed)
    ents = rng.integers(0, n_entities, n)
    ats = T0 + 10 * US_PER_DAY + rng.integers(0, 20 * US_PER_DAY, n)
    feats = ",".join(FEATURES)
    return [(f"GET /v1/features/{e}?at={format_timestamp(int(t))}&features={feats} HTTP/1.1\r\n"
             f"Host: 127.0.0.1:{port}\r\n\r\n").encode() for e, t in zip(ents, ats, strict=True)]


def _ok(status: int, body: bytes) -> bool:
    return status == 200 and b'"features"' in body


def loadgen_main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", required=True)
    ap.add_argument("--rate", type=float, required=True)
    ap.add_argument("--n", type=int, required=True)
    ap.add_argument("--entities", type=int, required=True)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    u = urllib.parse.urlsplit(a.url)
    assert u.hostname is not None and u.port is not None
    reqs = _requests(u.port, a.n, a.entities, a.seed)
    res = run_loop(run_load(u.hostname, u.port, reqs, rate=a.rate, ok=_ok))
    Path(a.out).write_text(json.dumps(res))
    return 0


def run_loadgen(url: str, *, rate: float, n: int, entities: int, seed: int, out: Path
                ) -> dict[str, object]:
    subprocess.run([sys.executable, "-m", "bench.api_bench", "--loadgen", "--url", url,
                    "--rate", str(rate), "--n", str(n), "--entities", str(entities),
                    "--seed", str(seed), "--out", str(out)], check=True,
                   cwd=Path(__file__).resolve().parent.parent)
    res: dict[str, object] = json.loads(out.read_text())
    return res


# -- the benchmark -------------------------------------------------------------------------------


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process so far (Linux ``/proc``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _wait_warm(base: str, proc: subprocess.Popen[bytes]) -> dict[str, Any]:
    """Wait until the server answers ``/healthz`` and has finished warming its row-group cache
    (``api serve`` does that at start); returns the cache's health figures."""
    for _ in range(1200):
        if proc.poll() is not None:
            raise RuntimeError(f"the api server exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(base + "/healthz", timeout=2) as r:
                cache: dict[str, Any] = json.loads(r.read())["row_group_cache"]
                if cache["warm"] != "running":
                    return cache
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError("the api server did not become healthy and warm")


def run(quick: bool) -> list[Result]:
    n_facts, n_entities = (300_000, 10_000) if quick else (3_000_000, 100_000)
    warm_s, measure_s = (2, 6) if quick else (5, 30)
    tmp = Path(tempfile.mkdtemp(prefix="tt-api-bench-"))
    say(f"generating {n_facts:,} facts over {n_entities:,} entities (compacted)")
    generate_facts(Store(str(tmp / "store")), n_facts, n_entities)
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    exe = Path(sys.executable).parent / "timetravel"
    log = (tmp / "server.log").open("w")
    proc = subprocess.Popen(
        [str(exe), "api", "serve", "--store", str(tmp / "store"), "--no-auth", "--port",
         str(port), "--now", NOW, "--cache-bytes", str(CACHE_BYTES)],
        stdout=log, stderr=subprocess.STDOUT)
    try:
        cache = _wait_warm(base, proc)
        say(f"server cache warm ({cache['warm']}): {cache['warmed_groups']} row groups, "
            f"{int(cache['bytes']) / 1e6:.0f} MB; warming for {warm_s}s at {RATE_PER_S}/s")
        run_loadgen(base, rate=RATE_PER_S, n=RATE_PER_S * warm_s, entities=n_entities, seed=7,
                    out=tmp / "warm.json")
        say("closed loop: one request at a time")
        seq = run_loadgen(base, rate=0, n=300 if quick else 2000, entities=n_entities, seed=9,
                          out=tmp / "seq.json")
        say(f"measuring {measure_s}s at {RATE_PER_S}/s")
        cpu0 = _cpu_s(proc.pid)
        res = run_loadgen(base, rate=RATE_PER_S, n=RATE_PER_S * measure_s,
                          entities=n_entities, seed=8, out=tmp / "measure.json")
        server_cpu_s = _cpu_s(proc.pid) - cpu0
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    lat = np.asarray(res["lat_ns"], dtype=np.int64)
    ok = lat[lat >= 0]
    errors: dict[str, int] = res["errors"]  # type: ignore[assignment]
    n_err = int(sum(errors.values()))
    p50, p99, pmax = (v / 1000 for v in percentiles_us(ok, (50, 99, 100)))
    late = np.asarray(res["late_ns"], dtype=np.int64)
    l50, l99 = percentiles_us(late, (50, 99))  # µs
    achieved = len(lat) / float(res["elapsed_s"])  # type: ignore[arg-type]
    note = (f"{n_facts:,} facts / {n_entities:,} entities, {len(lat):,} GETs of "
            f"{', '.join(FEATURES)} at random past times; open loop at {RATE_PER_S}/s "
            f"(achieved {achieved:.0f}/s), warm; latency from scheduled start (requests sent "
            f"{l50:.0f} µs late at p50, {l99:.0f} µs at p99); "
            f"server and load generator share the machine's cores")
    say(f"p50 {p50:.2f} ms, p99 {p99:.2f} ms, max {pmax:.1f} ms, errors {errors}; the load "
        f"generator sent {l50:.0f} µs (p50) / {l99:.0f} µs (p99) after schedule")
    slat = np.asarray(seq["lat_ns"], dtype=np.int64)
    s50, s99 = (v / 1000 for v in percentiles_us(slat[slat >= 0], (50, 99)))
    say(f"closed loop p50 {s50:.2f} ms, p99 {s99:.2f} ms")
    cpu_ms = server_cpu_s / max(1, len(lat)) * 1e3
    say(f"server CPU {cpu_ms:.2f} ms per lookup at {RATE_PER_S}/s")
    return [
        Result("api lookup server CPU per request", cpu_ms, "ms",
               note=f"the server process's user+system time over the {RATE_PER_S}/s phase, "
               "divided by its requests (HTTP, JSON and the engine)"),
        Result("api lookup p50, one at a time", s50, "ms",
               note=f"closed loop, {len(slat):,} GETs; p99 {s99:.2f} ms; capacity is about "
               f"{1000 / s50:.0f} req/s per core at this service time"),
        Result(f"api lookup p50 at {RATE_PER_S}/s", p50, "ms", target=at_most(P50_TARGET_MS),
               note=note),
        Result(f"api lookup p99 at {RATE_PER_S}/s", p99, "ms", target=at_most(P99_TARGET_MS),
               note=f"max {pmax:.1f} ms"),
        Result(f"api lookup errors at {RATE_PER_S}/s", float(n_err), "requests",
               target=at_most(0), note=json.dumps(errors) if errors else "none"),
    ]


def main() -> int:
    if len(sys.argv) > 1 and sys.argv[1] == "--loadgen":
        return loadgen_main(sys.argv[2:])
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true")
    args = ap.parse_args()
    for r in run(args.quick):
        target = r.target.describe(r.unit) if r.target else "-"
        print(f"{r.metric}: {r.value:.3f} {r.unit}  (target {target}; met {r.met})  {r.note}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
