"""The simulated world: deterministic truth, services that answer with it, faults, counters."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
import tomllib
import urllib.error
import urllib.request
from collections import Counter

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq
import pytest

from simworld import (
    ACTIVITY_LEVELS,
    GENRES,
    TENURE_BUCKETS,
    SimClock,
    World,
    running_world,
    services_toml,
    spawn_world,
)
from simworld._services import window_figures
from simworld._world import RECENT_PLAYS
from snapshotter import parse_services
from ttstore import US_PER_DAY, format_timestamp, parse_timestamp

T0 = parse_timestamp("2026-11-01T00:00:00Z", field="t0")
MEMBERS = 500


def _digest(world: World, members: list[int], times: list[int]) -> str:
    h = hashlib.sha256()
    for t in times:
        for f in (world.profiles, world.viewing_histories, world.my_lists):
            h.update(json.dumps(f(members, t), sort_keys=True).encode())
    h.update(world.population(times[0]).to_pandas().to_json().encode())
    return h.hexdigest()


def _get(url: str) -> tuple[int, object]:
    try:
        with urllib.request.urlopen(url, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _post(url: str, body: object) -> tuple[int, object]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


# -- the truth --------------------------------------------------------------------------------


def test_world_is_deterministic_across_instances_and_processes() -> None:
    members = [1, 2, 42, 499, 500]
    times = [T0, T0 + 3 * US_PER_DAY + 12345]
    a = World(seed=11, members=MEMBERS, start_us=T0)
    b = World(seed=11, members=MEMBERS, start_us=T0)
    other = World(seed=12, members=MEMBERS, start_us=T0)
    assert _digest(a, members, times) == _digest(b, members, times)
    assert _digest(a, members, times) != _digest(other, members, times)
    code = (
        "import sys; sys.path.insert(0, '.');"
        "from tests.test_simworld import _digest, T0, MEMBERS; from simworld import World;"
        "from ttstore import US_PER_DAY;"
        f"print(_digest(World(seed=11, members=MEMBERS, start_us=T0), {members!r}, "
        f"[T0, T0 + 3 * US_PER_DAY + 12345]))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == _digest(a, members, times)


def test_one_member_alone_equals_the_same_member_in_a_batch() -> None:
    w = World(seed=3, members=MEMBERS, start_us=T0)
    t = T0 + 5 * US_PER_DAY
    batch = [7, 0, 42, 42, 499, 10_000]
    for single, many in ((w.profile, w.profiles), (w.viewing_history, w.viewing_histories),
                         (w.my_list, w.my_lists)):
        assert many(batch, t) == [single(m, t) for m in batch]
    assert w.profile(0, t) is None and w.my_list(501, t) is None
    assert w.viewing_history(-3, t) is None


def test_whole_populations_are_answered_in_chunks_with_the_same_answers() -> None:
    w = World(seed=8, members=4500, start_us=T0)
    ids = np.arange(1, 4501)
    t = T0 + 3 * US_PER_DAY
    for many in (w.viewing_histories, w.my_lists):
        whole = many(ids, t)
        parts = [a for lo in range(0, 4500, 1000) for a in many(ids[lo:lo + 1000], t)]
        assert whole == parts and all(a is not None for a in whole)


def test_viewing_history_is_the_plays_of_the_last_30_days() -> None:
    """Brute force: re-aggregate the world's plays in plain Python and compare."""
    w = World(seed=5, members=MEMBERS, start_us=T0)
    t = T0 + 2 * US_PER_DAY + 7
    members = list(range(1, 60))
    table = w.plays_table(members, t - 30 * US_PER_DAY + 1, t + 1).to_pylist()
    by_member: dict[int, list[dict]] = {m: [] for m in members}
    for row in table:
        by_member[row["member_id"]].append(row)
    active = 0
    for m in members:
        plays = sorted(by_member[m], key=lambda r: r["played_at"])
        h = w.viewing_history(m, t)
        assert h is not None
        assert h["plays_30d"] == len(plays)
        assert h["seconds_30d"] == pytest.approx(sum(p["seconds"] for p in plays), abs=0.06)
        week = [p for p in plays if p["played_at"].timestamp() * 1e6 > t - 7 * US_PER_DAY]
        assert h["seconds_7d"] == pytest.approx(sum(p["seconds"] for p in week), abs=0.06)
        newest = plays[::-1][:RECENT_PLAYS]
        assert [r["video_id"] for r in h["recent"]] == [p["video_id"] for p in newest]
        assert [r["played_at"] for r in h["recent"]] == [
            p["played_at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ") for p in newest
        ]
        if plays:
            active += 1
            secs = Counter()
            for p in plays:
                secs[p["genre"]] += p["seconds"]
            best = max(secs.values())
            assert h["top_genre_30d"] == min(g for g, s in secs.items() if s == best)
            assert h["genre_seconds_30d"].keys() == {g for g, s in secs.items() if s >= 0.05}
            for g, s in h["genre_seconds_30d"].items():
                assert s == pytest.approx(secs[g], abs=0.06)
            assert h["last_played_at"] == h["recent"][0]["played_at"]
        else:
            assert h["top_genre_30d"] is None and h["last_played_at"] is None
            assert h["genre_seconds_30d"] == {} and h["recent"] == []
    assert active > 20  # the check is not vacuous


def test_state_evolves_with_time_and_never_shows_the_future() -> None:
    w = World(seed=9, members=MEMBERS, start_us=T0)
    members = list(range(1, 201))
    t1, t2 = T0, T0 + 10 * US_PER_DAY
    h1, h2 = w.viewing_histories(members, t1), w.viewing_histories(members, t2)
    l1, l2 = w.my_lists(members, t1), w.my_lists(members, t2)
    p1, p2 = w.profiles(members, t1), w.profiles(members, t2)
    assert sum(a != b for a, b in zip(h1, h2, strict=True)) > 100
    assert sum(a["video_ids"] != b["video_ids"] for a, b in zip(l1, l2, strict=True)) > 10
    assert all(b["tenure_days"] == a["tenure_days"] + 10 for a, b in zip(p1, p2, strict=True))
    assert any(a["device"] != b["device"] or a["plan"] != b["plan"]
               for a, b in zip(p1, p2, strict=True))
    limit = format_timestamp(t2)
    for h in h2:
        assert all(r["played_at"] <= limit for r in h["recent"])
    for lst in l2:
        assert all(it["added_at"] <= limit for it in lst["items"])
        assert lst["size"] == len(lst["items"]) == len(set(lst["video_ids"]))
        assert sorted(lst["items"], key=lambda it: it["added_at"], reverse=True) == lst["items"]
    # A play at t2 + 1h is not in the history at t2, and is at t2 + 1h.
    later = w.plays_table(members, t2 + 1, t2 + 3600 * 10**6 + 1).to_pylist()
    assert later, "some member plays within the hour"
    m, at = later[0]["member_id"], later[0]["played_at"].strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    assert at in [r["played_at"] for r in w.viewing_history(m, t2 + 3600 * 10**6)["recent"]]
    assert at not in [r["played_at"] for r in w.viewing_history(m, t2)["recent"]]


def test_population_has_every_member_and_strata() -> None:
    w = World(seed=1, members=MEMBERS, start_us=T0)
    pop = w.population(T0)
    assert pop.column("member_id").to_pylist() == list(range(1, MEMBERS + 1))
    assert set(pop.column("activity_level").to_pylist()) == set(ACTIVITY_LEVELS)
    assert set(pop.column("tenure_bucket").to_pylist()) <= set(TENURE_BUCKETS)
    assert len(set(pop.column("tenure_bucket").to_pylist())) >= 3
    profiles = w.profiles(list(range(1, MEMBERS + 1)), T0)
    assert pop.column("device").to_pylist() == [p["device"] for p in profiles]
    assert pop.column("tenure_days").to_pylist() == [p["tenure_days"] for p in profiles]
    cat = w.catalog()
    assert set(cat.column("genre").to_pylist()) == set(GENRES)


def test_window_figures_match_brute_force() -> None:
    rng = np.random.default_rng(0)
    ts = 1_000_000 + np.sort(rng.uniform(0, 5, 300))
    f = window_figures(ts)
    brute = max(int(((ts >= t) & (ts < t + 1)).sum()) for t in ts)
    assert f["max_started_in_any_1s"] == brute
    per_s = Counter(int(np.floor(t)) for t in ts)
    assert f["started_per_s"] == {str(k): v for k, v in per_s.items()}


# -- the services -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_server():
    w = World(seed=21, members=MEMBERS, start_us=T0)
    with running_world(w, clock=SimClock(T0 + US_PER_DAY), fault_seed=1) as rw:
        yield w, rw


def test_services_answer_with_the_truth_at_the_sim_now(world_server) -> None:
    w, rw = world_server
    rw.control.set_faults("*", error_rate=0.0, down=False, timeout_rate=0.0)
    for now in (T0 + US_PER_DAY, T0 + 4 * US_PER_DAY + 99):
        rw.control.set_now(now)
        assert rw.control.now_us() == now
        truth = {"viewing_history": w.viewing_histories, "my_list": w.my_lists,
                 "profile": w.profiles}
        ids = [1, 17, 42, 500]
        for service, f in truth.items():
            expected = f(ids, now)
            got = [_get(f"{rw.url}/v1/{service}/{m}") for m in ids]
            assert got == [(200, e) for e in expected]
            status, body = _post(f"{rw.url}/v1/{service}:batchGet",
                                 {"ids": [*ids, 0, 501, "42", "x"]})
            assert status == 200
            assert body["results"] == {**{str(m): e for m, e in zip(ids, expected, strict=True)}}
            for bad in ("0", "501", "abc", "-1"):
                code, err = _get(f"{rw.url}/v1/{service}/{bad}")
                assert code == 404 and err["error"]["code"] == "not_found"


def test_clock_advance_and_population_formats(world_server) -> None:
    w, rw = world_server
    rw.control.set_now(T0)
    now = rw.control.advance("36h")
    assert now == T0 + 36 * 3600 * 10**6
    assert _get(f"{rw.url}/v1/profile/9") == (200, w.profile(9, now))
    expected = w.population(now)
    pq_table = pq.read_table(io.BytesIO(rw.control.population_bytes("parquet")))
    assert pq_table.equals(expected)
    csv = pacsv.read_csv(io.BytesIO(rw.control.population_bytes("csv")))
    assert csv.column("member_id").to_pylist() == expected.column("member_id").to_pylist()
    assert csv.column("region").to_pylist() == expected.column("region").to_pylist()
    rows = json.loads(rw.control.population_bytes("json"))["rows"]
    assert pa.Table.from_pylist(rows).column("device").to_pylist() == expected.column(
        "device").to_pylist()
    assert _post(f"{rw.url}/_sim/clock", {"bogus": 1})[0] == 400
    assert _post(f"{rw.url}/_sim/faults", {"service": "nope", "down": True})[0] == 400


def test_faults_error_rate_down_and_counters(world_server) -> None:
    w, rw = world_server
    rw.control.set_faults("*", error_rate=0.0, down=False, timeout_rate=0.0)
    rw.control.set_faults("my_list", error_rate=0.3)
    rw.control.reset_stats()
    codes = Counter(_get(f"{rw.url}/v1/my_list/{1 + i % MEMBERS}")[0] for i in range(400))
    assert set(codes) == {200, 500}
    assert 0.2 <= codes[500] / 400 <= 0.4  # binomial(400, 0.3): ±4.4 sd
    rw.control.set_faults("profile", down=True)
    status, body = _get(f"{rw.url}/v1/profile/3")
    assert status == 503 and body["error"]["code"] == "unavailable"
    assert _post(f"{rw.url}/v1/profile:batchGet", {"ids": [1, 2]})[0] == 503
    stats = rw.control.stats()["services"]
    assert stats["my_list"]["requests"] == 400
    assert stats["my_list"]["by_status"] == {str(k): v for k, v in sorted(codes.items())}
    assert stats["profile"]["requests"] == 2 and stats["profile"]["batch_requests"] == 1
    assert sum(stats["my_list"]["started_per_s"].values()) == 400
    rw.control.set_faults("*", error_rate=0.0, down=False)
    assert _get(f"{rw.url}/v1/profile/3") == (200, w.profile(3, rw.control.now_us()))


def test_per_entity_gets_in_flight_share_truth_calls_and_get_the_truth(world_server) -> None:
    """Concurrent GETs within their simulated latency are answered from one truth call over the
    requests waiting then; each still gets its own member's truth, after its own latency, and
    requests that fault or are given up on mid-latency do not disturb the others."""
    import asyncio
    import time

    import aiohttp

    w, rw = world_server
    now = rw.control.now_us()
    coalescer = rw.state.coalescers["profile"]
    calls: list[int] = []
    truth = coalescer.truth

    def counting(world, members, t_us):
        calls.append(len(members))
        return truth(world, members, t_us)

    coalescer.truth = counting
    ids = [1 + (i * 37) % MEMBERS for i in range(60)]
    try:
        # a spread of latencies: answers fall due one or two at a time, not all together
        rw.control.set_faults("profile", latency_median_ms=100.0, latency_p99_ms=400.0,
                              error_rate=0.0)

        async def main() -> tuple[list[tuple[int, object]], float]:
            async with aiohttp.ClientSession() as s:
                async def one(m: int) -> tuple[int, object]:
                    async with s.get(f"{rw.url}/v1/profile/{m}") as r:
                        return r.status, await r.json()

                async def given_up(m: int) -> None:  # the client's timeout, mid-latency
                    with pytest.raises(asyncio.TimeoutError):
                        await asyncio.wait_for(one(m), 0.01)

                t0 = time.perf_counter()
                got = await asyncio.gather(*(one(m) for m in ids), given_up(5))
                return list(got[:-1]), time.perf_counter() - t0

        got, elapsed = asyncio.run(main())
        assert got == [(200, a) for a in w.profiles(ids, now)]
        assert elapsed >= 0.1  # the latency still applies (the median is 100 ms)
        assert sum(calls) <= len(ids) + 1 and len(calls) <= 10

        rw.control.set_faults("profile", error_rate=1.0)  # answered 500 after the truth ran
        assert _get(f"{rw.url}/v1/profile/3")[0] == 500
        rw.control.set_faults("profile", error_rate=0.0, latency_median_ms=0.0,
                              latency_p99_ms=None)
        assert _get(f"{rw.url}/v1/profile/3") == (200, w.profile(3, now))
    finally:
        coalescer.truth = truth
        rw.control.set_faults("profile", latency_median_ms=0.0, latency_p99_ms=None,
                              error_rate=0.0)


def test_services_toml_is_a_valid_services_config(world_server) -> None:
    _, rw = world_server
    services = parse_services(tomllib.loads(rw.services_toml(max_qps=50)))
    assert sorted(services) == ["my_list", "profile", "viewing_history"]
    assert services["profile"].entity_url(7) == f"{rw.url}/v1/profile/7"
    assert services["profile"].batch_url == f"{rw.url}/v1/profile:batchGet"
    assert services["profile"].max_qps == 50
    plain = parse_services(tomllib.loads(services_toml(rw.url, batch=False)))
    assert all(s.batch_url is None and s.max_qps is None for s in plain.values())


def test_world_in_its_own_process_answers_with_the_same_truth() -> None:
    w = World(seed=4, members=300, start_us=T0)
    with spawn_world(seed=4, members=300, now_us=T0,
                     faults={"my_list": {"down": True}}) as proc:
        assert _get(f"{proc.url}/v1/viewing_history/12") == (200, w.viewing_history(12, T0))
        assert _get(f"{proc.url}/v1/my_list/12")[0] == 503
        proc.control.advance("1d")
        assert _get(f"{proc.url}/v1/profile/12") == (200, w.profile(12, T0 + US_PER_DAY))
        process = proc.process
    assert process is not None and process.returncode == 0  # stopped cleanly by SIGTERM
    out = subprocess.run(
        [sys.executable, "-m", "simworld", "toml", "--url", proc.url, "--no-batch",
         "--max-qps", "7"], capture_output=True, text=True, check=True,
    )
    services = parse_services(tomllib.loads(out.stdout))
    assert {s.url for s in services.values()} == {
        f"{proc.url}/v1/{name}/{{entity_id}}" for name in ("viewing_history", "my_list", "profile")
    }
    assert all(s.max_qps == 7 and s.batch_url is None for s in services.values())


def test_latency_draws_have_the_configured_median_and_p99() -> None:
    import random

    from simworld import Faults

    rng = random.Random(5)
    lognormal = Faults(latency_median_ms=5.0, latency_p99_ms=20.0)
    ms = np.array([lognormal.latency_s(rng) for _ in range(40_000)]) * 1e3
    assert abs(float(np.median(ms)) - 5.0) < 0.2
    assert abs(float(np.percentile(ms, 99)) - 20.0) < 1.5
    assert ms.min() > 0
    assert Faults(latency_median_ms=3.0).latency_s(rng) == 0.003  # no p99: constant
    assert Faults().latency_s(rng) == 0.0
