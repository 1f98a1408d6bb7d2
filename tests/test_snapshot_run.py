"""Snapshot runs with in-process services: staging, manifest, idempotency, resume, shards, and
what an external reader (pyarrow reading the directory) can see."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pytest

from snapshotter._commit import put_manifest
from snapshotter._errors import RunAlreadyCommitted, RunConflict, RunInterrupted
from snapshotter._manifest import load_manifest, pending_runs
from snapshotter._reader import SnapshotReader
from snapshotter._run import SnapshotRunner, parse_shard
from snapshotter._runcli import list_runs
from snapshotter._select import select_contexts
from snapshotter._selections import save_selection
from snapshotter._stage import LocalFetcher, shard_indices, stable_hash
from ttstore import US_PER_S, ManualClock, Store, format_timestamp, parse_timestamp

T0 = parse_timestamp("2026-11-20T12:00:00Z", field="t")


class Config:
    """What the runner reads of a service's configuration."""

    def __init__(self, name: str, entity_type: str = "int64", max_staleness: str = "48h"):
        self.name = name
        self.entity_type = entity_type
        self.max_staleness = max_staleness

    def public_json(self) -> dict:
        return {"entity_type": self.entity_type, "max_staleness": self.max_staleness,
                "url": f"local://{self.name}"}


def make_selection(store, n_pop: int, n: int, *, at_us: int = T0 - 3600 * US_PER_S) -> str:
    ids = np.arange(1, n_pop + 1, dtype=np.int64) * 7
    pop = pa.table({"entity_id": ids, "region": pa.array(np.where(ids % 3 == 0, "eu", "us"))})
    cs = select_contexts(pop, n=n, selected_at_us=at_us, strata=["region"], seed=1)
    return save_selection(store, cs, report=False, clock=ManualClock(at_us))


def history(e: int) -> dict | None:
    if e % 11 == 0:
        return None  # not found
    if e % 13 == 0:
        raise ConnectionError("boom")
    return {"views": e % 17, "score": e / 2, "tag": f"t{e % 5}", "list": [e]}


class Fleet:
    """In-process services; counts the entities each one was asked for."""

    def __init__(self, answers):
        self.answers = answers
        self.fetchers: list[tuple[str, LocalFetcher]] = []
        self.qps_shares: list[float] = []
        self.lock = threading.Lock()

    def factory(self, config, qps_share):
        f = LocalFetcher(self.answers[config.name])
        with self.lock:
            self.fetchers.append((config.name, f))
            self.qps_shares.append(qps_share)
        return f

    def requested(self, name: str) -> int:
        return sum(f.requested for n, f in self.fetchers if n == name)


def runner(store, fleet, *, clock=None, chunk_size=10, on_chunk=None, stop=None):
    services = {name: Config(name) for name in fleet.answers}
    return SnapshotRunner(store, services, clock=clock or ManualClock(T0 + 60 * US_PER_S),
                          fetcher_factory=fleet.factory, chunk_size=chunk_size,
                          on_chunk=on_chunk, stop=stop)


def external_rows(store, service: str | None = None) -> int:
    """Rows that pyarrow sees reading ``snapshots/runs`` directly, as any outside tool would."""
    fs, root = store.arrow_filesystem()
    base = f"{root}/snapshots/runs" + (f"/service={service}" if service else "")
    try:
        info = fs.get_file_info(base)
    except OSError:
        return 0
    if info.type.name == "NotFound":
        return 0
    return ds.dataset(base, filesystem=fs, format="parquet", partitioning="hive").count_rows()


def test_a_crash_while_writing_the_commit_leaves_nothing_for_external_readers(store,
                                                                            monkeypatch):
    """Killed after the run's objects are written but before its manifest (the commit point):
    every object is under _publish, so pyarrow reading the directory sees nothing, nor does our
    reader; the next run of the slot rolls the commit forward and publishes."""
    from snapshotter import _commit

    make_selection(store, 400, 95)
    fleet = Fleet({"history": history, "profile": lambda e: {"age": e % 90}})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt  # the process dies at the commit point

    monkeypatch.setattr(_commit, "put_manifest", killed)
    with pytest.raises(KeyboardInterrupt):
        runner(store, fleet).run(T0)
    hidden = [o.key for o in store.list("snapshots/runs/_publish/")]
    assert len(hidden) == 2  # one object per service, written and waiting
    assert external_rows(store) == 0
    assert SnapshotReader(store).runs() == [] and load_manifest(store, T0) is None
    monkeypatch.undo()
    out = runner(store, fleet).run(T0)
    assert out.state == "committed"
    assert external_rows(store, "history") == 95 and external_rows(store, "profile") == 95
    assert store.list("snapshots/runs/_publish/") == []
    assert fleet.requested("history") == 95  # nothing fetched twice


def test_a_crash_after_the_commit_is_read_by_us_and_published_by_the_next_run(store,
                                                                           monkeypatch):
    """Killed after the manifest but before publishing: the run is committed, our reader reads
    it from the hidden objects, external readers do not see it yet; the next run of the slot
    says it is committed and publishes it."""
    from snapshotter import _commit

    make_selection(store, 400, 95)
    fleet = Fleet({"history": history, "profile": lambda e: {"age": e % 90}})

    def killed(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(_commit, "publish_run", killed)
    with pytest.raises(KeyboardInterrupt):
        runner(store, fleet).run(T0)
    m = load_manifest(store, T0)
    assert m is not None
    assert external_rows(store) == 0
    reader = SnapshotReader(store)
    ctx = set(store.read_parquet(f"snapshots/selections/{m.selection_id}/contexts.parquet")
              .column("entity_id").to_pylist())
    sampled = sorted(x for x in ctx if x % 11 and x % 13)[:3]
    got = reader.read("history", sampled, [T0 + 3600 * US_PER_S] * 3)
    assert got.column("status").to_pylist() == ["ok"] * 3
    assert pc.struct_field(got.column("payload"), "views").to_pylist() == [
        history(x)["views"] for x in sampled]
    monkeypatch.undo()
    out = runner(store, fleet).run(T0)
    assert out.state == "already_committed"
    assert external_rows(store, "history") == 95 and external_rows(store, "profile") == 95
    assert store.list("snapshots/runs/_publish/") == []
    assert store.list("snapshots/runs/_staging/") == []


def test_run_commits_rows_manifest_and_is_idempotent(store):
    sid = make_selection(store, 400, 95)
    fleet = Fleet({"history": history, "profile": lambda e: {"age": e % 90}})
    out = runner(store, fleet).run(T0)
    assert out.state == "committed"
    m = load_manifest(store, T0)
    assert m is not None and m.selection_id == sid and m.run_id == out.run_id
    assert m.committed_at_us == T0 + 60 * US_PER_S
    ctx = store.read_parquet(f"snapshots/selections/{sid}/contexts.parquet")
    ents = ctx.column("entity_id").to_pylist()
    h = m.services["history"]
    n_missing = sum(1 for e in ents if e % 11 == 0)
    n_failed = sum(1 for e in ents if e % 11 != 0 and e % 13 == 0)
    assert (h.requested, h.missing, h.failed) == (95, n_missing, n_failed)
    assert h.fetched_ok == 95 - n_failed
    assert h.confidence == pytest.approx((95 - n_failed) / 95)
    assert h.errors == {"ConnectionError": n_failed}
    assert h.latency_p50_ms is not None and h.latency_p99_ms is not None
    assert 0 <= h.latency_p50_ms <= h.latency_p99_ms
    assert h.columns == {"views": "int64", "score": "float64", "tag": "string"}
    assert h.config["max_staleness"] == "48h" and h.max_staleness_us == 48 * 3600 * US_PER_S
    assert m.services["profile"].confidence == 1.0
    # 10 staged chunks of 10 are committed as one object, sorted by entity.
    [obj] = h.objects
    assert store.read_parquet(obj).column("entity_id").to_pylist() == sorted(ents)

    # What an outside reader sees: every committed row, and the payload as typed columns.
    fs, root = store.arrow_filesystem()
    t = ds.dataset(f"{root}/snapshots/runs/service=history", filesystem=fs, format="parquet",
                   partitioning="hive").to_table()
    assert t.num_rows == 95
    assert sorted(t.column("entity_id").to_pylist()) == sorted(ents)
    by_e = {r["entity_id"]: r for r in t.to_pylist()}
    for e in ents:
        r = by_e[e]
        expected = None
        try:
            expected = history(e)
        except ConnectionError:
            assert r["status"] == "error" and r["p_views"] is None
            continue
        if expected is None:
            assert r["status"] == "missing" and r["raw_json"] is None
            continue
        assert r["status"] == "ok"
        assert (r["p_views"], r["p_score"], r["p_tag"]) == (
            expected["views"], expected["score"], expected["tag"])
        assert json.loads(r["raw_json"]) == expected
        assert r["captured_at"].timestamp() * US_PER_S == T0 + 60 * US_PER_S
        weights = dict(zip(ctx.column("entity_id").to_pylist(),
                           ctx.column("weight").to_pylist(), strict=True))
        assert r["weight"] == weights[e]
    # The staging area is gone once committed.
    assert store.list("snapshots/runs/_staging") == []

    again = runner(store, fleet).run(T0)
    assert again.state == "already_committed"
    assert "already committed" in again.message
    assert fleet.requested("history") == 95  # the no-op fetched nothing
    assert runner(store, fleet).run(T0, selection_id=sid).state == "already_committed"
    other = make_selection(store, 300, 40, at_us=T0 - 1800 * US_PER_S)
    with pytest.raises(RunConflict, match=f"committed with selection {sid}, not {other}"):
        runner(store, fleet).run(T0, selection_id=other)


def test_second_commit_of_a_slot_is_refused(local_store):
    make_selection(local_store, 50, 10)
    fleet = Fleet({"profile": lambda e: {"age": 1}})
    out = runner(local_store, fleet).run(T0)
    before = local_store.get(f"snapshots/runs/_manifests/{out.run_id.split('-')[0]}.json")
    forged = out.manifest
    assert forged is not None
    with pytest.raises(RunAlreadyCommitted):
        put_manifest(local_store, forged)
    assert local_store.get(f"snapshots/runs/_manifests/{out.run_id.split('-')[0]}.json") == before


def test_interrupted_run_shows_nothing_and_resumes_without_refetching(store):
    make_selection(store, 500, 120)
    stop = threading.Event()
    seen = []

    def on_chunk(ev):
        seen.append(ev)
        if len(seen) == 3:
            stop.set()

    fleet = Fleet({"history": history})
    wall_before_us = time.time_ns() // 1000
    with pytest.raises(RunInterrupted):
        runner(store, fleet, on_chunk=on_chunk, stop=stop, chunk_size=20).run(T0)
    wall_after_us = time.time_ns() // 1000
    staged = [o.key for o in store.list("snapshots/runs/_staging") if "chunk-" in o.key]
    assert 3 <= len(staged) < 6
    assert external_rows(store) == 0
    assert SnapshotReader(store).runs() == []
    [pending] = pending_runs(store)
    assert pending.missing_shards == [0]
    # The last write is the store's clock (S3 keeps whole seconds), not the run's manual clock:
    # it tells an operator whether a pending run is still moving.
    assert pending.last_write_us is not None
    assert wall_before_us - 2 * US_PER_S <= pending.last_write_us <= wall_after_us + US_PER_S
    [row] = list_runs(store)
    assert row["state"] == "pending"
    assert row["started_at"] == "2026-11-20T12:01:00.000000Z"  # the plan's, on the run's clock
    assert row["last_write_at"] == format_timestamp(pending.last_write_us)

    class Moved(Config):
        def public_json(self) -> dict:
            return {**super().public_json(), "url": "local://elsewhere", "timeout_s": 9}

    with pytest.raises(RunConflict, match="history.url = 'local://history'"):
        SnapshotRunner(store, {"history": Moved("history")}, clock=ManualClock(T0 + 60 * US_PER_S),
                       fetcher_factory=Fleet({"history": history}).factory).run(T0)
    fleet2 = Fleet({"history": history})
    out = runner(store, fleet2, chunk_size=999).run(T0)  # the plan's chunk size stands
    assert out.state == "committed"
    assert fleet2.requested("history") == 120 - 20 * len(staged)
    assert fleet.requested("history") + fleet2.requested("history") == 120
    assert external_rows(store, "history") == 120
    assert out.manifest is not None and out.manifest.services["history"].requested == 120


def _list_text(store, capsys) -> list[str]:
    code, out, _ = run_main(capsys, "snapshot", "list", "--store", store.url)
    assert code == 0
    return out.splitlines()


def test_two_shards_visible_only_when_both_commit(store, capsys):
    sid = make_selection(store, 600, 150)
    fleet = Fleet({"history": history, "profile": lambda e: {"age": e % 90}})
    first = runner(store, fleet).run(T0, shard=1, shards=2)
    assert first.state == "waiting_for_shards" and first.missing_shards == [0]
    assert external_rows(store) == 0
    assert SnapshotReader(store).runs() == []
    [row] = list_runs(store)
    assert row["state"] == "pending" and row["missing_shards"] == [0]
    header, line = _list_text(store, capsys)
    assert header.split()[:3] == ["SLOT", "STATE", "RUN_ID"]
    assert line.split()[:3] == ["2026-11-20T12:00:00.000000Z", "pending", first.run_id]
    assert ("incomplete: shard(s) 0 of 2 not committed; "
            f"last write at {row['last_write_at']}") in line
    with pytest.raises(RunConflict):
        runner(store, fleet).run(T0, shard=0, shards=3)
    with pytest.raises(RunConflict):
        runner(store, fleet).run(T0, shard=0, shards=2, selection_id="sel-x")
    shard1 = fleet.requested("history")
    second = runner(store, fleet).run(T0, shard=0, shards=2)
    assert second.state == "committed"
    assert second.manifest is not None and second.manifest.shards == 2
    assert second.manifest.selection_id == sid
    assert fleet.requested("history") == 150
    assert 30 < shard1 < 120  # the split is roughly even
    # each shard keeps to its share of every service's max_qps, so together they hold the limit
    assert fleet.qps_shares and set(fleet.qps_shares) == {0.5}
    assert external_rows(store, "history") == 150
    assert external_rows(store, "profile") == 150
    [row] = list_runs(store)
    assert row["state"] == "committed" and row["missing_shards"] == []
    assert row["started_at"] == format_timestamp(second.manifest.started_at_us)
    assert row["last_write_at"] is None
    _, line = _list_text(store, capsys)
    h = second.manifest.services["history"].confidence
    assert line.split()[1] == "committed" and line.split()[3] == sid
    assert line.endswith(f"history={h:.3f} profile=1.000")


def test_shard_split_is_stable_and_partitions():
    ints = pa.array(np.arange(-5000, 5000, dtype=np.int64))
    strs = pa.array([f"member-{i}" for i in range(3000)] + ["", "é", "a\0"])
    # Pinned values: the split must never change between processes or versions.
    assert stable_hash(pa.array([0, 42], pa.int64())).tolist() == [
        16814320478739725433, 18131609894848338592]
    assert stable_hash(pa.array(["", "abc"])).tolist() == [
        4969036341779521859, 3738837214805799400]
    assert len(set(stable_hash(strs).tolist())) == len(strs)
    for arr in (ints, strs):
        parts = [shard_indices(arr, i, 3) for i in range(3)]
        assert sorted(np.concatenate(parts).tolist()) == list(range(len(arr)))
        assert min(len(p) for p in parts) > len(arr) / 3 * 0.85
        sliced = arr.slice(10, 50)
        assert np.array_equal(stable_hash(sliced), stable_hash(arr)[10:60])


def test_parse_shard():
    assert parse_shard("0/1") == (0, 1)
    assert parse_shard("3/4") == (3, 4)
    for bad in ("4/4", "-1/2", "a/b", "1"):
        with pytest.raises(Exception, match="shard"):
            parse_shard(bad)


def test_failing_and_down_services_commit_with_their_confidence(local_store):
    make_selection(local_store, 300, 100)

    def down(e):
        raise TimeoutError("down")

    fleet = Fleet({"down": down, "profile": lambda e: {"age": 3}})
    out = runner(local_store, fleet).run(T0)
    assert out.state == "committed" and out.manifest is not None
    d = out.manifest.services["down"]
    assert (d.confidence, d.failed, d.fetched_ok, d.errors) == (0.0, 100, 0, {"TimeoutError": 100})
    assert d.columns == {}
    reader = SnapshotReader(local_store)
    res = reader.read("down", pa.array([7, 14]), np.array([T0 + 3600 * US_PER_S] * 2))
    sampled = pc.is_in(pa.array([7, 14]), value_set=local_store.read_parquet(
        f"snapshots/selections/{out.manifest.selection_id}/contexts.parquet"
    ).column("entity_id")).to_pylist()
    assert res.column("status").to_pylist() == [
        "error" if s else "not_sampled" for s in sampled]


def test_payload_typing_rules():
    from snapshotter._typing import conform, infer_kinds, payload_columns, unify

    payloads = [
        {"n": 1, "x": 1, "s": "a", "b": True, "big": 2**70, "Bad": 1, "nested": {"a": 1}},
        None,
        {"n": 2, "x": 2.5, "s": 3, "b": 1, "big": 5},
    ]
    kinds = infer_kinds(payloads)
    assert kinds == {"b": "bool", "big": "int64", "n": "int64", "s": "string", "x": "float64"}
    cols = payload_columns(payloads, kinds)
    assert cols["p_x"].to_pylist() == [1.0, None, 2.5]
    assert cols["p_s"].to_pylist() == ["a", None, None]  # 3 does not fit a string field
    assert cols["p_b"].to_pylist() == [True, None, None]  # 1 is not a bool
    assert cols["p_big"].to_pylist() == [None, None, 5]  # 2**70 does not fit int64
    # Frozen types win over a later run's kinds, except that int widens to float.
    assert unify({"n": "int64", "s": "string"}, [{"n": "float64", "s": "int64", "z": "bool"}]) == {
        "n": "float64", "s": "string", "z": "bool"}
    t = pa.table({"entity_id": [1, 2], "p_n": pa.array([1, 2]), "p_s": pa.array([1, 2])})
    c = conform(t, {"n": "float64", "s": "string", "z": "bool"})
    assert c.column_names == ["entity_id", "p_n", "p_s", "p_z"]
    assert c.column("p_n").to_pylist() == [1.0, 2.0]
    assert c.column("p_s").to_pylist() == [None, None]
    assert c.column("p_z").type == pa.bool_()


# -- against the simulated world (real HTTP services) ------------------------------------------

import tomllib  # noqa: E402

from simworld import World, running_world  # noqa: E402
from snapshotter import parse_services  # noqa: E402

DAY = 86_400 * US_PER_S
W_START = parse_timestamp("2026-11-01T00:00:00Z", field="t")
SERVICES = ("viewing_history", "my_list", "profile")


def world_selection(store, world: World, n: int, at_us: int) -> str:
    pop = world.population(at_us)
    cs = select_contexts(pop, n=n, selected_at_us=at_us, entity="member_id",
                         strata=["region"], seed=3)
    return save_selection(store, cs, report=False, clock=ManualClock(at_us))


def world_services(rw, **kw):
    return parse_services(tomllib.loads(rw.services_toml(**kw)))


def test_snapshot_contents_equal_the_truth_at_captured_at(local_store):
    world = World(seed=11, members=400, start_us=W_START)
    t1 = W_START + 19 * DAY + 7 * 3600 * US_PER_S
    sid = world_selection(local_store, world, 90, t1 - DAY)
    with running_world(world) as rw:
        for slot, batch in ((t1, True), (t1 + DAY // 2, False)):
            rw.state.clock.set(slot)
            svcs = world_services(rw, batch=batch, max_concurrency=8)
            out = SnapshotRunner(local_store, svcs, clock=rw.state.clock,
                                 chunk_size=25).run(slot)
            assert out.state == "committed"
            assert out.manifest is not None and out.manifest.selection_id == sid
            for name in SERVICES:
                assert out.manifest.services[name].confidence == 1.0
    members = sorted(local_store.read_parquet(
        f"snapshots/selections/{sid}/contexts.parquet").column("entity_id").to_pylist())
    fs, root = local_store.arrow_filesystem()
    truth = {"viewing_history": world.viewing_history, "my_list": world.my_list,
             "profile": world.profile}
    changed = 0
    for name in SERVICES:
        rows = ds.dataset(f"{root}/snapshots/runs/service={name}", filesystem=fs,
                          format="parquet", partitioning="hive").to_table().to_pylist()
        assert len(rows) == 2 * len(members)
        assert sorted({r["entity_id"] for r in rows}) == members
        for r in rows:
            at = int(r["captured_at"].timestamp()) * US_PER_S
            assert at in (t1, t1 + DAY // 2)
            expected = truth[name](r["entity_id"], at)
            assert r["status"] == "ok"
            assert json.loads(r["raw_json"]) == expected
            for k, v in expected.items():
                if isinstance(v, bool | int | float | str):
                    got = r[f"p_{k}"]
                    assert got == v and type(got) is type(v) or (
                        isinstance(v, int) and got == float(v)), (name, k, v, got)
            other = truth[name](r["entity_id"], (2 * t1 + DAY // 2) - at)
            changed += other != expected
    assert changed > 0  # the two runs saw different states: a real test of captured_at


def test_failing_service_retries_and_reports_confidence(local_store):
    world = World(seed=5, members=600, start_us=W_START)
    now = W_START + 10 * DAY
    world_selection(local_store, world, 300, now - DAY)
    with running_world(world, clock=None, fault_seed=1) as rw:
        rw.state.clock.set(now)
        rw.control.set_faults("profile", error_rate=0.2)
        rw.control.set_faults("my_list", down=True)
        rw.control.set_faults("viewing_history", latency_median_ms=30.0)  # constant
        # No retries, per-entity: about 20% of profile fetches fail.
        svcs = world_services(rw, batch=False, retries=0, max_concurrency=16)
        out = SnapshotRunner(local_store, svcs, clock=ManualClock(now),
                             chunk_size=100).run(now)
        m = out.manifest
        assert out.state == "committed" and m is not None
        reader = SnapshotReader(local_store)
        prof = reader.read("profile", pa.array(range(1, 601)), np.full(600, now + 1))
        statuses = prof.column("status").to_pylist()
        p = m.services["profile"]
        assert p.requested == 300 and p.failed == statuses.count("error")
        assert p.fetched_ok == statuses.count("ok")
        assert p.confidence == statuses.count("ok") / 300
        assert 0.65 < p.confidence < 0.92
        assert p.errors == {"http_5xx": p.failed}
        ml = m.services["my_list"]
        assert (ml.confidence, ml.fetched_ok, ml.failed) == (0.0, 0, 300)
        vh = m.services["viewing_history"]
        assert vh.confidence == 1.0
        # the manifest's latency is the fetches' own: the world's 30 ms and a little more
        assert vh.latency_p50_ms is not None and vh.latency_p99_ms is not None
        assert 30.0 <= vh.latency_p50_ms <= vh.latency_p99_ms < 1000.0
        # profile has no latency of its own: only the same queueing, without the 30 ms
        assert p.latency_p50_ms is not None and p.latency_p50_ms < vh.latency_p50_ms
        rw.control.set_faults("viewing_history", latency_median_ms=0.0)
        stats = rw.control.stats()["services"]
        assert stats["profile"]["requests"] == 300  # no retries

        # With retries, the same fault rate is absorbed: the service was asked again.
        rw.control.reset_stats()
        later = now + DAY // 2
        svcs = world_services(rw, batch=False, retries=4, max_concurrency=16,
                              services=("profile",))
        out2 = SnapshotRunner(local_store, svcs, clock=ManualClock(later),
                              chunk_size=100).run(later)
        p2 = out2.manifest.services["profile"]
        assert rw.control.stats()["services"]["profile"]["requests"] > 330
        assert p2.confidence >= 0.99
        rows = local_store.read_parquet(p2.objects[0])
        assert max(rows.column("attempts").to_pylist()) > 1


CLI = [sys.executable, "-c", "from ttstore._cli import run; run()"]


def cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=timeout)


def staged_chunks(store, service: str) -> int:
    return sum(1 for o in store.list("snapshots/runs/_staging")
               if f"/{service}/chunk-" in o.key)


def run_main(capsys, *args: str) -> tuple[int, str, str]:
    """The CLI in this process (cheaper than a subprocess when no kill is involved): its exit
    code, stdout and stderr."""
    from ttstore._cli import main

    code = main(list(args))
    out = capsys.readouterr()
    return code, out.out, out.err


def test_sigkill_leaves_nothing_visible_and_resume_refetches_only_the_rest(store, tmp_path,
                                                                           capsys):
    world = World(seed=2, members=300, start_us=W_START)
    now = W_START + 9 * DAY
    world_selection(store, world, 100, now - DAY)
    slot = format_timestamp(now)
    with running_world(world) as rw:
        rw.state.clock.set(now)
        rw.control.set_faults("viewing_history", latency_median_ms=40.0)
        path = tmp_path / "services.toml"
        path.write_text(rw.services_toml(batch=False, max_concurrency=2))
        args = ["snapshot", "run", "--store", store.url, "--services", str(path),
                "--slot", slot, "--now", slot, "--chunk-size", "10"]
        proc = subprocess.Popen([*CLI, *args], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 60
            while staged_chunks(store, "viewing_history") < 2:
                assert proc.poll() is None, proc.communicate()
                assert time.monotonic() < deadline
                time.sleep(0.05)
            proc.kill()  # SIGKILL
        finally:
            proc.wait()
            proc.stdout.close()
            proc.stderr.close()
        staged = staged_chunks(store, "viewing_history")
        assert 2 <= staged < 10

        # Nothing is visible: not to our reader, not to pyarrow reading the directory.
        assert external_rows(store) == 0
        fs, root = store.arrow_filesystem()
        files = ds.dataset(f"{root}/snapshots", filesystem=fs, format="parquet").files
        assert files and not [f for f in files if "/runs/" in f]  # only the context set
        assert SnapshotReader(store).runs() == []
        assert [r["state"] for r in list_runs(store)] == ["pending"]

        # Resume: only the chunks not staged are fetched again.
        rw.control.set_faults("viewing_history", latency_median_ms=0.0)
        rw.control.reset_stats()
        code, out, _ = run_main(capsys, *args)
        assert code == 0
        assert "committed run" in out
        ids = {s: rw.control.stats()["services"][s]["ids_requested"] for s in SERVICES}
        assert ids["viewing_history"] == 100 - 10 * staged
        assert ids["my_list"] + ids["profile"] <= 200  # (they may not have been staged)
        assert external_rows(store, "viewing_history") == 100
        m = load_manifest(store, now)
        assert m is not None and m.services["viewing_history"].requested == 100

        # The same slot again: a no-op that says so; a second commit is refused.
        rw.control.reset_stats()
        code, out, _ = run_main(capsys, *args)
        assert code == 0 and "already committed" in out
        assert rw.control.stats()["services"]["viewing_history"]["requests"] == 0
        with pytest.raises(RunAlreadyCommitted):
            put_manifest(store, m)
        assert load_manifest(store, now) == m
        code, out, _ = run_main(capsys, "snapshot", "list", "--store", store.url, "--json")
        [row] = [json.loads(line) for line in out.splitlines()]
        assert row["state"] == "committed" and row["services"]["viewing_history"][
            "confidence"] == 1.0


_MEMORY_CHILD = """
import json, resource, sys
from snapshotter import SnapshotRunner, load_services
from ttstore import ManualClock, Store, parse_timestamp
now = parse_timestamp(sys.argv[3], field="slot")
out = SnapshotRunner(Store(sys.argv[1]), load_services(sys.argv[2]),
                     clock=ManualClock(now)).run(now)
print(json.dumps({"state": out.state, "requested": out.manifest.services["profile"].requested,
                  "fetched_ok": out.manifest.services["profile"].fetched_ok,
                  "maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024}))
"""
#: A run that held every answer of 200k contexts at once measured ~470 MB; streaming, ~250 MB.
MAX_RSS_MB = 320
#: Linux gives a process spawned (vfork + exec) by a big parent an ``ru_maxrss`` of at least
#: the parent's peak: exec folds the old address space's high-water mark into it. Spawned from
#: a small launcher, the child's ``ru_maxrss`` is its own.
LAUNCHER = [sys.executable, "-c", "import subprocess, sys; sys.exit(subprocess.call(sys.argv[1:]))"]


@pytest.mark.slow
def test_memory_stays_bounded_from_10k_to_200k_contexts(tmp_path):
    now = parse_timestamp("2026-11-10T00:00:00Z", field="t")
    world = World(seed=1, members=200_000, start_us=now - 40 * DAY)
    population = world.population(now - 1)
    with running_world(world) as rw:
        rw.state.clock.set(now)
        services = tmp_path / "services.toml"
        services.write_text(rw.services_toml(services=("profile",), batch=True,
                                             batch_size=1000))
        for n in (10_000, 200_000):
            store = Store(str(tmp_path / f"store{n}"))
            cs = select_contexts(population, n=n, selected_at_us=now - 1, entity="member_id",
                                 seed=1)
            save_selection(store, cs, report=False, clock=ManualClock(now - 1))
            r = subprocess.run([*LAUNCHER, sys.executable, "-c", _MEMORY_CHILD, store.url,
                                str(services), format_timestamp(now)], capture_output=True,
                               text=True, timeout=240)
            assert r.returncode == 0, r.stderr[-3000:]
            got = json.loads(r.stdout)
            assert (got["state"], got["requested"], got["fetched_ok"]) == ("committed", n, n)
            assert got["maxrss_mb"] < MAX_RSS_MB, (n, got)
            assert external_rows(store, "profile") == n


def test_a_slot_after_now_is_refused(local_store):
    from snapshotter import InvalidRunOption

    make_selection(local_store, 20, 5)
    fleet = Fleet({"profile": lambda e: {"age": 1}})
    with pytest.raises(InvalidRunOption, match="after now"):
        runner(local_store, fleet, clock=ManualClock(T0)).run(T0 + 3600 * US_PER_S)
    assert local_store.list("snapshots/runs") == []


@pytest.fixture
def restore_pool() -> Any:
    pool = pa.default_memory_pool()
    yield
    pa.set_memory_pool(pool)


def test_runs_use_the_system_allocator_unless_the_operator_chose(
        restore_pool: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    from snapshotter._run import use_system_allocator  # noqa: PLC0415

    pa.set_memory_pool(pa.mimalloc_memory_pool())
    monkeypatch.setenv("ARROW_DEFAULT_MEMORY_POOL", "mimalloc")
    use_system_allocator()
    assert pa.default_memory_pool().backend_name == "mimalloc"
    monkeypatch.delenv("ARROW_DEFAULT_MEMORY_POOL")
    use_system_allocator()
    assert pa.default_memory_pool().backend_name == "system"


def test_progress_is_a_bar_on_a_terminal_and_throttled_log_lines_otherwise(
        store, caplog, capsys, monkeypatch):
    """Off a terminal every (service, shard) logs its first chunk and its last (and one line
    every 5 s between); on a terminal, a bar per (service, shard)."""
    import sys

    from snapshotter._runcli import _progress

    make_selection(store, 400, 95)
    fleet = Fleet({"history": history, "profile": lambda e: {"age": e % 90}})
    with caplog.at_level("INFO", logger="snapshotter.run"), _progress(True) as on_chunk:
        # pytest's stderr is not a terminal: log lines, although the bar was asked for
        assert runner(store, fleet, on_chunk=on_chunk).run(T0).state == "committed"
    lines = sorted(r.getMessage() for r in caplog.records
                   if r.getMessage().startswith("event=chunk"))
    for svc in ("history", "profile"):
        mine = [line for line in lines if f"service={svc} " in line]
        assert len(mine) == 2, mine
        assert any("chunks_done=1 chunks=10 rows=10 " in line for line in mine)
        assert any("chunks_done=10 chunks=10 rows=5 " in line for line in mine)  # 95 = 9x10+5

    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    with _progress(True) as on_chunk:
        assert runner(store, fleet, on_chunk=on_chunk).run(T0 + 30 * US_PER_S).state == \
            "committed"
    out = capsys.readouterr().out
    assert "history shard 0" in out and "profile shard 0" in out and "10/10" in out


def test_string_keyed_services_and_selections(store):
    """A selection of string keys ("007" stays "007") and a service taking string keys: the run
    stages and commits string keys, and the reader answers by them; the int 7 reads as the key
    "7", which is not "007"."""
    ids = [f"{i:03d}" for i in range(1, 201)]
    pop = pa.table({"entity_id": pa.array(ids, pa.string()),
                    "region": pa.array(["eu" if i % 3 == 0 else "us" for i in range(1, 201)])})
    at = T0 - 3600 * US_PER_S
    save_selection(store, select_contexts(pop, n=50, selected_at_us=at, strata=["region"],
                                          seed=2), report=False, clock=ManualClock(at))
    fleet = Fleet({"devices": lambda e: {"n": len(e), "first": e[0]}})
    services = {"devices": Config("devices", entity_type="string")}
    out = SnapshotRunner(store, services, clock=ManualClock(T0 + 60 * US_PER_S),
                         fetcher_factory=fleet.factory, chunk_size=10).run(T0)
    assert out.state == "committed" and out.manifest is not None
    assert out.manifest.services["devices"].fetched_ok == 50
    chosen = store.read_parquet(
        f"snapshots/selections/{out.manifest.selection_id}/contexts.parquet").column("entity_id")
    assert chosen.type == pa.string()
    keys = chosen.to_pylist()[:5]
    got = SnapshotReader(store).read("devices", keys, [T0 + 3600 * US_PER_S] * 5)
    assert got.column("status").to_pylist() == ["ok"] * 5
    assert pc.struct_field(got.column("payload"), "first").to_pylist() == ["0"] * 5
    assert external_rows(store, "devices") == 50
    seven = SnapshotReader(store).read("devices", [7], [T0 + 3600 * US_PER_S])
    assert seven.column("status").to_pylist() == ["not_sampled"]
    from ttstore import InvalidInput

    with pytest.raises(InvalidInput, match="all int64 or all strings"):
        SnapshotReader(store).read("devices", [7, "007"], [T0 + 3600 * US_PER_S] * 2)


def test_fetching_runs_the_collector_less_often_and_restores_it(local_store) -> None:
    import gc  # noqa: PLC0415

    from snapshotter._run import FETCH_GC_THRESHOLD  # noqa: PLC0415

    seen: list[int] = []

    def answer(e: int) -> dict:
        seen.append(gc.get_threshold()[0])
        return {"v": e}

    make_selection(local_store, 50, 20)
    before = gc.get_threshold()
    gc.set_threshold(700, *before[1:])
    try:
        assert runner(local_store, Fleet({"svc": answer})).run(T0).state == "committed"
        assert seen and set(seen) == {FETCH_GC_THRESHOLD}
        assert gc.get_threshold()[0] == 700  # restored
        seen.clear()
        gc.set_threshold(0)  # a process that turned the collector off keeps it off
        runner(local_store, Fleet({"svc": answer})).run(T0 - 1800 * US_PER_S)
        assert seen and set(seen) == {0}
    finally:
        gc.set_threshold(*before)


def test_run_takes_its_services_from_the_feature_repo(local_store, tmp_path, capsys) -> None:
    world = World(seed=4, members=60, start_us=W_START)
    slot = W_START + 2 * DAY
    world_selection(local_store, world, 20, slot - DAY)
    base = ["snapshot", "run", "--store", local_store.url, "--slot", format_timestamp(slot),
            "--now", format_timestamp(slot + 60 * US_PER_S)]
    empty = tmp_path / "empty_repo.py"
    empty.write_text("x = 1\n")
    code, _, err = run_main(capsys, *base, "--repo", str(empty))
    assert code == 2 and "declares no snapshot services" in err
    with running_world(world) as rw:
        rw.state.clock.set(slot)
        repo = tmp_path / "repo.py"
        repo.write_text(
            "from snapshotter import ServiceConfig\n"
            f"profile = ServiceConfig(name='profile', url='{rw.url}/v1/profile/{{entity_id}}')\n"
        )
        assert run_main(capsys, *base, "--repo", str(repo))[0] == 0
    m = load_manifest(local_store, slot)
    assert m is not None and sorted(m.services) == ["profile"]
    assert m.services["profile"].fetched_ok == 20
    assert m.services["profile"].config["url"].startswith(rw.url)


def test_a_crash_while_publishing_is_finished_by_the_next_slot(store, monkeypatch):
    """Killed part-way through publishing (one object copied): the next run, of another slot
    (a scheduler never runs the old one again), publishes the rest and deletes the staging."""
    make_selection(store, 400, 95)
    fleet = Fleet({"history": history, "profile": lambda e: {"age": e % 90}})
    real_delete = store.delete

    def dies_after_the_first_copy(key):
        if "/_publish/" in key:
            raise KeyboardInterrupt
        real_delete(key)

    monkeypatch.setattr(store, "delete", dies_after_the_first_copy)
    with pytest.raises(KeyboardInterrupt):
        runner(store, fleet).run(T0)
    monkeypatch.undo()
    assert load_manifest(store, T0) is not None
    assert len(store.list("snapshots/runs/_publish/")) == 2  # one copied, its copy not deleted
    assert sorted((external_rows(store, "history"), external_rows(store, "profile"))) == [0, 95]
    assert store.list("snapshots/runs/_staging/") != []
    later = T0 + 12 * 3600 * US_PER_S
    out = runner(store, fleet, clock=ManualClock(later + 60 * US_PER_S)).run(later)
    assert out.state == "committed"
    assert external_rows(store, "history") == 2 * 95 and external_rows(store, "profile") == 2 * 95
    assert store.list("snapshots/runs/_publish/") == []
    assert store.list("snapshots/runs/_staging/") == []


def test_qps_limit_holds_across_shard_processes(local_store, tmp_path):
    """Two `snapshot run --shard i/2` processes at once against one service: each keeps to
    max_qps / 2, so the service never sees more than max_qps started in any one-second window;
    both ran at the same time (more than one shard's share in some window), and the run commits
    once both parts are in."""
    world = World(seed=8, members=400, start_us=W_START)
    now = W_START + 3 * DAY
    world_selection(local_store, world, 120, now - DAY)
    slot = format_timestamp(now)
    with running_world(world) as rw:
        rw.state.clock.set(now)
        path = tmp_path / "services.toml"
        path.write_text(rw.services_toml(batch=False, services=("profile",), max_qps=20,
                                         max_concurrency=8))
        procs = [subprocess.Popen([*CLI, "snapshot", "run", "--store", local_store.url,
                                   "--services", str(path), "--slot", slot, "--now", slot,
                                   "--shard", f"{i}/2", "--chunk-size", "20"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
        outs = [p.communicate(timeout=120) for p in procs]
        assert [p.returncode for p in procs] == [0, 0], outs
        served = rw.control.stats()["services"]["profile"]
    assert served["requests"] == 120
    assert 10 < served["max_started_in_any_1s"] <= 20
    m = load_manifest(local_store, now)
    assert m is not None and m.shards == 2 and m.services["profile"].fetched_ok == 120


def test_no_secret_reaches_the_store(local_store, monkeypatch) -> None:
    """A header read from the environment and a password in the URL are used on the wire but
    written nowhere: not in the plan, the parts, the manifest, nor any other object."""
    monkeypatch.setenv("TT_TEST_TOKEN", "sekrit-token-123")
    world = World(seed=6, members=80, start_us=W_START)
    now = W_START + 4 * DAY
    world_selection(local_store, world, 30, now - DAY)
    with running_world(world) as rw:
        rw.state.clock.set(now)
        url = rw.url.replace("http://", "http://user:pa55word-xyz@")
        svcs = parse_services({"services": {"profile": {
            "url": f"{url}/v1/profile/{{entity_id}}",
            "headers": {"X-Api-Key": "key ${TT_TEST_TOKEN}"},
        }}})
        out = SnapshotRunner(local_store, svcs, clock=ManualClock(now)).run(now)
    assert out.state == "committed" and out.manifest is not None
    assert out.manifest.services["profile"].fetched_ok == 30
    assert out.manifest.services["profile"].config["headers"] == {"X-Api-Key": "<redacted>"}
    keys = [o.key for o in local_store.list("")]
    assert any(k.endswith(".json") for k in keys) and any(k.endswith(".parquet") for k in keys)
    for k in keys:
        body = local_store.get(k)
        assert b"sekrit-token-123" not in body and b"pa55word-xyz" not in body, k


class _Ticking:
    """A run clock that moves 1 ms on every reading: each reading is distinct."""

    def __init__(self, start_us: int) -> None:
        self.t = start_us
        self.lock = threading.Lock()

    def now_us(self) -> int:
        with self.lock:
            self.t += 1000
            return self.t


@pytest.mark.parametrize("batch", [False, True])
def test_captured_at_is_each_answers_arrival(local_store, batch) -> None:
    """Each row's captured_at is the run clock when its own answer came back: one reading per
    GET, one per batch request; all before the chunk's fetch returned and the commit."""
    world = World(seed=9, members=90, start_us=W_START)
    slot = W_START + 5 * DAY
    world_selection(local_store, world, 40, slot - DAY)
    clock = _Ticking(slot + 60 * US_PER_S)
    with running_world(world) as rw:
        rw.state.clock.set(slot)
        svcs = world_services(rw, batch=batch, services=("profile",), max_concurrency=4,
                              batch_size=5)
        start = clock.now_us()
        out = SnapshotRunner(local_store, svcs, clock=clock, chunk_size=20).run(slot)
    assert out.state == "committed" and out.manifest is not None
    [obj] = out.manifest.services["profile"].objects
    at = [int(x.timestamp() * 1e6) for x in
          local_store.read_parquet(obj).column("captured_at").to_pylist()]
    assert len(at) == 40
    assert all(start < x < out.manifest.committed_at_us for x in at)
    assert len(set(at)) == (8 if batch else 40)  # 40 rows: 8 batches of 5, or 40 GETs
