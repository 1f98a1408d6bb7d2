"""``timetravel up``: the whole stack on loopback, for trying the APIs by hand.

It is a small supervisor of real processes, each started through its own public command: the
ingest server, the query API, the snapshot scheduler, and optionally the simulated world and a
moto S3 server. Ctrl-C (SIGINT) or SIGTERM stops them in reverse order; if any of them dies, the
others are stopped too and ``up`` exits non-zero.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import TextIO

from ttstore import TimetravelError

_STOP_TIMEOUT_S = 20.0
_READY_TIMEOUT_S = 60.0


class UpError(TimetravelError):
    code = "up_failed"
    http_status = 500


@dataclass
class _Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path
    url: str | None = None


@dataclass
class Stack:
    """The processes ``up`` started, newest last."""

    run_dir: Path
    env: dict[str, str]
    children: list[_Child] = field(default_factory=list)

    def start(self, name: str, argv: list[str], *, url: str | None = None) -> _Child:
        log = self.run_dir / f"{name}.log"
        with log.open("wb") as fh:
            proc = subprocess.Popen(argv, stdout=fh, stderr=subprocess.STDOUT, env=self.env,
                                    start_new_session=True)
        child = _Child(name, proc, log, url)
        self.children.append(child)
        return child

    def wait_ready(self, child: _Child, probe_url: str) -> None:
        deadline = time.monotonic() + _READY_TIMEOUT_S
        while time.monotonic() < deadline:
            if child.proc.poll() is not None:
                raise UpError(f"{child.name} exited with {child.proc.returncode} while starting; "
                              f"see {child.log}")
            try:
                with urllib.request.urlopen(probe_url, timeout=2) as r:
                    if r.status == 200:
                        return
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.2)
        raise UpError(f"{child.name} did not answer {probe_url} within {_READY_TIMEOUT_S:.0f}s; "
                      f"see {child.log}")

    def run_once(self, name: str, argv: list[str]) -> str:
        """Run a command to completion (e.g. ``snapshot select``); its stdout."""
        r = subprocess.run(argv, capture_output=True, env=self.env, timeout=300, check=False)
        (self.run_dir / f"{name}.log").write_bytes(r.stdout + r.stderr)
        if r.returncode != 0:
            raise UpError(f"{name} failed ({r.returncode}): {r.stderr.decode(errors='replace')}")
        return r.stdout.decode()

    def dead(self) -> _Child | None:
        return next((c for c in self.children if c.proc.poll() is not None), None)

    def stop(self) -> None:
        """SIGTERM in reverse order, then SIGKILL what did not stop in time."""
        for c in reversed(self.children):
            if c.proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + _STOP_TIMEOUT_S
        for c in reversed(self.children):
            try:
                c.proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(c.proc.pid, signal.SIGKILL)
                c.proc.wait()


@dataclass(frozen=True, kw_only=True)
class UpConfig:
    store: str
    ingest_port: int = 8081
    api_port: int = 8080
    tokens_file: str | None = None
    with_sim: bool = False
    sim_port: int = 9001
    sim_members: int = 10_000
    sim_rate: float = 1.0
    s3: bool = False
    s3_port: int = 9000
    services: str | None = None
    every: str = "12h"
    sample_n: int = 1_000
    now: str | None = None


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "ttstore", *args]


def run_up(cfg: UpConfig, *, out: TextIO = sys.stdout) -> int:
    """Start the stack, print its URLs, and supervise it until a signal or a death."""
    run_dir = Path(tempfile.mkdtemp(prefix="timetravel-up-"))
    env = dict(os.environ)
    stack = Stack(run_dir, env)
    stopping = {"signal": 0}

    def _on_signal(signum: int, _frame: object) -> None:
        stopping["signal"] = signum

    old = {s: signal.signal(s, _on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        store = cfg.store
        if cfg.s3:
            store = _start_moto(stack, cfg.s3_port)
        auth = ["--tokens-file", cfg.tokens_file] if cfg.tokens_file else ["--no-auth"]
        now = ["--now", cfg.now] if cfg.now else []
        ingest = stack.start("ingest", _cli(
            "facts", "serve", "--store", store, "--host", "127.0.0.1",
            "--port", str(cfg.ingest_port), "--spool-dir", str(run_dir / "spool"), *auth, *now),
            url=f"http://127.0.0.1:{cfg.ingest_port}")
        api = stack.start("api", _cli(
            "api", "serve", "--store", store, "--host", "127.0.0.1", "--port", str(cfg.api_port),
            *auth, *now), url=f"http://127.0.0.1:{cfg.api_port}")
        services = cfg.services
        if cfg.with_sim:
            services = _start_sim(stack, cfg, store)
        for c in (ingest, api):
            assert c.url is not None
            stack.wait_ready(c, c.url + "/healthz")
        if services:
            stack.start("scheduler", _cli(
                "snapshot", "schedule", "--store", store, "--services", services,
                "--every", cfg.every, *now))
        print(f"timetravel up: store {store}", file=out)
        for c in stack.children:
            if c.url:
                print(f"  {c.name:<10} {c.url}", file=out)
        if services:
            print(f"  scheduler  every {cfg.every}, services {services}", file=out)
        print(f"  logs       {run_dir}", file=out)
        print("Press Ctrl-C to stop.", file=out, flush=True)
        while not stopping["signal"]:
            dead = stack.dead()
            if dead is not None:
                print(f"timetravel up: {dead.name} exited with {dead.proc.returncode}; "
                      f"stopping (see {dead.log})", file=sys.stderr)
                return 1
            time.sleep(0.2)
        print("timetravel up: stopping", file=out, flush=True)
        return 0
    finally:
        stack.stop()
        for s, h in old.items():
            signal.signal(s, h)


def _start_moto(stack: Stack, port: int) -> str:
    moto = Path(sys.executable).with_name("moto_server")
    if not moto.exists():
        raise UpError("--s3 needs moto's server (install the dev extra: pip install -e '.[dev]')")
    child = stack.start("s3", [str(moto), "-H", "127.0.0.1", "-p", str(port)],
                        url=f"http://127.0.0.1:{port}")
    stack.wait_ready(child, f"http://127.0.0.1:{port}/moto-api/")
    stack.env.update({
        "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
        "AWS_ACCESS_KEY_ID": stack.env.get("AWS_ACCESS_KEY_ID", "testing"),
        "AWS_SECRET_ACCESS_KEY": stack.env.get("AWS_SECRET_ACCESS_KEY", "testing"),
        "AWS_DEFAULT_REGION": stack.env.get("AWS_DEFAULT_REGION", "us-east-1"),
    })
    req = urllib.request.Request(f"http://127.0.0.1:{port}/timetravel", method="PUT")
    with urllib.request.urlopen(req, timeout=10):
        pass
    return "s3://timetravel/data"


def _start_sim(stack: Stack, cfg: UpConfig, store: str) -> str:
    sim_url = f"http://127.0.0.1:{cfg.sim_port}"
    argv = [sys.executable, "-m", "simworld", "serve", "--port", str(cfg.sim_port),
            "--members", str(cfg.sim_members), "--rate", str(cfg.sim_rate)]
    if cfg.now:
        argv += ["--now", cfg.now]
    child = stack.start("sim", argv, url=sim_url)
    stack.wait_ready(child, sim_url + "/healthz")
    toml = stack.run_once("sim-toml", [sys.executable, "-m", "simworld", "toml", "--url", sim_url])
    services = stack.run_dir / "services.toml"
    services.write_text(toml)
    population = stack.run_dir / "population.parquet"
    with urllib.request.urlopen(sim_url + "/v1/population?format=parquet", timeout=60) as r:
        population.write_bytes(r.read())
    now = ["--now", cfg.now] if cfg.now else []
    stack.run_once("select", _cli(
        "snapshot", "select", "--store", store, "--population", str(population),
        "--entity", "member_id", "--strata", "region,device",
        "--n", str(min(cfg.sample_n, cfg.sim_members)), *now))
    return str(services)
