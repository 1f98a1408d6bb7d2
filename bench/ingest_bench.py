"""Ingest server throughput: facts/s through ``timetravel facts serve`` for each body format.

Starts the real CLI server (``--no-auth``, a local store and spool in a temporary directory) on
loopback, posts the same facts as a JSON array, NDJSON and an Arrow IPC stream, and reports the
best of a few requests per format. Each timed request ends with the 202, which the server sends
only once the facts are durable in the spool (fsynced). The upload to the store is measured
separately as the time of a following ``POST /v1/flush``.

    .venv/bin/python -m bench.ingest_bench [--facts N] [--repeat R]
"""

from __future__ import annotations

import argparse
import json
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from ._types import Result

FIELDS = {"video_id": "int64", "seconds": "float64", "device": "string", "genre": "string",
          "row": "int64", "autoplay": "bool"}
EVENT_TIME = "2026-01-01T10:00:00Z"
EVENT_TIME_US = 1_767_261_600_000_000


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _call(url: str, method: str, data: bytes | None = None,
          ctype: str = "application/json") -> tuple[int, bytes]:
    req = urllib.request.Request(url, data=data, method=method, headers={"Content-Type": ctype})
    with urllib.request.urlopen(req, timeout=300) as r:
        return r.status, r.read()


def bodies(n: int) -> dict[str, tuple[bytes, str]]:
    rows = [{"member_id": i, "event_time": EVENT_TIME, "video_id": i * 7, "seconds": 1.5,
             "device": "tv", "genre": "drama", "row": 3, "autoplay": i % 2 == 0}
            for i in range(n)]
    table = pa.table({
        "member_id": pa.array(np.arange(n, dtype=np.int64)),
        "event_time": pa.array(np.full(n, EVENT_TIME_US), pa.timestamp("us", tz="UTC")),
        "video_id": pa.array(np.arange(n, dtype=np.int64) * 7),
        "seconds": pa.array(np.full(n, 1.5)),
        "device": pa.array(["tv"] * n),
        "genre": pa.array(["drama"] * n),
        "row": pa.array(np.full(n, 3, dtype=np.int64)),
        "autoplay": pa.array(np.arange(n) % 2 == 0),
    })
    sink = pa.BufferOutputStream()
    with pa.ipc.new_stream(sink, table.schema) as w:
        w.write_table(table)
    return {
        "json": (json.dumps(rows).encode(), "application/json"),
        "ndjson": ("\n".join(json.dumps(r) for r in rows).encode(), "application/x-ndjson"),
        "arrow": (sink.getvalue().to_pybytes(), "application/vnd.apache.arrow.stream"),
    }


def measure(n_facts: int, repeat: int) -> dict[str, Any]:
    """Start a server, post each body format ``repeat`` times, then flush.

    Returns ``{"formats": {name: (body_bytes, best_seconds)}, "flush_s": s, "flushed": n}``.
    """
    exe = Path(sys.executable).parent / "timetravel"
    formats: dict[str, tuple[int, float]] = {}
    with tempfile.TemporaryDirectory(prefix="tt-ingest-bench-") as tmp:
        port = _free_port()
        base = f"http://127.0.0.1:{port}"
        with open(Path(tmp) / "server.log", "w") as log:
            proc = subprocess.Popen(
                [str(exe), "facts", "serve", "--store", f"{tmp}/store", "--spool-dir",
                 f"{tmp}/spool", "--no-auth", "--port", str(port)],
                stdout=log, stderr=subprocess.STDOUT)
        try:
            for _ in range(300):
                try:
                    _call(base + "/healthz", "GET")
                    break
                except OSError:
                    time.sleep(0.05)
            decl = {"entity": {"name": "member_id", "type": "int64"}, "fields": FIELDS}
            _call(base + "/v1/fact-types/bench", "PUT", json.dumps(decl).encode())
            for name, (data, ctype) in bodies(n_facts).items():
                best = float("inf")
                for _ in range(repeat):
                    t0 = time.perf_counter()
                    status, out = _call(base + "/v1/facts/bench", "POST", data, ctype)
                    best = min(best, time.perf_counter() - t0)
                    accepted = json.loads(out)["accepted"]
                    if status != 202 or accepted != n_facts:
                        raise RuntimeError(f"{name}: {status} {out[:300]!r}")
                formats[name] = (len(data), best)
            t0 = time.perf_counter()
            _call(base + "/v1/flush", "POST", b"{}")
            flush_s = time.perf_counter() - t0
        finally:
            proc.send_signal(signal.SIGTERM)
            proc.wait(60)
    return {"formats": formats, "flush_s": flush_s, "flushed": len(formats) * repeat * n_facts}


def run(quick: bool) -> list[Result]:
    n_facts, repeat = (20_000, 2) if quick else (50_000, 3)
    m = measure(n_facts, repeat)
    fmts: dict[str, tuple[int, float]] = m["formats"]
    json_rate = n_facts / fmts["json"][1]
    note = (f"timetravel facts serve on loopback, local store, {n_facts:,} facts/request, "
            f"6 fields; best of {repeat}; ends at the 202 (durable in the spool)")
    out = []
    for name, label in (("arrow", "Arrow IPC stream"), ("ndjson", "NDJSON"),
                        ("json", "JSON array")):
        size, best = fmts[name]
        base = None if name == "json" else json_rate
        out.append(Result(
            metric=f"ingest POST, {label} body", unit="facts/s", value=n_facts / best,
            baseline=base, baseline_name=None if base is None else "JSON array body",
            note=f"{note}; body {size / 1e6:.1f} MB",
        ))
    out.append(Result(
        metric="ingest flush (spool to store as Parquet)", unit="s", value=m["flush_s"],
        note=f"one POST /v1/flush of {m['flushed']:,} spooled facts",
    ))
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--facts", type=int, default=50_000, help="facts per request")
    ap.add_argument("--repeat", type=int, default=3, help="requests per format (best is kept)")
    args = ap.parse_args()
    m = measure(args.facts, args.repeat)
    print(f"ingest server, local store, {args.facts} facts/request, 6 fields; "
          f"best of {args.repeat}; 202 = durable in the spool")
    for name, (size, best) in m["formats"].items():
        print(f"  {name:7s} {size / 1e6:6.1f} MB  {best * 1e3:7.0f} ms  "
              f"{args.facts / best:12,.0f} facts/s")
    print(f"  flush (upload of {m['flushed']:,} facts as Parquet): {m['flush_s']:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
