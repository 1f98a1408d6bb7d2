"""The engine end to end, from a store: facts written as raw objects (duplicates across files,
late facts), read back through the engine, compared with the brute-force reference
(``tests/reference.py``) on every backend, both knowledge modes, int and string keys; the same
answers after compaction and through the process pool; completeness; provenance; bad input."""

from __future__ import annotations

import json
import math
import struct
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factlog import Compactor, FactType, FactTypeCatalog, Heartbeat
from timetravel_api import Engine
from timetravel_api._errors import EntityTypeMismatch, InvalidFeature
from ttstore import TIMESTAMP_TYPE, InvalidInput, ManualClock, Store

from .factdata import DAY, PLAY, T0, H, random_facts, reference_scan, write_facts
from .reference import reference_features

PAGE = FactType("page", entity=("user", "string"), fields={"path": "string", "n": "int64"},
                lookback="2d")
PLAY_FIELDS = dict(PLAY.fields)
PLAY_NAMES = [
    "play.video_id", "play.video_id.sum.1d", "play.secs.mean.2d", "play.secs.max.1d",
    "play.secs.sum.3d", "play.tag.last", "play.tag.distinct_count.3d", "play.count.1d",
    "play.time_since_last", "play.at.max.2d", "play.video_id.first.12h",
    "play.secs.count.1d", "play.tag.min.1d",
]
PAGE_NAMES = ["page.path", "page.n.sum.1d", "page.count.12h", "page.time_since_last",
              "page.n.max.2d", "page.path.distinct_count.1d"]


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return struct.pack("<d", a) == struct.pack("<d", b)
    return type(a) is type(b) and a == b


def pylist(arr: pa.Array | pa.ChunkedArray) -> list[Any]:
    if pa.types.is_timestamp(arr.type):
        arr = arr.cast(pa.int64())
    return arr.to_pylist()


def play_copies(seed: int, n: int = 80) -> list[dict[str, Any]]:
    """Random PLAY copies: duplicates and conflicts (random_facts), plus late facts."""
    rng = np.random.default_rng(seed)
    rows = random_facts(rng, n, n_entities=5, days=3)
    for r in rows:
        if int(r["fact_id"][2:]) % 7 == 3:  # logged_at >> event_time
            r["logged_at"] = r["event_time"] + DAY + 5 * H
        r["meta"] = None  # json payloads are covered by the kernel tests
    return rows


def page_copies(seed: int, n: int = 60) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        fid = int(rng.integers(0, n // 2))
        ev = T0 + (fid % 3) * DAY + int(rng.choice([0, 3, 12, 20])) * H
        rows.append({
            "user": str(rng.choice(["a", "007", "7", "é"])),
            "fact_id": f"pg{fid:04d}",
            "event_time": ev,
            "logged_at": ev + int(rng.choice([0, 1, 2 * H, 30 * H])),
            "path": str(rng.choice(["/", "/x", "/y"])) if rng.random() < 0.9 else None,
            "n": int(rng.integers(-3, 4)) if rng.random() < 0.9 else None,
        })
    return rows


def write_split(store: Store, ft: FactType, rows: list[dict[str, Any]], seed: int) -> None:
    """The copies spread over three segments (so duplicates sit in different files)."""
    rng = np.random.default_rng(seed)
    seg = rng.integers(1, 4, size=len(rows))
    for s in (1, 2, 3):
        part = [r for r, k in zip(rows, seg, strict=True) if k == s]
        if part:
            write_facts(store, ft, part, segment=s)


def queries_for(rows: list[dict[str, Any]], entity_col: str, unknown: Any, seed: int
                ) -> list[tuple[Any, int]]:
    rng = np.random.default_rng(seed)
    ents = sorted({r[entity_col] for r in rows}) + [unknown]
    times = [r["event_time"] for r in rows] + [r["logged_at"] for r in rows]
    qs = []
    for _ in range(60):
        e = ents[int(rng.integers(0, len(ents)))]
        t = int(rng.choice(times)) if rng.random() < 0.6 else T0 + int(rng.integers(-DAY,
                                                                                   5 * DAY))
        qs.append((e, t + int(rng.choice([0, 0, -1, 1]))))
    return qs


def check(engine: Engine, ft: FactType, copies: list[dict[str, Any]], names: list[str],
          queries: list[tuple[Any, int]], knowledge: str) -> Any:
    facts = reference_scan(copies, ft)
    want = reference_features(facts, names, queries, entity_col=ft.entity_name,
                              field_types=dict(ft.fields), knowledge=knowledge,
                              lookback_us=ft.lookback_us)
    res = engine.features([e for e, _ in queries],
                          pa.array([t for _, t in queries], pa.int64()).cast(TIMESTAMP_TYPE),
                          names, knowledge=knowledge)
    assert res.values.column_names == names and res.status.column_names == names
    for name in names:
        got_v = pylist(res.values.column(name))
        got_s = res.status.column(name).to_pylist()
        for q, ((wv, ws), gv, gs) in enumerate(zip(want[name], got_v, got_s, strict=True)):
            assert gs == ws and same(gv, wv), (name, q, queries[q], knowledge, gv, gs, wv, ws)
    return res


@pytest.mark.parametrize("knowledge", ["as_known", "event"])
def test_engine_matches_reference_from_store(store: Store, knowledge: str) -> None:
    cat = FactTypeCatalog(store)
    cat.declare(PLAY)
    cat.declare(PAGE)
    play, page = play_copies(1), page_copies(2)
    write_split(store, PLAY, play, 3)
    write_split(store, PAGE, page, 4)
    engine = Engine(store, workers=1)
    res = check(engine, PLAY, play, PLAY_NAMES, queries_for(play, "member_id", 99, 5),
                knowledge)
    assert res.complete and res.weight is None and res.provenance is None
    assert res.lineage["knowledge"] == knowledge
    assert res.lineage["fact_files"]["play"] == sorted(
        o.key for o in store.list("facts/play/") if o.key.endswith(".parquet"))
    check(engine, PAGE, page, PAGE_NAMES, queries_for(page, "user", "nobody", 6), knowledge)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), n=st.integers(2, 70), exact=st.integers(0, 12),
       knowledge=st.sampled_from(["as_known", "event"]), strings=st.booleans())
def test_engine_matches_reference_on_random_copies(seed: int, n: int, exact: int,
                                                   knowledge: str, strings: bool) -> None:
    """Hypothesis over the engine from a store: random copies with conflicting duplicates and
    late facts (``play_copies``, ``page_copies``), plus ``exact`` verbatim copies of random
    facts in other files (identical duplicates), against the brute-force reference."""
    ft, names, entity = (PAGE, PAGE_NAMES, "user") if strings else (PLAY, PLAY_NAMES, "member_id")
    rows = page_copies(seed, n=n) if strings else play_copies(seed, n=n)
    rng = np.random.default_rng(seed)
    rows += [dict(rows[int(i)]) for i in rng.integers(0, len(rows), exact)]
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        FactTypeCatalog(store).declare(ft)
        write_split(store, ft, rows, seed)
        check(Engine(store, workers=1), ft, rows, names,
              queries_for(rows, entity, "nobody" if strings else 99, seed), knowledge)


def test_same_answers_after_compaction(local_store: Store) -> None:
    store = local_store
    FactTypeCatalog(store).declare(PLAY)
    play = play_copies(11)
    write_split(store, PLAY, play, 12)
    qs = queries_for(play, "member_id", 99, 13)
    ents, at = [e for e, _ in qs], [t for _, t in qs]
    before = {k: Engine(store, workers=1).features(ents, at, PLAY_NAMES, knowledge=k)
              for k in ("as_known", "event")}
    report = Compactor(store, clock=ManualClock(T0 + 30 * DAY)).run()
    assert report.totals()["partitions_compacted"] == 3
    engine = Engine(store, workers=1)
    for k, res in before.items():
        after = engine.features(ents, at, PLAY_NAMES, knowledge=k)
        assert after.values.equals(res.values) and after.status.equals(res.status)
        assert all(f.rsplit("/", 1)[-1].startswith("c-")
                   for f in after.lineage["fact_files"]["play"])
    check(engine, PLAY, play, PLAY_NAMES, qs, "as_known")


def test_process_pool_gives_the_same_bytes(store: Store) -> None:
    FactTypeCatalog(store).declare(PLAY)
    play = play_copies(21, n=150)
    write_split(store, PLAY, play, 22)
    qs = queries_for(play, "member_id", 99, 23) * 3
    ents, at = [e for e, _ in qs], [t for _, t in qs]
    raw = Engine(store, workers=2, parallel_min_rows=1).features(ents, at, PLAY_NAMES)
    # the pool is for compacted data (workers read their own row groups)
    Compactor(store, clock=ManualClock(T0 + 30 * DAY)).run()
    local = Engine(store, workers=1).features(ents, at, PLAY_NAMES, provenance=True)
    assert local.values.equals(raw.values) and local.status.equals(raw.status)
    seen: list[float] = []
    pooled = Engine(store, workers=2, parallel_min_rows=1).features(
        ents, at, PLAY_NAMES, provenance=True, progress=seen.append)
    assert pooled.values.equals(local.values)
    assert pooled.status.equals(local.status)
    assert pooled.provenance is not None and pooled.provenance.equals(local.provenance)
    assert len(seen) > 1 and seen[-1] == 1.0  # several buckets finished: the pool ran


def test_provenance_names_the_fact_and_its_file(local_store: Store) -> None:
    store = local_store
    FactTypeCatalog(store).declare(PLAY)
    rows = [
        {"member_id": 1, "fact_id": "a1", "event_time": T0 + H, "logged_at": T0 + H,
         "video_id": 5, "secs": 1.0},
        {"member_id": 1, "fact_id": "a2", "event_time": T0 + 2 * H, "logged_at": T0 + 9 * H,
         "video_id": 6, "secs": 2.0},
    ]
    k1 = write_facts(store, PLAY, rows[:1], segment=1)[0]
    k2 = write_facts(store, PLAY, rows[1:], segment=2)[0]
    engine = Engine(store, workers=1)
    at = [T0 + 3 * H, T0 + 10 * H, T0]
    res = engine.features([1, 1, 1], at, ["play.video_id", "play.secs.sum.1d"],
                          provenance=True)
    assert res.values.column("play.video_id").to_pylist() == [5, 6, None]
    prov = res.provenance.column("play.video_id").to_pylist()
    assert [p["source"] for p in prov] == [k1, k2, None]
    assert [p["fact_id"] for p in prov] == ["a1", "a2", None]
    assert prov[0]["age_s"] == 2 * 3600.0 and prov[1]["age_s"] == 8 * 3600.0
    assert prov[2]["age_s"] is None
    # an aggregate names the newest fact in its window
    assert [p["fact_id"] for p in res.provenance.column("play.secs.sum.1d").to_pylist()] == [
        "a1", "a2", None]


def test_completeness_follows_live_producer_watermarks(local_store: Store) -> None:
    store = local_store
    FactTypeCatalog(store).declare(PLAY)
    write_facts(store, PLAY, [{"member_id": 1, "fact_id": "x", "event_time": T0,
                               "logged_at": T0, "video_id": 1}])
    now = T0 + 10 * H
    hb = Heartbeat(writer_id="w-live", producer="svc", fact_types=("play",),
                   watermark_us=T0 + 5 * H, updated_at_us=now, started_at_us=T0,
                   closed=False)
    store.put("catalog/heartbeats/w-live.json", json.dumps(hb.to_json()).encode())
    engine = Engine(store, clock=ManualClock(now), workers=1)
    assert engine.features([1], [T0 + 5 * H], ["play.count.1d"]).complete
    assert not engine.features([1, 1], [T0, T0 + 6 * H], ["play.count.1d"]).complete
    # a closed producer has nothing waiting in its spool
    closed = Heartbeat(writer_id="w-live", producer="svc", fact_types=("play",),
                       watermark_us=T0 + 5 * H, updated_at_us=now, started_at_us=T0,
                       closed=True)
    store.put("catalog/heartbeats/w-live.json", json.dumps(closed.to_json()).encode())
    assert engine.features([1], [T0 + 6 * H], ["play.count.1d"]).complete


def test_bad_input(local_store: Store) -> None:
    store = local_store
    FactTypeCatalog(store).declare(PLAY)
    FactTypeCatalog(store).declare(PAGE)
    engine = Engine(store, workers=1)
    with pytest.raises(InvalidFeature) as exc:
        engine.features([1], [T0], ["play.nope", "nope.x", "play.secs.sum.7x", "play.count.1d"])
    assert [n for n, _ in exc.value.problems] == ["play.nope", "nope.x", "play.secs.sum.7x"]
    with pytest.raises(EntityTypeMismatch):
        engine.features(["1"], [T0], ["play.count.1d"])
    with pytest.raises(EntityTypeMismatch):
        engine.features([1], [T0], ["play.count.1d", "page.count.1d"])
    naive = pa.array([T0], pa.int64()).cast(pa.timestamp("us"))
    with pytest.raises(InvalidInput, match="naive"):
        engine.features([1], naive, ["play.count.1d"])
    with pytest.raises(InvalidInput, match="precision"):
        engine.features([1], pa.array([T0 * 1000 + 1], pa.timestamp("ns", tz="UTC")),
                        ["play.count.1d"])
    with pytest.raises(InvalidInput):
        engine.features([1, 2], [T0], ["play.count.1d"])
    with pytest.raises(InvalidInput):
        engine.features([1], [T0], ["play.count.1d"], knowledge="later")
    # any unit and time zone converts
    ms = pa.array([T0 // 1000], pa.timestamp("ms", tz="Europe/Paris"))
    assert engine.features([1], ms, ["play.count.1d"]).values.column(0).to_pylist() == [0]


def test_encoder_features_run_on_the_reconstructed_view(local_store: Store) -> None:
    from timetravel_api import FeatureRepo, encoder, facts

    @encoder(inputs=[facts("play", window="1d")], output="float64")
    def secs_1d(view: Any) -> float | None:
        rows = [f["secs"] for f in view.facts("play", window="1d") if f["secs"] is not None]
        return sum(rows) if rows else None

    @encoder(inputs=[facts("play", window="1d")], output="int64")
    def broken(view: Any) -> int:
        raise RuntimeError("boom")

    store = local_store
    FactTypeCatalog(store).declare(PLAY)
    play = play_copies(41)
    write_split(store, PLAY, play, 42)
    repo = FeatureRepo.from_objects([PLAY, secs_1d, broken])
    qs = queries_for(play, "member_id", 99, 43)
    ents, at = [e for e, _ in qs], [t for _, t in qs]
    engine = Engine(store, repo=repo, workers=1)
    for knowledge in ("as_known", "event"):
        res = engine.features(ents, at, ["secs_1d", "play.secs.sum.1d", "broken"],
                              knowledge=knowledge, provenance=True)
        want = engine.features(ents, at, ["play.secs.sum.1d"], knowledge=knowledge)
        assert res.values.column("secs_1d").to_pylist() == \
            want.values.column("play.secs.sum.1d").to_pylist()
        assert res.values.column("secs_1d").to_pylist() != [None] * len(qs)
        assert set(res.status.column("broken").to_pylist()) == {"error"}
        assert res.lineage["encoder_versions"] == {"secs_1d": secs_1d.version,
                                                  "broken": broken.version}
        assert res.provenance is not None
        # an encoder's value came from its code over the view: named with its version
        assert {p["source"] for p in res.provenance.column("secs_1d").to_pylist()} == {
            f"encoder:secs_1d@{secs_1d.version}"}
