"""The as-of snapshot reader: the vectorized kernel against a brute-force reading of SPEC §3, and
the reader over runs committed through the real commit path (type freezing, widening, cache)."""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from snapshotter._commit import commit_part, commit_run
from snapshotter._manifest import RunPlan, chunk_key, run_id_for
from snapshotter._reader import SnapshotReader, asof
from snapshotter._stage import chunk_table, stage_chunk
from snapshotter._typing import load_types
from ttstore import TIMESTAMP_TYPE, US_PER_S, InvalidInput, ManualClock

H = 3600 * US_PER_S


def field(table: pa.Table, name: str) -> list:
    return pc.struct_field(table.column("payload"), name).to_pylist()


# -- brute force ------------------------------------------------------------------------------


@dataclass
class Row:
    entity: int
    captured: int
    committed: int
    status: str
    staleness: int
    tie: int
    value: int


def brute(rows: list[Row], e: int, t: int, knowledge: str) -> tuple[str, Row | None]:
    vis = [
        r for r in rows
        if r.entity == e and r.captured <= t and (knowledge == "event" or r.committed <= t)
    ]
    if not vis:
        return "not_sampled", None
    good = [r for r in vis if r.status in ("ok", "missing")]
    if good:
        g = max(good, key=lambda r: (r.captured, r.tie))
        if t - g.captured > g.staleness:
            return "stale", g
        return g.status, g
    return "error", max(vis, key=lambda r: (r.captured, r.tie))


def rows_table(rows: list[Row]) -> pa.Table:
    return pa.table({
        "entity_id": pa.array([r.entity for r in rows], pa.int64()),
        "captured_at": pa.array([r.captured for r in rows], TIMESTAMP_TYPE),
        "status": pa.array([r.status for r in rows], pa.string()),
        "weight": pa.array([float(i) for i in range(len(rows))], pa.float64()),
        "committed_at": pa.array([r.committed for r in rows], pa.int64()),
        "max_staleness_us": pa.array([r.staleness for r in rows], pa.int64()),
        "tie": pa.array([r.tie for r in rows], pa.int64()),
        "run_id": pa.array([f"run{r.tie}" for r in rows], pa.string()),
        "selection_id": pa.array(["sel"] * len(rows), pa.string()),
        "p_value": pa.array([r.value if r.status == "ok" else None for r in rows], pa.int64()),
        "raw_json": pa.array([json.dumps({"value": r.value}) for r in rows], pa.string()),
    })


@st.composite
def runs_and_queries(draw):
    n_runs = draw(st.integers(0, 6))
    rows: list[Row] = []
    for tie in range(n_runs):
        committed = draw(st.integers(0, 30))
        staleness = draw(st.integers(0, 12))
        for e in draw(st.sets(st.integers(0, 4), max_size=5)):
            # A resumed run may commit before a row's capture by another invocation's clock.
            captured = draw(st.integers(max(0, committed - 12), committed + 2))
            status = draw(st.sampled_from(["ok", "ok", "missing", "error"]))
            value = draw(st.integers(-(2**63), 2**63 - 1))
            rows.append(Row(e, captured, committed, status, staleness, tie, value))
    queries = draw(st.lists(st.tuples(st.integers(0, 5), st.integers(-1, 45)), max_size=40))
    return rows, queries


@settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(runs_and_queries(), st.sampled_from(["as_known", "event"]))
def test_kernel_matches_brute_force(data, knowledge):
    rows, queries = data
    table = rows_table(rows)
    ents = pa.array([e for e, _ in queries], pa.int64())
    at = np.array([t for _, t in queries], dtype=np.int64)
    out = asof(table, ents, at, knowledge=knowledge, types={"value": "int64"}, raw_json=True)
    assert out.num_rows == len(queries)
    got_status = out.column("status").to_pylist()
    got_weight = out.column("weight").to_pylist()
    got_value = field(out, "value")
    got_cap = out.column("captured_at").cast(pa.int64()).to_pylist()
    got_raw = out.column("raw_json").to_pylist()
    for i, (e, t) in enumerate(queries):
        status, row = brute(rows, e, t, knowledge)
        assert got_status[i] == status, (i, e, t)
        if row is None:
            assert got_weight[i] is None and got_cap[i] is None
            continue
        assert got_weight[i] == float(rows.index(row))
        assert got_cap[i] == row.captured
        assert got_value[i] == (row.value if status == "ok" else None)
        assert got_raw[i] == (json.dumps({"value": row.value}) if status in ("ok", "missing")
                              else None)


def test_kernel_cases_by_hand():
    rows = [
        Row(1, 10, 11, "ok", 100, 0, 7),
        Row(1, 20, 21, "error", 100, 1, 0),  # a failed fetch never hides the older good row
        Row(2, 10, 11, "error", 100, 0, 0),
        Row(3, 10, 50, "ok", 100, 0, 9),  # committed late: invisible as_known before 50
        Row(4, 10, 11, "ok", 5, 0, 3),  # its run's max_staleness is 5
    ]
    table = rows_table(rows)
    ents = pa.array([1, 2, 3, 3, 4, 4, 9, 1], pa.int64())
    at = np.array([25, 25, 30, 50, 15, 16, 25, 5], dtype=np.int64)
    out = asof(table, ents, at, knowledge="as_known", types={"value": "int64"})
    assert out.column("status").to_pylist() == [
        "ok", "error", "not_sampled", "ok", "ok", "stale", "not_sampled", "not_sampled",
    ]
    assert field(out, "value") == [7, None, None, 9, 3, None,
                                                                  None, None]
    ev = asof(table, ents, at, knowledge="event", types={"value": "int64"})
    assert ev.column("status").to_pylist()[2] == "ok"


def test_empty_rows_are_not_sampled():
    out = asof(rows_table([]), pa.array([1, 2], pa.int64()), np.array([5, 6]),
               knowledge="as_known", types={"value": "int64"})
    assert out.column("status").to_pylist() == ["not_sampled", "not_sampled"]
    assert out.column("weight").to_pylist() == [None, None]


# -- through the real commit path ---------------------------------------------------------------


@dataclass
class Answer:
    entity: object
    status: str
    payload: dict | None
    raw_json: str | None
    latency_s: float = 0.005
    attempts: int = 1
    error_kind: str | None = None


def answer(entity, payload=None, status="ok", error_kind=None):
    raw = json.dumps(payload) if payload is not None else None
    return Answer(entity, status, payload if status == "ok" else None, raw,
                  error_kind=error_kind)


def commit_simple_run(store, slot_us, committed_us, service, answers, *, weight=2.0,
                      staleness="48h", selection_id="sel-a", chunk_size=2):
    """Stage ``answers`` in chunks, commit the part and the run, as a run would."""
    plan = RunPlan(
        run_id=run_id_for(slot_us, selection_id), slot_us=slot_us, selection_id=selection_id,
        shards=1, chunk_size=chunk_size,
        services={service: {"entity_type": "int64", "max_staleness": staleness}},
        created_at_us=slot_us,
    )
    frozen = load_types(store, service).fields
    chunks = []
    for k in range(0, len(answers), chunk_size):
        part = answers[k:k + chunk_size]
        table, _ = chunk_table(
            part, run_id=plan.run_id, entities=pa.array([a.entity for a in part], pa.int64()),
            weights=pa.array([weight] * len(part)), captured_at_us=slot_us, frozen=frozen,
        )
        chunks.append(stage_chunk(store, chunk_key(slot_us, 0, 1, service, k // chunk_size),
                                  table))
    parts = {0: commit_part(store, plan, 0, {service: chunks}, ManualClock(committed_us))}
    return commit_run(store, plan, parts, ManualClock(committed_us))


def test_reader_over_committed_runs(store):
    t0 = 1_800_000_000 * US_PER_S
    commit_simple_run(store, t0, t0 + 60 * US_PER_S, "history", [
        answer(1, {"count": 3, "name": "a", "nested": {"x": 1}}),
        answer(2, {"count": 5, "name": "b"}),
        answer(3, status="missing"),
        answer(4, status="error", error_kind="timeout"),
    ])
    assert load_types(store, "history").fields == {"count": "int64", "name": "string"}
    # Second run: count widens to float; name gets a number (does not fit: null, kept raw).
    commit_simple_run(store, t0 + 12 * H, t0 + 12 * H + 60 * US_PER_S, "history", [
        answer(1, {"count": 3.5, "name": 17, "flag": True}),
        answer(2, status="error", error_kind="http_500"),
    ], weight=4.0, staleness="1h")
    types = load_types(store, "history")
    assert types.fields == {"count": "float64", "name": "string", "flag": "bool"}
    assert types.version == 2

    reader = SnapshotReader(store)
    assert [m.slot_us for m in reader.runs()] == [t0, t0 + 12 * H]
    ents = pa.array([1, 2, 3, 4, 5, 1, 2, 1], pa.int64())
    at = np.array([t0 + H, t0 + H, t0 + H, t0 + H, t0 + H, t0 + 12 * H + 61 * US_PER_S,
                   t0 + 13 * H, t0 + 12 * H + 30 * US_PER_S])
    out = reader.read("history", ents, at, raw_json=True)
    assert out.column("status").to_pylist() == [
        "ok", "ok", "missing", "error", "not_sampled", "ok", "ok", "ok",
    ]
    assert field(out, "count") == [3.0, 5.0, None, None, None, 3.5, 5.0, 3.0]
    assert field(out, "name") == ["a", "b", None, None, None, None, "b", "a"]
    assert field(out, "flag") == [None] * 5 + [True, None, None]
    assert out.column("weight").to_pylist() == [2.0, 2.0, 2.0, 2.0, None, 4.0, 2.0, 2.0]
    assert json.loads(out.column("raw_json")[5].as_py()) == {"count": 3.5, "name": 17,
                                                             "flag": True}
    # Row 8 is at the second run's capture but before its commit: as_known cannot see it.
    ev = reader.read("history", ents[7:], at[7:], knowledge="event", fields=["count"])
    assert field(ev, "count") == [3.5]
    assert ev.column("payload").type == pa.struct([pa.field("count", pa.float64())])
    # The first run's rows go stale after 48h; the second run's after 1h.
    late = reader.read("history", pa.array([2, 1]), np.array([t0 + 49 * H, t0 + 14 * H]))
    assert late.column("status").to_pylist() == ["stale", "stale"]
    assert field(late, "count") == [None, None]
    with pytest.raises(InvalidInput):
        reader.read("history", pa.array([1]), np.array([t0]), fields=["nope"])
    with pytest.raises(InvalidInput):
        reader.read("history", pa.array([1]), np.array([t0]), knowledge="later")


# -- the engine's snapshot features, from committed runs, against the brute force --------------


@st.composite
def committed_runs_and_queries(draw):
    """Runs at distinct slots (hours), each committed some hours after its slot (a late commit
    shows only in ``as_known`` mode after it), with its own ``max_staleness``, and per entity an
    ok answer with a value, a missing one, an error, or no row (not sampled then)."""
    slots = sorted(draw(st.sets(st.integers(0, 40), max_size=5)))
    runs = []
    for i, slot in enumerate(slots):
        runs.append({
            "slot": slot, "committed": slot + draw(st.integers(0, 6)), "weight": 1.5 + i,
            "staleness_h": draw(st.sampled_from([1, 3, 48])),
            "answers": {e: (draw(st.sampled_from(["ok", "ok", "missing", "error"])),
                            draw(st.integers(-(2**63), 2**63 - 1)))
                        for e in draw(st.sets(st.integers(0, 4), max_size=5))},
        })
    queries = draw(st.lists(st.tuples(st.integers(0, 5), st.integers(-1, 60)), min_size=1,
                            max_size=30))
    return runs, queries


@settings(deadline=None, max_examples=100, suppress_health_check=[HealthCheck.too_slow])
@given(committed_runs_and_queries(), st.sampled_from(["as_known", "event"]))
def test_engine_snapshot_features_match_brute_force(data, knowledge) -> None:
    """``snapshot.S.F`` through the engine (the real commit path, the store, the reader) equals
    SPEC §3 by brute force: a failed fetch never hides an older good row, each run's own
    ``max_staleness``, ``not_sampled``, ``missing``, ``error``, ``committed_at`` in ``as_known``
    mode; and each row's weight is its run's."""
    import tempfile

    from timetravel_api import Engine
    from ttstore import Store

    runs, queries = data
    t0 = 1_800_000_000 * US_PER_S
    rows: list[Row] = []
    with tempfile.TemporaryDirectory() as d:
        store = Store(d)
        for tie, r in enumerate(runs):
            slot, committed = t0 + r["slot"] * H, t0 + r["committed"] * H
            if r["answers"]:
                commit_simple_run(store, slot, committed, "svc", [
                    answer(e, {"value": v}, status=st_) if st_ == "ok" else
                    answer(e, status=st_, error_kind="timeout" if st_ == "error" else None)
                    for e, (st_, v) in sorted(r["answers"].items())
                ], weight=r["weight"], staleness=f"{r['staleness_h']}h")
            rows += [Row(e, slot, committed, st_, r["staleness_h"] * H, tie, v)
                     for e, (st_, v) in r["answers"].items()]
        if not any(r.status == "ok" for r in rows):
            return  # no run typed the field: the name is unknown (tested elsewhere)
        weight_of = {t0 + r["slot"] * H: r["weight"] for r in runs}
        res = Engine(store, workers=1).features(
            [e for e, _ in queries], pa.array([t0 + t * H for _, t in queries],
                                              pa.int64()).cast(TIMESTAMP_TYPE),
            ["snapshot.svc.value"], knowledge=knowledge)
    values = res.values.column(0).to_pylist()
    status = res.status.column(0).to_pylist()
    weight = res.weight.to_pylist() if res.weight is not None else [None] * len(queries)
    for i, (e, t) in enumerate(queries):
        want, row = brute(rows, e, t0 + t * H, knowledge)
        assert status[i] == want, (i, e, t, knowledge)
        assert values[i] == (row.value if want == "ok" else None), (i, e, t)
        assert weight[i] == (None if row is None else weight_of[row.captured]), (i, e, t)
