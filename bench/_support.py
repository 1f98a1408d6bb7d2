"""Helpers shared by the bench modules: timing, percentiles, RSS, and an S3 endpoint (moto in
server mode on a free loopback port, inside the bench process)."""

from __future__ import annotations

import os
import resource
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Timer:
    """``with Timer() as t: ...``; then ``t.s`` is the elapsed wall time in seconds."""

    def __enter__(self) -> Timer:
        self._t0 = time.perf_counter()
        self.s = float("nan")
        return self

    def __exit__(self, *exc: object) -> None:
        self.s = time.perf_counter() - self._t0


def percentiles_us(samples_ns: np.ndarray, qs: tuple[float, ...] = (50, 99)) -> list[float]:
    """Percentiles of nanosecond samples, in microseconds."""
    if len(samples_ns) == 0:
        return [float("nan")] * len(qs)
    return [float(v) / 1000 for v in np.percentile(samples_ns, qs)]


def peak_rss_mb(children: bool = False) -> float:
    """Peak resident set size of this process (or of its waited-for children), in MB."""
    who = resource.RUSAGE_CHILDREN if children else resource.RUSAGE_SELF
    kb = resource.getrusage(who).ru_maxrss
    return kb / (1024 * 1024) if sys.platform == "darwin" else kb / 1024


_MOTO_CHILD = """
import sys
from moto.server import ThreadedMotoServer
server = ThreadedMotoServer(ip_address="127.0.0.1", port=int(sys.argv[1]), verbose=False)
server.start()
print("ready", flush=True)
sys.stdin.read()  # until the parent closes stdin (or dies)
server.stop()
"""


class MotoServer:
    """A moto S3 server (``ThreadedMotoServer``) on a free loopback port: in this process, or
    in a child process so that its CPU work does not compete for this process's GIL."""

    def __init__(self, *, in_process: bool = True) -> None:
        self.port = free_port()
        self.endpoint = f"http://127.0.0.1:{self.port}"
        self.in_process = in_process
        self._server: Any = None
        self._proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        if self.in_process:
            from moto.server import ThreadedMotoServer  # noqa: PLC0415  (dev dependency)

            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port,
                                              verbose=False)
            self._server.start()
            return
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _MOTO_CHILD, str(self.port)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
        )
        assert self._proc.stdout is not None
        if self._proc.stdout.readline().strip() != b"ready":
            self.stop()
            raise RuntimeError("the moto server did not start")

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
            self._server = None
        proc, self._proc = self._proc, None
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.close()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()

    def create_bucket(self, name: str | None = None) -> str:
        import boto3  # noqa: PLC0415

        name = name or f"bench-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint).create_bucket(Bucket=name)
        return name


_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_REGION": "us-east-1",
}


@contextmanager
def moto_server(*, in_process: bool = True) -> Iterator[MotoServer]:
    """Start moto, point ``AWS_ENDPOINT_URL`` (and dummy credentials) at it, and undo both."""
    saved = {k: os.environ.get(k) for k in (*_AWS_ENV, "AWS_ENDPOINT_URL", "AWS_PROFILE")}
    os.environ.update(_AWS_ENV)
    os.environ.pop("AWS_PROFILE", None)
    server = MotoServer(in_process=in_process)
    server.start()
    os.environ["AWS_ENDPOINT_URL"] = server.endpoint
    try:
        yield server
    finally:
        server.stop()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


class TreeRssSampler:
    """The peak of the summed resident set of a process and all its descendants, sampled every
    ``interval_s`` from ``/proc`` in a background thread (Linux; elsewhere it reports None). A
    sampled peak can miss a spike shorter than the interval, so it is a lower bound, where the
    sum of the processes' own peaks is an upper one."""

    def __init__(self, pid: int, interval_s: float = 0.05) -> None:
        import threading  # noqa: PLC0415

        self.pid, self.interval_s = pid, interval_s
        self.peak_mb: float | None = None
        self._stop = threading.Event()
        self._page = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def __enter__(self) -> TreeRssSampler:
        if os.path.exists(f"/proc/{self.pid}/statm"):
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()

    def _tree(self) -> list[int]:
        out, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            out.append(pid)
            try:
                for task in os.listdir(f"/proc/{pid}/task"):
                    with open(f"/proc/{pid}/task/{task}/children") as f:
                        todo.extend(int(c) for c in f.read().split())
            except OSError:
                continue  # exited meanwhile
        return out

    def _run(self) -> None:
        while not self._stop.is_set():
            total = 0
            for pid in self._tree():
                try:
                    with open(f"/proc/{pid}/statm") as f:
                        total += int(f.read().split()[1]) * self._page
                except (OSError, IndexError, ValueError):
                    continue
            mb = total / (1024 * 1024)
            if total and (self.peak_mb is None or mb > self.peak_mb):
                self.peak_mb = mb
            self._stop.wait(self.interval_s)

