"""Encoders offline: row form vs batch form vs a brute-force view, visibility (SPEC §3), errors,
snapshot inputs, and the same callable on a live view."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from factlog import FactType
from timetravel_api import Encoder, FeatureRepo, View, encoder, facts
from timetravel_api._encoders import evaluate_encoders
from timetravel_api._errors import EncoderDefinitionError
from timetravel_api._view import gather_visible

from .reference import reference_feature

FIXTURE = Path(__file__).parent / "fixtures" / "feature_repo.py"
REPO = FeatureRepo.load(FIXTURE)
S = 1_000_000
DAY = 86_400 * S
T0 = 1_798_761_600_000_000  # 2027-01-01
COLS = {"playback": "member_id", "search": "member_id", "rating": "member_id", "visit": "member_id"}


def table(ft: FactType, rows: list[dict[str, Any]]) -> pa.Table:
    schema = ft.arrow_schema()
    cols: dict[str, list[Any]] = {f.name: [] for f in schema}
    ent = ft.entity_name
    for r in sorted(rows, key=lambda r: (r[ent], r["event_time"], r["logged_at"], r["fact_id"])):
        for f in schema:
            cols[f.name].append(r.get(f.name))
    arrays = []
    for f in schema:
        if pa.types.is_timestamp(f.type):
            arrays.append(pa.array(cols[f.name], pa.int64()).cast(f.type))
        else:
            arrays.append(pa.array(cols[f.name], f.type))
    return pa.Table.from_arrays(arrays, schema=schema.remove_metadata())


def fact(i: int, member: int, et: int, lg: int, **fields: Any) -> dict[str, Any]:
    return {"fact_id": f"f{i:05d}", "member_id": member, "event_time": et, "logged_at": lg,
            "ingested_at": lg, "producer": "p", **fields}


def without_batch(enc: Encoder) -> Encoder:
    twin = Encoder(enc.fn, inputs=enc.inputs, output=enc.output, name=enc.name)
    twin.json_fields = dict(enc.json_fields)
    return twin


def run(encs: list[Encoder], ents: list[Any], ats: list[int], tables: dict[str, pa.Table],
        knowledge: str = "as_known", snapshots: dict[str, pa.Table] | None = None,
        ) -> dict[str, tuple[list[Any], list[str]]]:
    out = evaluate_encoders(encs, pa.array(ents, pa.int64()), np.array(ats, dtype=np.int64),
                            facts=tables, snapshots=snapshots or {}, knowledge=knowledge,
                            entity_cols=COLS)
    return {k: (v.to_pylist(), list(s)) for k, (v, s) in out.items()}


times = st.integers(0, 12).map(lambda h: T0 + h * 12 * 3_600 * S)
seconds = st.one_of(st.none(), st.floats(-1e12, 1e12, allow_nan=False),
                    st.sampled_from([0.1, 1e-9, 3.0]))


@st.composite
def worlds(draw: st.DrawFn) -> tuple[list[dict[str, Any]], list[dict[str, Any]],
                                     list[tuple[int, int]]]:
    plays = []
    for i in range(draw(st.integers(0, 25))):
        et = draw(times)
        lg = et + draw(st.sampled_from([0, 0, 6 * 3_600 * S, 3 * DAY]))  # some late
        plays.append(fact(i, draw(st.integers(1, 4)), et, lg, seconds=draw(seconds),
                          video_id=draw(st.one_of(st.none(), st.integers(1, 5))),
                          meta=draw(st.sampled_from([None, '{"a":[1,2]}']))))
    searches = []
    for i in range(draw(st.integers(0, 12))):
        et = draw(times)
        lg = et + draw(st.sampled_from([0, DAY]))
        searches.append(fact(100 + i, draw(st.integers(1, 4)), et, lg,
                             query=draw(st.sampled_from([None, "a", "b", "zz"])), results=1))
    candidates = [f["event_time"] for f in plays] + [f["logged_at"] for f in plays]
    at = st.one_of(times, st.sampled_from(candidates) if candidates else times,
                   times.map(lambda t: t + 7 * DAY))
    queries = draw(st.lists(st.tuples(st.integers(1, 5), at), min_size=1, max_size=12))
    return plays, searches, queries


def brute(enc: Encoder, rows: dict[str, list[dict[str, Any]]], entity: int, at: int,
          knowledge: str) -> tuple[Any, str]:
    """The SPEC §3 view with plain loops, handed to the encoder's row function."""
    view_facts = {}
    for inp in enc.fact_inputs:
        span = inp.span_us
        seen = [dict(f) for f in rows[inp.fact_type]
                if f["member_id"] == entity and f["event_time"] <= at
                and (knowledge == "event" or f["logged_at"] <= at)
                and (span is None or f["event_time"] > at - span)]
        seen.sort(key=lambda f: (f["event_time"], f["logged_at"], f["fact_id"]))
        for f in seen:
            if f.get("meta") is not None:
                f["meta"] = json.loads(f["meta"])
        view_facts[(inp.fact_type, inp.window)] = seen
    view = View(entity, at, facts=view_facts, snapshots={}, restricted=True)
    try:
        value = enc.fn(view)
    except Exception:
        return None, "error"
    return (None, "missing") if value is None else (enc.coerce(value), "ok")


FACT_FED = ["minutes_7d", "distinct_videos_1d", "last_query"]


@settings(max_examples=60, deadline=None)
@given(worlds(), st.sampled_from(["as_known", "event"]))
def test_row_batch_and_brute_force_agree(world: Any, knowledge: str) -> None:
    plays, searches, queries = world
    rows = {"playback": plays, "search": searches, "rating": []}
    tables = {"playback": table(REPO.fact_types["playback"], plays),
              "search": table(REPO.fact_types["search"], searches),
              "rating": table(REPO.fact_types["rating"], [])}
    ents = [e for e, _ in queries]
    ats = [t for _, t in queries]
    encs = [REPO.encoders[n] for n in FACT_FED]
    batch = run(encs, ents, ats, tables, knowledge)
    rowwise = run([without_batch(e) for e in encs], ents, ats, tables, knowledge)
    assert batch == rowwise
    for enc in encs:
        expect = [brute(enc, rows, e, t, knowledge) for e, t in queries]
        assert list(zip(*rowwise[enc.name], strict=True)) == expect, enc.name
    # tie the fixture encoders to the SPEC reference of the built-ins they mirror
    ftypes = {"seconds": "float64", "video_id": "int64", "meta": "json", "device": "string"}
    for q, (e, t) in enumerate(queries):
        total, _ = reference_feature(plays, "playback.seconds.sum.7d", e, t,
                                     entity_col="member_id", field_types=ftypes,
                                     knowledge=knowledge, lookback_us=None)
        assert rowwise["minutes_7d"][0][q] == (0.0 if total is None else total / 60)
        last, status = reference_feature(searches, "search.query.last", e, t,
                                         entity_col="member_id",
                                         field_types={"query": "string", "results": "int64"},
                                         knowledge=knowledge, lookback_us=3 * DAY)
        # last_query takes the last search row (its query may be null); the reference the last
        # non-null query: equal whenever the last row's query is not null
        if rowwise["last_query"][0][q] is not None:
            assert rowwise["last_query"][0][q] == last and status == "ok"


def test_late_facts_are_invisible_in_as_known() -> None:
    ft = REPO.fact_types["playback"]
    plays = [fact(1, 1, T0, T0, seconds=60.0),
             fact(2, 1, T0 + S, T0 + DAY, seconds=600.0),     # happened at T0+1s, logged a day on
             fact(3, 1, T0 + 2 * S, T0 + 2 * S, seconds=120.0)]
    t = {"playback": table(ft, plays), "search": table(REPO.fact_types["search"], [])}
    mins = REPO.encoders["minutes_7d"]
    ats = [T0 + 2 * S, T0 + DAY - 1, T0 + DAY, T0]
    for enc in (mins, without_batch(mins)):
        known = run([enc], [1] * 4, ats, t, "as_known")["minutes_7d"][0]
        assert known == [3.0, 3.0, 13.0, 1.0]
        event = run([enc], [1] * 4, ats, t, "event")["minutes_7d"][0]
        assert event == [13.0, 13.0, 13.0, 1.0]


def test_window_edges_and_unknown_entities() -> None:
    ft = REPO.fact_types["playback"]
    plays = [fact(1, 1, T0, T0, seconds=60.0), fact(2, 1, T0 + 7 * DAY, T0 + 7 * DAY,
                                                    seconds=120.0)]
    t = {"playback": table(ft, plays)}
    got = run([REPO.encoders["minutes_7d"]], [1, 1, 1, 2], [T0 + 7 * DAY, T0 + 7 * DAY - 1,
                                                            T0 - 1, T0], t)
    # (t - 7d, t]: at T0+7d the fact at T0 is out, the one at T0+7d in
    assert got["minutes_7d"] == ([2.0, 1.0, 0.0, 0.0], ["ok"] * 4)


def test_raising_encoder_errors_only_its_values() -> None:
    ft = REPO.fact_types["rating"]
    ratings = [fact(1, 1, T0, T0, stars=4), fact(2, 1, T0 + S, T0 + S, stars=2),
               fact(3, 2, T0, T0, stars=0)]
    got = run([REPO.encoders["mean_stars_30d"], REPO.encoders["minutes_7d"]],
              [1, 2, 3], [T0 + S] * 3,
              {"rating": table(ft, ratings), "playback": table(REPO.fact_types["playback"], [])})
    assert got["mean_stars_30d"] == ([3.0, None, None], ["ok", "error", "missing"])
    assert got["minutes_7d"] == ([0.0, 0.0, 0.0], ["ok"] * 3)


def test_raising_batch_form_falls_back_to_rows_and_bad_outputs_are_errors() -> None:
    @encoder(inputs=[facts("rating")], output="int64")
    def stars_or_text(view: View) -> Any:
        stars = [f["stars"] for f in view.facts("rating")]
        return "oops" if stars == [0] else sum(stars)

    @stars_or_text.batch
    def _(batch: Any) -> pa.Array:
        raise RuntimeError("batch form broken")

    repo = FeatureRepo.from_objects([*REPO.fact_types.values(), stars_or_text])
    enc = repo.encoders["stars_or_text"]
    ratings = [fact(1, 1, T0, T0, stars=4), fact(3, 2, T0, T0, stars=0)]
    got = run([enc], [1, 2, 3], [T0] * 3, {"rating": table(REPO.fact_types["rating"], ratings)})
    assert got["stars_or_text"] == ([4, None, 0], ["ok", "error", "ok"])


def test_snapshot_inputs_and_status() -> None:
    enc = REPO.encoders["history_plus_today"]
    plays = [fact(1, 1, T0, T0, seconds=1.0), fact(2, 1, T0 + S, T0 + S, seconds=1.0)]
    snaps = pa.table({
        "status": ["ok", "not_sampled", "stale", "missing"],
        "raw_json": ['{"titles": 5}', None, None, "{}"],
        "age_s": [3600.0, None, 9e5, 10.0],
    })
    for e in (enc, without_batch(enc)):
        got = run([e], [1, 2, 3, 4], [T0 + S] * 4,
                  {"playback": table(REPO.fact_types["playback"], plays)},
                  snapshots={"viewing_history": snaps})
        assert got["history_plus_today"] == ([7, None, None, None],
                                             ["ok", "not_sampled", "stale", "missing"])


def test_same_callable_on_a_live_view() -> None:
    mins = REPO.encoders["minutes_7d"]
    fetched: list[dict[str, Any]] = [{"seconds": 30.0, "event_time": "2027-01-01T00:00:00Z",
                "logged_at": "2027-01-01T00:00:00Z", "fact_id": "a"},
               {"seconds": 999.0, "event_time": "2026-12-01T00:00:00Z"},  # outside 7d
               {"seconds": 50.0, "event_time": "2027-01-01T00:00:01Z",
                "logged_at": "2027-01-05T00:00:00Z"}]                       # logged later
    about_to_log = [{"seconds": 90.0}]                                        # no event_time: now
    view = View.live(1, "2027-01-02T00:00:00Z", facts={"playback": fetched + about_to_log})
    assert mins(view) == 2.0
    assert mins.evaluate(view) == (2.0, "ok")
    assert [f["seconds"] for f in view.restrict(mins).facts("playback")] == [30.0, 90.0]
    hist = REPO.encoders["history_plus_today"]
    live = View.live(1, T0, facts={"playback": about_to_log},
                     snapshots={"viewing_history": {"titles": 2}})
    assert hist.evaluate(live) == (3, "ok")
    assert hist.evaluate(View.live(1, T0, snapshots={"viewing_history": None})) == (
        None, "missing")
    # an undeclared input is refused, online and offline alike
    with pytest.raises(EncoderDefinitionError, match="did not declare facts\\('rating'"):
        View.live(1, T0).restrict(mins).facts("rating")
    assert mins.evaluate(View.live(1, T0, facts={"rating": []})) == (0.0, "ok")


def test_gather_visible_resorts_unsorted_input() -> None:
    ft = REPO.fact_types["rating"]
    rows = [fact(1, 2, T0, T0, stars=1), fact(2, 1, T0, T0, stars=2), fact(3, 2, T0 + S, T0,
                                                                          stars=3)]
    tab = table(ft, rows)
    shuffled = tab.take(pa.array([1, 0, 2]))  # entity 2, 1, 2: not contiguous
    flat, off = gather_visible(shuffled, "member_id", pa.array([2, 1, 9]),
                               np.array([T0 + S] * 3), span_us=None, knowledge="as_known")
    assert off.tolist() == [0, 2, 3, 3]
    assert flat.column("stars").to_pylist() == [1, 3, 2]
    reversed_times = tab.take(pa.array([0, 2, 1]))  # entity 1, 2, 2 but T0 + S before T0
    flat, off = gather_visible(reversed_times, "member_id", pa.array([2]), np.array([T0 + S]),
                               span_us=None, knowledge="as_known")
    assert flat.column("stars").to_pylist() == [1, 3]


def test_string_keys_timestamp_times_and_empty_batches() -> None:
    ft = FactType("visit", entity=("device_id", "string"), fields={"page": "string"})

    @encoder(inputs=[facts("visit", window="1d")], output="list<string>")
    def pages_1d(view: View) -> list[str]:
        return [f["page"] for f in view.facts("visit")]

    repo = FeatureRepo.from_objects([ft, pages_1d])
    enc = repo.encoders["pages_1d"]
    assert enc.entity_type == "string"
    rows = [{"fact_id": f"f{i}", "device_id": d, "event_time": T0 + i * S, "logged_at": T0 + i * S,
             "ingested_at": T0, "producer": "p", "page": p}
            for i, (d, p) in enumerate([("007", "a"), ("7", "b"), ("007", "c"), ("", "d")])]
    tab = table(ft, rows)
    at = pa.array([T0 + 9 * S] * 4, pa.int64()).cast(pa.timestamp("us", tz="UTC"))
    out = evaluate_encoders([enc], pa.array(["007", "7", "", "x"]), at, facts={"visit": tab},
                            snapshots={}, knowledge="as_known", entity_cols={"visit": "device_id"})
    values, status = out["pages_1d"]
    assert values.to_pylist() == [["a", "c"], ["b"], ["d"], []]
    assert list(status) == ["ok"] * 4
    empty = evaluate_encoders([enc], pa.array([], pa.string()), np.array([], np.int64),
                              facts={"visit": tab}, snapshots={}, knowledge="event",
                              entity_cols={"visit": "device_id"})
    assert len(empty["pages_1d"][0]) == 0 and len(empty["pages_1d"][1]) == 0


def test_batch_accessors_agree_with_the_row_view() -> None:
    seen: dict[str, Any] = {}

    @encoder(inputs=[facts("playback", window="2d"), facts("playback", window="1h")],
             output="int64")
    def plays(view: View) -> int:
        return len(view.facts("playback", window="2d")) * 100 + len(
            view.facts("playback", window="1h"))

    @plays.batch
    def _(batch: Any) -> pa.Array:
        seen["lists"] = batch.facts("playback", window="2d").to_pylist()
        seen["column"] = batch.column("playback", "seconds", window="1h").to_pylist()
        seen["at"] = batch.at.cast(pa.int64()).to_pylist()
        wide = np.diff(batch.offsets("playback", window="2d"))
        narrow = np.diff(batch.offsets("playback", window="1h"))
        return pa.array(wide * 100 + narrow)

    repo = FeatureRepo.from_objects([*REPO.fact_types.values(), plays])
    enc = repo.encoders["plays"]
    rows = [fact(1, 1, T0, T0, seconds=1.0), fact(2, 1, T0 + DAY, T0 + DAY, seconds=2.0),
            fact(3, 1, T0 + DAY + S, T0 + DAY + S, seconds=None)]
    tabs = {"playback": table(REPO.fact_types["playback"], rows)}
    ats = [T0 + DAY + 2 * S, T0 + 3 * DAY]
    assert run([enc], [1, 1], ats, tabs) == run([without_batch(enc)], [1, 1], ats, tabs) == {
        "plays": ([302, 100], ["ok", "ok"])}  # (t - 2d, t]: the fact at exactly t - 2d is out
    assert [[f["fact_id"] for f in q] for q in seen["lists"]] == [["f00001", "f00002", "f00003"],
                                                                  ["f00003"]]
    assert seen["column"] == [[2.0, None], []] and seen["at"] == ats
    with pytest.raises(EncoderDefinitionError, match="several windows"):
        View.live(1, T0).restrict(enc).facts("playback")


def test_row_dicts_are_fresh_copies_with_aware_times() -> None:
    from datetime import UTC, datetime

    ft = FactType("visit", entity=("member_id", "int64"),
                  fields={"seen": "timestamp", "meta": "json"})

    @encoder(inputs=[facts("visit")], output="json")
    def grab(view: View) -> Any:
        rows = view.facts("visit")
        out = [[r["event_time"].isoformat(), r["seen"] and r["seen"].isoformat(), r["meta"]]
               for r in rows]
        for r in rows:
            r["meta"] = "mutated"  # must not leak into another query's view
            assert r["event_time"].tzinfo is UTC
        return out

    repo = FeatureRepo.from_objects([ft, grab])
    rows = [{"fact_id": "a", "member_id": 1, "event_time": T0, "logged_at": T0,
             "ingested_at": T0, "producer": "p", "seen": None, "meta": '{"x":1}'},
            {"fact_id": "b", "member_id": 1, "event_time": T0 + 1, "logged_at": T0 + 1,
             "ingested_at": T0, "producer": "p", "seen": T0 - S, "meta": None}]
    got = run([repo.encoders["grab"]], [1, 1], [T0 + 1, T0 + 1], {"visit": table(ft, rows)})
    expect = json.dumps([["2027-01-01T00:00:00+00:00", None, {"x": 1}],
                         ["2027-01-01T00:00:00.000001+00:00", "2026-12-31T23:59:59+00:00",
                          None]], sort_keys=True, separators=(",", ":"))
    assert got["grab"] == ([expect, expect], ["ok", "ok"])
    assert datetime.fromisoformat("2027-01-01T00:00:00+00:00").timestamp() * S == T0
