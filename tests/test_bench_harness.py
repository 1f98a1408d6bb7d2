"""The benchmark harness's bookkeeping: ratios, targets, formatting, and that a failing module is
a row of the report rather than the end of the run. (The benchmarks themselves are not tests.)"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from bench import Result, Target, at_least, at_most, ratio_at_least, ratio_at_most
from bench.__main__ import BENCH_DIR, discover, main, spawn
from bench._types import fmt_value


def test_ratio_and_targets() -> None:
    r = Result("log()", 700_000, "facts/s", baseline=200_000, baseline_name="JSON lines",
               target=ratio_at_least(3.0, stretch=1_000_000))
    assert r.ratio == pytest.approx(3.5)
    assert r.met is True
    assert r.target is not None and r.target.stretch_met(r.value) is False
    assert Result("x", 500_000, "facts/s", baseline=200_000, target=ratio_at_least(3)).met is False
    assert Result("p99", 4.9, "µs", target=at_most(5.0)).met is True
    assert Result("p99", 5.1, "µs", target=at_most(5.0)).met is False
    assert Result("t", 2.0, "s", baseline=1.0, target=ratio_at_most(1.5)).met is False
    assert Result("b", 1e7, "facts/s", target=at_least(1e7)).met is True
    # No baseline: no ratio, and a ratio target cannot be judged.
    lone = Result("x", 1.0, "s", target=ratio_at_least(2))
    assert lone.ratio is None and lone.met is None
    assert Result("x", 1.0, "s", baseline=0.0).ratio is None
    assert Result("x", 1.0, "s").met is None
    assert Result("x", math.nan, "s", target=at_most(1)).met is None


def test_json_round_trip() -> None:
    r = Result("log()", 700_000.0, "facts/s", baseline=200_000.0, baseline_name="JSON lines",
               target=ratio_at_least(3.0, stretch=1e6), note="n")
    d = json.loads(json.dumps(r.to_json()))
    assert d["ratio"] == pytest.approx(3.5) and d["met"] is True
    assert d["target"]["text"] == "≥ 3× baseline (stretch ≥ 1M facts/s)"
    assert d["target"]["stretch_met"] is False
    assert Result.from_json(d) == r


def test_formatting() -> None:
    assert fmt_value(3_410_000, "facts/s") == "3.41M facts/s"
    assert fmt_value(204_000, "facts/s") == "204k facts/s"
    assert fmt_value(0.601, "µs") == "0.601 µs"
    assert fmt_value(6162.4, "µs") == "6,162 µs"
    assert fmt_value(None, "s") == "—"
    assert fmt_value(math.nan, "s") == "n/a"
    assert Target("<=", 5.0).describe("µs") == "≤ 5 µs"
    assert at_least(1e7).describe("facts/s") == "≥ 10M facts/s"


def test_discover_finds_the_bench_modules() -> None:
    names = discover()
    assert "factlog" in names
    assert names == sorted(names)
    for n in names:
        assert (BENCH_DIR / f"{n}_bench.py").is_file()


def test_a_failing_module_is_reported_not_raised() -> None:
    run = spawn("no_such_module_for_tests", quick=True, timeout_s=60)
    assert not run.ok and run.results == []
    assert "ModuleNotFoundError" in run.error


def test_a_failed_module_makes_the_run_exit_1(tmp_path: Path, monkeypatch) -> None:
    import bench.__main__ as harness

    monkeypatch.setattr(harness, "discover", lambda: ["no_such_module_for_tests"])
    out = tmp_path / "r.json"
    assert main(["--quick", "--out", str(out)]) == 1
    report = json.loads(out.read_text())
    assert [m["ok"] for m in report["modules"]] == [False]


def test_unknown_module_names_are_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["--only", "nope", "--out", str(tmp_path / "r.json")])
    assert exc.value.code == 2
    assert not (tmp_path / "r.json").exists()


def test_load_generator_answers_and_send_lateness() -> None:
    """The API benchmark's load generator, open loop against a canned HTTP server: every
    answer is counted, and each request's send time after its schedule is reported."""
    import asyncio

    from bench._loadgen import run, run_load

    body = b'{"features": {}}'
    answer = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body)

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while await reader.readuntil(b"\r\n\r\n"):
                writer.write(answer)
                await writer.drain()
        except asyncio.IncompleteReadError:  # the generator closed its connection
            pass
        finally:
            writer.close()

    async def main() -> dict[str, object]:
        server = await asyncio.start_server(handle, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        req = f"GET / HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n\r\n".encode()
        try:
            return await run_load("127.0.0.1", port, [req] * 40, rate=400,
                                  ok=lambda status, b: status == 200 and b == body)
        finally:
            server.close()
            await server.wait_closed()

    res = run(main())
    lat, late = res["lat_ns"], res["late_ns"]
    assert isinstance(lat, list) and isinstance(late, list)
    assert res["errors"] == {} and len(lat) == len(late) == 40
    assert min(lat) > 0 and min(late) >= 0


def test_tree_rss_sampler_adds_up_a_process_and_its_children() -> None:
    """The PIT bench's peak RSS: a process holding 120 MB whose child holds 80 MB at the same
    time reads as about 200 MB (their own ru_maxrss would give 120 and 80)."""
    import subprocess
    import sys

    from bench._support import TreeRssSampler

    hold = ("import sys, time; b = bytearray({mb} << 20); b[::4096] = b'x' * len(b[::4096]); "
            "{then}; time.sleep(1.0)")
    grandchild = hold.format(mb=80, then="pass")
    child = hold.format(mb=120, then=f"import subprocess; p = subprocess.Popen([sys.executable, "
                                     f"'-c', {grandchild!r}])") + "; p.wait()"
    proc = subprocess.Popen([sys.executable, "-c", child])
    with TreeRssSampler(proc.pid, interval_s=0.02) as sampler:
        assert proc.wait(60) == 0
    if sys.platform != "linux":
        assert sampler.peak_mb is None
        return
    assert sampler.peak_mb is not None and 200 <= sampler.peak_mb < 400


def test_bare_aiohttp_pair_sends_every_request_and_fails_loudly() -> None:
    """The snapshot benchmark's ceiling: the bare client sends each context's request to every
    service (one GET each, or one POST per batch) and refuses an answer that is not a 200."""
    import asyncio

    from aiohttp import web

    from bench._bare_http import _app, _fetch, bare_contexts_per_s

    bodies = {"a": (b'{"x": 1}', b'{"results": {}}'), "b": (b'{"y": 2}', b'{"results": {}}')}
    seen: list[tuple[str, str]] = []

    async def count(request: web.Request, response: web.StreamResponse) -> None:
        seen.append((request.method, request.path))

    async def main(services: list[str], batch: int | None) -> None:
        app = _app(bodies)
        app.on_response_prepare.append(count)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            await _fetch(f"http://127.0.0.1:{port}", services, 30, batch=batch, concurrency=4)
        finally:
            await runner.cleanup()

    asyncio.run(main(["a", "b"], None))
    assert sorted(seen) == sorted(("GET", f"/v1/{s}/{i}") for s in "ab" for i in range(1, 31))
    seen.clear()
    asyncio.run(main(["a", "b"], 10))
    assert sorted(seen) == [("POST", "/v1/a:batchGet")] * 3 + [("POST", "/v1/b:batchGet")] * 3
    with pytest.raises(ExceptionGroup) as failed:
        asyncio.run(main(["a", "c"], None))
    assert failed.group_contains(RuntimeError, match="answered 404")
    # In two processes, as the benchmark measures it.
    assert bare_contexts_per_s(bodies, 50) > 0
