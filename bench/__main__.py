"""Run every ``bench/*_bench.py`` module, print one table, write ``bench/results.json``.

    python -m bench [--quick] [--only factlog,pit] [--out bench/results.json]

Each module runs in its own process (``python -m bench --run-module NAME``), so a module that
fails, hangs or exhausts memory is a row in the table, not the end of the run, and peak-RSS
figures are each module's own. ``--quick`` shrinks every module's data (modules decide how) and
gives the whole run a budget of under two minutes; a module still running when the budget is
spent is stopped and reported as timed out.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import pkgutil
import platform
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from ._types import Result, fmt_value

BENCH_DIR = Path(__file__).resolve().parent
QUICK_BUDGET_S = 115.0
FULL_MODULE_TIMEOUT_S = 3600.0


@dataclass
class ModuleRun:
    name: str
    ok: bool
    seconds: float
    results: list[Result] = field(default_factory=list)
    error: str = ""


def discover() -> list[str]:
    """Module names (without ``_bench``) of every ``bench/*_bench.py``, sorted."""
    return sorted(
        m.name[: -len("_bench")]
        for m in pkgutil.iter_modules([str(BENCH_DIR)])
        if m.name.endswith("_bench") and not m.name.startswith("_")
    )


# --- the child: one module ----------------------------------------------------------------


def run_module(name: str, quick: bool, result_file: str) -> int:
    """Import ``bench.<name>_bench``, call ``run(quick)``, write the results as JSON."""
    try:
        mod = importlib.import_module(f"bench.{name}_bench")
        fn = getattr(mod, "run", None)
        if not callable(fn):
            raise TypeError(f"bench/{name}_bench.py has no run(quick: bool) -> list[Result]")
        results = fn(quick)
        if not isinstance(results, list) or not all(isinstance(r, Result) for r in results):
            raise TypeError(f"bench/{name}_bench.py: run() must return a list of bench.Result")
    except BaseException as exc:  # reported to the parent; the harness goes on
        traceback.print_exc()
        err = f"{type(exc).__name__}: {exc}".strip().splitlines()
        Path(result_file).write_text(json.dumps({"error": err[0] if err else "error"}))
        return 1
    Path(result_file).write_text(json.dumps({"results": [r.to_json() for r in results]}))
    return 0


# --- the parent ---------------------------------------------------------------------------


def spawn(name: str, quick: bool, timeout_s: float) -> ModuleRun:
    t0 = time.perf_counter()
    with tempfile.NamedTemporaryFile(prefix=f"bench-{name}-", suffix=".json",
                                     delete=False) as fh:
        result_file = fh.name
    cmd = [sys.executable, "-m", "bench", "--run-module", name, "--result-file", result_file]
    if quick:
        cmd.append("--quick")
    print(f"── {name}_bench (timeout {timeout_s:.0f} s) ──", file=sys.stderr, flush=True)
    # Progress goes to stderr; stdout stays for the one table. A new session lets a timeout stop
    # the module and whatever servers it started, and nothing else.
    proc = subprocess.Popen(cmd, stdout=sys.stderr, stderr=sys.stderr, start_new_session=True,
                            cwd=BENCH_DIR.parent)
    try:
        rc = proc.wait(timeout=max(timeout_s, 1.0))
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        Path(result_file).unlink(missing_ok=True)
        return ModuleRun(name, False, time.perf_counter() - t0,
                         error=f"timed out after {timeout_s:.0f} s")
    seconds = time.perf_counter() - t0
    try:
        payload: dict[str, Any] = json.loads(Path(result_file).read_text() or "{}")
    except (OSError, ValueError):
        payload = {}
    finally:
        Path(result_file).unlink(missing_ok=True)
    if rc != 0 or "results" not in payload:
        err = payload.get("error") or f"exited with status {rc}"
        return ModuleRun(name, False, seconds, error=str(err))
    return ModuleRun(name, True, seconds,
                     results=[Result.from_json(r) for r in payload["results"]])


def machine() -> dict[str, Any]:
    import numpy  # noqa: PLC0415
    import pyarrow  # noqa: PLC0415

    info: dict[str, Any] = {
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "memory_gb": None,
        "cpu_model": platform.processor() or platform.machine(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "pyarrow": pyarrow.__version__,
        "numpy": numpy.__version__,
        # Other work on the machine skews the figures; the load says how much there was.
        "load_avg_1m": round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None,
    }
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["memory_gb"] = round(int(line.split()[1]) / 1024 / 1024, 1)
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu_model"] = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return info


def git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def _mark(ok: bool | None) -> str:
    return {True: "[green]yes[/]", False: "[red]NO[/]", None: "—"}[ok]


def print_table(runs: list[ModuleRun], quick: bool, info: dict[str, Any]) -> None:
    from rich.console import Console  # noqa: PLC0415
    from rich.table import Table  # noqa: PLC0415

    title = (f"Timetravel benchmarks{' (quick)' if quick else ''}: {info['cpu_model']}, "
             f"{info['cores']} cores, {info['memory_gb']} GB, Python {info['python']}, "
             f"load {info['load_avg_1m_at_start']} → {info['load_avg_1m']}")
    table = Table(title=title, show_lines=False)
    table.add_column("bench")
    table.add_column("metric", overflow="fold")
    for col in ("value", "baseline", "value/baseline"):
        table.add_column(col, justify="right")
    table.add_column("target")
    table.add_column("met")
    table.add_column("note", overflow="fold", style="dim")
    for run in runs:
        if not run.ok:
            table.add_row(run.name, f"[red]FAILED[/] ({run.seconds:.0f} s)", "", "", "", "",
                          _mark(False), run.error)
            continue
        for r in run.results:
            base = "—" if r.baseline is None else fmt_value(r.baseline, r.unit)
            if r.baseline_name and r.baseline is not None:
                base += f" ({r.baseline_name})"
            ratio = "—" if r.ratio is None else f"{r.ratio:.2f}×"
            target = "—" if r.target is None else r.target.describe(r.unit)
            met = _mark(r.met)
            if r.target is not None and r.target.stretch is not None:
                met += f", stretch {_mark(r.target.stretch_met(r.value))}"
            table.add_row(run.name, r.metric, fmt_value(r.value, r.unit), base, ratio, target,
                          met, r.note)
    width = None if sys.stdout.isatty() else 220
    Console(width=width).print(table)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small data, under two minutes")
    ap.add_argument("--only", default="", help="comma-separated module names (e.g. factlog)")
    ap.add_argument("--out", default=str(BENCH_DIR / "results.json"), help="results file")
    ap.add_argument("--timeout-s", type=float, default=None,
                    help="per-module limit (default: the quick budget, or 1 h each)")
    ap.add_argument("--run-module", help=argparse.SUPPRESS)
    ap.add_argument("--result-file", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.run_module:
        return run_module(args.run_module, args.quick, args.result_file)

    names = discover()
    if args.only:
        wanted = [n.strip().removesuffix("_bench") for n in args.only.split(",") if n.strip()]
        unknown = sorted(set(wanted) - set(names))
        if unknown:
            ap.error(f"no bench module named {', '.join(unknown)}; have {', '.join(names)}")
        names = [n for n in names if n in wanted]
    started = datetime.now(UTC)
    load_at_start = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    deadline = time.monotonic() + QUICK_BUDGET_S if args.quick else None
    runs: list[ModuleRun] = []
    for name in names:
        if args.timeout_s is not None:
            limit = args.timeout_s
        elif deadline is not None:
            limit = deadline - time.monotonic()
        else:
            limit = FULL_MODULE_TIMEOUT_S
        if limit <= 1.0:
            runs.append(ModuleRun(name, False, 0.0, error="not run: the quick budget was spent"))
            continue
        runs.append(spawn(name, args.quick, limit))
    info = machine()
    info["load_avg_1m_at_start"] = load_at_start
    print_table(runs, args.quick, info)
    report = {
        "date": started.isoformat(timespec="seconds").replace("+00:00", "Z"),
        "quick": args.quick,
        "git_commit": git_commit(),
        "machine": info,
        "modules": [{"name": r.name, "ok": r.ok, "seconds": round(r.seconds, 2),
                     "error": r.error or None} for r in runs],
        "results": [{"module": r.name, **res.to_json()} for r in runs for res in r.results],
    }
    Path(args.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n")
    failed = [r.name for r in runs if not r.ok]
    total = sum(r.seconds for r in runs)
    print(f"{len(runs)} module(s) in {total:.0f} s; results in {args.out}"
          + (f"; FAILED: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0  # a module that crashed or found wrong answers; missed targets: 0


if __name__ == "__main__":
    sys.exit(main())
