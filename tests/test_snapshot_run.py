"""Snapshot runs with in-process services: staging, manifest, idempotency, resume, shards, and
what an external reader (pyarrow reading the directory) can see."""

from __future__ import annotations

import json
import threading

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
from ttstore import US_PER_S, ManualClock, parse_timestamp

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
        self.lock = threading.Lock()

    def factory(self, config, qps_share):
        f = LocalFetcher(self.answers[config.name])
        with self.lock:
            self.fetchers.append((config.name, f))
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
    assert h.columns == {"views": "int64", "score": "float64", "tag": "string"}
    assert h.config["max_staleness"] == "48h" and h.max_staleness_us == 48 * 3600 * US_PER_S
    assert m.services["profile"].confidence == 1.0
    assert len(h.objects) == 10  # 95 contexts in chunks of 10

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
    with pytest.raises(RunInterrupted):
        runner(store, fleet, on_chunk=on_chunk, stop=stop, chunk_size=20).run(T0)
    staged = [o.key for o in store.list("snapshots/runs/_staging") if "chunk-" in o.key]
    assert 3 <= len(staged) < 6
    assert external_rows(store) == 0
    assert SnapshotReader(store).runs() == []
    [pending] = pending_runs(store)
    assert pending.missing_shards == [0]
    assert [r["state"] for r in list_runs(store)] == ["pending"]

    fleet2 = Fleet({"history": history})
    out = runner(store, fleet2, chunk_size=999).run(T0)  # the plan's chunk size stands
    assert out.state == "committed"
    assert fleet2.requested("history") == 120 - 20 * len(staged)
    assert fleet.requested("history") + fleet2.requested("history") == 120
    assert external_rows(store, "history") == 120
    assert out.manifest is not None and out.manifest.services["history"].requested == 120


def test_two_shards_visible_only_when_both_commit(store):
    sid = make_selection(store, 600, 150)
    fleet = Fleet({"history": history, "profile": lambda e: {"age": e % 90}})
    first = runner(store, fleet).run(T0, shard=1, shards=2)
    assert first.state == "waiting_for_shards" and first.missing_shards == [0]
    assert external_rows(store) == 0
    assert SnapshotReader(store).runs() == []
    [row] = list_runs(store)
    assert row["state"] == "pending" and row["missing_shards"] == [0]
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
    assert external_rows(store, "history") == 150
    assert external_rows(store, "profile") == 150
    [row] = list_runs(store)
    assert row["state"] == "committed" and row["missing_shards"] == []


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
