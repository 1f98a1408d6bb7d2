"""The vectorized fact kernels against the brute-force reference (tests/reference.py)."""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy as np
import pyarrow as pa
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from factlog import FactType
from timetravel_api import _kernels, _segments
from timetravel_api._errors import EntityTypeMismatch
from timetravel_api._features import parse_features
from timetravel_api._kernels import fact_feature_columns, fact_features
from ttstore import InvalidInput

from .reference import reference_features

S = 1_000_000
T0 = 1_798_761_600_000_000  # 2027-01-01T00:00:00Z
BIG = 2**53

FIELDS = {
    "x": "float64", "i": "int64", "b": "bool", "s": "string", "ts": "timestamp",
    "j": "json", "l": "list<int64>",
}
ALL_AGGS = ("count", "sum", "mean", "min", "max", "first", "last", "distinct_count")
OPAQUE = ("j", "l")
FIELD_X = 6  # column index of x in the stored schema
INT_KEYS = [1, 2, BIG, BIG + 1, BIG + 2, -(2**63), 2**63 - 1]
STR_KEYS = ["a", "b", "007", "7", "", "é", "ab"]


def fact_type(entity_type: str, lookback: str | None = None) -> FactType:
    return FactType("tt", entity=("member_id", entity_type), fields=FIELDS, lookback=lookback)


def feature_names(windows: list[str]) -> list[str]:
    names = ["tt.time_since_last"]
    names += [f"tt.count.{w}" for w in windows]
    for f, ftype in FIELDS.items():
        names += [f"tt.{f}", f"tt.{f}.last"]
        for agg in ALL_AGGS:
            if f in OPAQUE and agg not in ("last", "count"):
                continue
            if agg in ("sum", "mean") and ftype not in ("float64", "int64", "bool"):
                continue
            if agg in ("min", "max") and ftype not in ("float64", "int64", "bool", "string",
                                                         "timestamp"):
                continue
            names += [f"tt.{f}.{agg}.{w}" for w in windows]
    return names


def facts_table(ft: FactType, facts: list[dict[str, Any]]) -> pa.Table:
    """The stored schema, sorted by (entity, event_time, logged_at, fact_id) like the reader."""
    schema = ft.arrow_schema()
    cols: dict[str, list[Any]] = {name: [] for name in schema.names}
    for f in facts:
        for name in schema.names:
            if name == "ingested_at":
                cols[name].append(f["logged_at"])
            elif name == "producer":
                cols[name].append("p")
            else:
                cols[name].append(f[name])
    arrays = []
    for field in schema:
        vals = cols[field.name]
        if pa.types.is_timestamp(field.type):
            arrays.append(pa.array(vals, pa.int64()).cast(field.type))
        else:
            arrays.append(pa.array(vals, field.type))
    table = pa.Table.from_arrays(arrays, schema=schema)
    return table.sort_by([(ft.entity_name, "ascending"), ("event_time", "ascending"),
                          ("logged_at", "ascending"), ("fact_id", "ascending")])


def same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float):
        if math.isnan(a) or math.isnan(b):
            return math.isnan(a) and math.isnan(b)
        return struct.pack("<d", a) == struct.pack("<d", b)  # bit-exact, -0.0 != 0.0
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(same(x, y) for x, y in zip(a, b, strict=True))
    return type(a) is type(b) and a == b


def pylist(arr: pa.Array) -> list[Any]:
    if pa.types.is_timestamp(arr.type):
        arr = arr.cast(pa.int64())
    out: list[Any] = arr.to_pylist()
    return out


def check_against_reference(
    ft: FactType, facts: list[dict[str, Any]], queries: list[tuple[Any, int]],
    windows: list[str], knowledge: Any,
) -> None:
    names = feature_names(windows)
    specs = parse_features(names, fact_types={"tt": ft})
    table = facts_table(ft, facts)
    ents = pa.array([e for e, _ in queries], type=table.schema.field("member_id").type)
    at = np.array([t for _, t in queries], dtype=np.int64)
    got = fact_feature_columns(table, specs, ents, at, knowledge=knowledge,
                               lookback_us=ft.lookback_us, entity_col="member_id",
                               provenance=True)
    want = reference_features(facts, names, queries, entity_col="member_id",
                              field_types=FIELDS, knowledge=knowledge,
                              lookback_us=ft.lookback_us)
    for spec in specs:
        col = got[spec.name]
        assert col.values.type == spec.output_type, spec.name
        vals = pylist(col.values)
        for q, ((wv, ws), gv, gs) in enumerate(zip(want[spec.name], vals, col.status,
                                                   strict=True)):
            assert gs == ws and same(gv, wv), (
                f"{spec.name} row {q} {queries[q]} {knowledge}: got {gv!r}/{gs}, "
                f"want {wv!r}/{ws}")
        # provenance: the fact the value came from
        if spec.agg in ("first", "last") and spec.kind == "fact_field":
            idx = col.fact_index
            assert idx is not None
            taken = pylist(table.column(spec.field).take(pa.array(idx, mask=idx < 0)))
            assert all(same(a, b) for a, b in zip(taken, vals, strict=True))
        if spec.kind == "time_since_last":
            idx = col.fact_index
            assert idx is not None
            ev = table.column("event_time").cast(pa.int64()).to_numpy()
            for q, v in enumerate(vals):
                assert (v is None) == (idx[q] < 0)
                if v is not None:
                    assert v == (at[q] - ev[idx[q]]) / 1e6


# -- random data -----------------------------------------------------------------------------
FLOATS = st.one_of(
    st.none(),
    st.sampled_from([0.0, -0.0, 1.0, -1.0, 0.1, 0.2, 0.3, 1e-300, -1e-300, 1e300, -1e300,
                     1e16, 1.5, math.nan, math.inf, -math.inf, 5e-324]),
    st.floats(allow_nan=True, allow_infinity=False),
    st.builds(lambda m, e: m * 10.0 ** e, st.floats(-10, 10), st.integers(-300, 300)),
)
INTS = st.one_of(st.none(), st.integers(-5, 5),
                 st.sampled_from([2**62, -(2**62), 2**63 - 1, -(2**63), BIG + 1]))
STRINGS = st.one_of(st.none(), st.sampled_from(["", "a", "b", "B", "ab", "é", "z", "007"]))
LISTS = st.one_of(st.none(), st.lists(st.integers(-3, 3), max_size=3))
JSONS = st.one_of(st.none(), st.sampled_from(['{"a":1}', "[1,2]", "null", '"x"', "3"]))


@st.composite
def scenarios(draw: Any) -> tuple[FactType, list[dict[str, Any]], list[tuple[Any, int]],
                                  list[str]]:
    entity_type = draw(st.sampled_from(["int64", "string"]))
    pool = INT_KEYS if entity_type == "int64" else STR_KEYS
    keys = draw(st.lists(st.sampled_from(pool), min_size=1, max_size=3, unique=True))
    lookback = draw(st.sampled_from([None, None, "3s", "10s"]))
    ft = fact_type(entity_type, lookback)
    # a coarse time grid makes ties in event_time and logged_at common
    unit = draw(st.sampled_from([S, S // 2]))
    n = draw(st.integers(0, 40))
    ids = draw(st.permutations(range(n)))
    all_null = draw(st.sampled_from([None, "x", "s", "i"]))
    facts = []
    for k in range(n):
        ev = T0 + draw(st.integers(0, 20)) * unit
        delay = draw(st.sampled_from([0, 0, 0, 1, 2, 3, 30, -1]))  # -1: clock skew
        la = ev + delay * unit if delay >= 0 else ev - 1
        ts = draw(st.one_of(st.none(), st.integers(T0 - 5 * S, T0 + 5 * S)))
        f = {
            "member_id": draw(st.sampled_from(keys)),
            "fact_id": f"f{ids[k]:04d}",
            "event_time": ev, "logged_at": la,
            "x": draw(FLOATS), "i": draw(INTS), "b": draw(st.one_of(st.none(), st.booleans())),
            "s": draw(STRINGS), "ts": ts, "j": draw(JSONS), "l": draw(LISTS),
        }
        if all_null is not None:
            f[all_null] = None
        facts.append(f)
    # query times: on facts' event_time and logged_at, between them, before and after all
    interesting = [f[c] + d for f in facts for c in ("event_time", "logged_at")
                   for d in (-1, 0, 0, 1)]
    times = st.one_of(st.integers(T0 - 3 * S, T0 + 60 * S),
                      st.sampled_from(interesting or [T0]))
    unknown = 99 if entity_type == "int64" else "unknown"
    qkeys = st.sampled_from([*keys, unknown, pool[-1]])
    queries = draw(st.lists(st.tuples(qkeys, times), min_size=1, max_size=12))
    windows = draw(st.lists(st.sampled_from(["1s", "2s", "3s", "5s", "30s", "1d"]), min_size=1,
                            max_size=2, unique=True))
    return ft, facts, queries, windows


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(scenario=scenarios(), knowledge=st.sampled_from(["as_known", "event"]),
       rank_keys=st.booleans(), max_pairs=st.sampled_from([None, 3]))
def test_kernel_matches_reference(scenario, knowledge, rank_keys, max_pairs):
    ft, facts, queries, windows = scenario
    saved = _kernels.OFFSET_KEY_LIMIT, _segments.MAX_PAIRS
    try:
        if rank_keys:
            _kernels.OFFSET_KEY_LIMIT = 0  # force event_time ranks in the position keys
        if max_pairs is not None:
            _segments.MAX_PAIRS = max_pairs  # force chunked (row, fact) expansion
        check_against_reference(ft, facts, queries, windows, knowledge)
    finally:
        _kernels.OFFSET_KEY_LIMIT, _segments.MAX_PAIRS = saved


# -- targeted cases ----------------------------------------------------------------------------
def _fact(k: int, member: Any, ev: int, la: int | None = None, **fields: Any) -> dict[str, Any]:
    row = {"member_id": member, "fact_id": f"f{k:04d}", "event_time": ev,
           "logged_at": ev if la is None else la}
    row.update({f: fields.get(f) for f in FIELDS})
    return row


def run(
    ft: FactType, facts: list[dict[str, Any]], names: list[str],
    queries: list[tuple[Any, int]], knowledge: Any = "as_known",
) -> dict[str, tuple[list[Any], list[str]]]:
    specs = parse_features(names, fact_types={"tt": ft})
    table = facts_table(ft, facts)
    ents = pa.array([e for e, _ in queries], type=table.schema.field("member_id").type)
    at = np.array([t for _, t in queries], dtype=np.int64)
    out = fact_features(table, specs, ents, at, knowledge=knowledge,
                        lookback_us=ft.lookback_us, entity_col="member_id")
    return {k: (pylist(v), list(s)) for k, (v, s) in out.items()}


def test_window_sum_ignores_facts_outside_the_window():
    """A running total over history would return 0 or garbage here: 1e300 - 1e300 + small."""
    ft = fact_type("int64")
    facts = [_fact(0, 1, T0, x=1e300), _fact(1, 1, T0 + 1 * S, x=-1e300)]
    facts += [_fact(2 + k, 1, T0 + (10 + k) * S, x=1e-3 * (k + 1)) for k in range(5)]
    got = run(ft, facts, ["tt.x.sum.5s", "tt.x.mean.5s", "tt.x.sum.1d"],
              [(1, T0 + 14 * S), (1, T0 + 1 * S)])
    small = float(np.add.reduceat(np.array([1e-3, 2e-3, 3e-3, 4e-3, 5e-3]), [0])[0])
    assert got["tt.x.sum.5s"][0][0] == small
    assert got["tt.x.mean.5s"][0][0] == small / 5
    assert got["tt.x.sum.1d"][0] == [0.0, 0.0]
    assert got["tt.x.sum.5s"][0][1] == 0.0


def test_int_sums_are_exact_beyond_int64():
    ft = fact_type("int64")
    facts = [_fact(k, 7, T0 + k * S, i=2**63 - 1) for k in range(4)] + [_fact(9, 7, T0 + 9 * S,
                                                                              i=3)]
    got = run(ft, facts, ["tt.i.sum.1d", "tt.i.mean.1d", "tt.i.sum.1s"],
              [(7, T0 + 3 * S), (7, T0 + 9 * S)])
    assert got["tt.i.sum.1d"][0] == [float(4 * (2**63 - 1)), float(4 * (2**63 - 1) + 3)]
    assert got["tt.i.mean.1d"][0][0] == float(4 * (2**63 - 1)) / 4
    assert got["tt.i.sum.1s"][0] == [float(2**63 - 1), 3.0]


def test_late_fact_is_invisible_until_logged():
    ft = fact_type("int64")
    facts = [_fact(0, 1, T0, x=1.0), _fact(1, 1, T0 + 10 * S, la=T0 + 100 * S, x=2.0)]
    names = ["tt.x", "tt.x.sum.1d", "tt.count.1d", "tt.time_since_last", "tt.x.first.5s"]
    queries = [(1, T0 + 50 * S), (1, T0 + 100 * S), (1, T0 + 10 * S)]
    known = run(ft, facts, names, queries)
    event = run(ft, facts, names, queries, knowledge="event")
    assert known["tt.x"][0] == [1.0, 2.0, 1.0]
    assert event["tt.x"][0] == [2.0, 2.0, 2.0]
    assert known["tt.x.sum.1d"][0] == [1.0, 3.0, 1.0]
    assert known["tt.count.1d"] == ([1, 2, 1], ["ok"] * 3)
    assert known["tt.time_since_last"][0] == [50.0, 90.0, 10.0]
    # (t - 5s, t] at t = T0+10s holds only the late fact: invisible as known, so empty
    assert known["tt.x.first.5s"] == ([None, None, None], ["missing"] * 3)
    assert event["tt.x.first.5s"] == ([None, None, 2.0], ["missing", "missing", "ok"])


def test_window_edges_are_open_below_closed_above():
    ft = fact_type("string")
    facts = [_fact(0, "a", T0, x=1.0), _fact(1, "a", T0 + 5 * S, x=2.0)]
    got = run(ft, facts, ["tt.x.sum.5s", "tt.count.5s"],
              [("a", T0 + 5 * S), ("a", T0 + 5 * S - 1), ("a", T0 + 10 * S - 1),
               ("a", T0 + 10 * S), ("b", T0 + 5 * S)])
    assert got["tt.x.sum.5s"] == ([2.0, 1.0, 2.0, None, None],
                                  ["ok", "ok", "ok", "missing", "missing"])
    assert got["tt.count.5s"] == ([1, 1, 1, 0, 0], ["ok"] * 5)


def test_int64_keys_above_2_53_are_exact():
    ft = fact_type("int64")
    facts = [_fact(0, BIG, T0, i=1), _fact(1, BIG + 1, T0, i=2)]
    got = run(ft, facts, ["tt.i"], [(BIG + 1, T0), (BIG, T0), (BIG + 2, T0)])
    assert got["tt.i"] == ([2, 1, None], ["ok", "ok", "missing"])


def test_huge_time_span_uses_rank_keys():
    ft = fact_type("int64")
    lo, hi = -(2**61), 2**61
    facts = [_fact(k, k % 3, t, x=float(k)) for k, t in enumerate([lo, 0, hi, lo + 1, hi - 1])]
    queries = [(e, t) for e in (0, 1, 2, 5) for t in (lo, 0, hi, hi - 1)]
    check_against_reference(ft, facts, queries, ["1s", "30s"], "as_known")


def test_no_facts_gives_empty_window_values():
    ft = fact_type("int64")
    got = run(ft, [], ["tt.x", "tt.count.1d", "tt.s.distinct_count.1d", "tt.time_since_last"],
              [(1, T0), (2, T0)])
    assert got["tt.x"] == ([None, None], ["missing", "missing"])
    assert got["tt.count.1d"] == ([0, 0], ["ok", "ok"])
    assert got["tt.s.distinct_count.1d"] == ([0, 0], ["ok", "ok"])
    assert got["tt.time_since_last"] == ([None, None], ["missing", "missing"])


def test_bad_inputs():
    ft = fact_type("int64")
    table = facts_table(ft, [_fact(0, 1, T0, x=1.0), _fact(1, 2, T0, x=2.0)])
    specs = parse_features(["tt.x"], fact_types={"tt": ft})
    at = np.array([T0])
    with pytest.raises(EntityTypeMismatch):
        fact_features(table, specs, pa.array(["1"]), at, knowledge="as_known",
                      lookback_us=None, entity_col="member_id")
    with pytest.raises(InvalidInput, match="do not fit"):
        fact_features(table, specs, pa.array([2**64 - 1], pa.uint64()), at, knowledge="event",
                      lookback_us=None, entity_col="member_id")
    with pytest.raises(InvalidInput, match="knowledge"):
        fact_features(table, specs, pa.array([1]), at, knowledge="later",  # type: ignore
                      lookback_us=None, entity_col="member_id")
    with pytest.raises(InvalidInput):
        fact_features(table, specs, pa.array([1, 2]), at, knowledge="event",
                      lookback_us=None, entity_col="member_id")
    # entity blocks need not be in key order, but each entity must be one block, in time order
    table3 = facts_table(ft, [_fact(0, 1, T0), _fact(1, 2, T0), _fact(2, 1, T0 + S)])
    for order in ([0, 2, 1], [1, 0, 2]):
        with pytest.raises(ValueError, match="sorted"):
            fact_features(table3.take(pa.array(order)), specs, pa.array([1]), at,
                          knowledge="event", lookback_us=None, entity_col="member_id")
    blocks_reversed = table3.take(pa.array([2, 0, 1])).set_column(
        FIELD_X, "x", pa.array([3.0, 1.0, 2.0]))
    values, status = fact_features(blocks_reversed, specs, pa.array([1, 2]), np.array([T0, T0]),
                                   knowledge="event", lookback_us=None,
                                   entity_col="member_id")["tt.x"]
    assert values.to_pylist() == [1.0, 3.0] and list(status) == ["ok", "ok"]
    snap = parse_features(["snapshot.svc.f"], fact_types={},
                          services={"svc": {"entity_type": "int64"}})
    with pytest.raises(ValueError, match="not built-in fact features"):
        fact_features(table, snap, pa.array([1]), at, knowledge="event",
                      lookback_us=None, entity_col="member_id")


def test_last_and_first_skip_facts_logged_after_t():
    ft = fact_type("int64")
    facts = [_fact(0, 1, T0, la=T0 + 5 * S, x=1.0),             # logged exactly at the query
             _fact(1, 1, T0 + 1 * S, la=T0 + 10 * S, x=2.0),    # late: invisible at T0+5s
             _fact(2, 1, T0 + 2 * S, la=T0 + 5 * S, x=3.0),
             _fact(3, 1, T0 + 3 * S, la=T0 + 10 * S, x=4.0)]
    names = ["tt.x", "tt.x.first.1d", "tt.time_since_last", "tt.x.max.1d", "tt.x.count.1d"]
    got = run(ft, facts, names, [(1, T0 + 5 * S), (1, T0 + 5 * S - 1), (1, T0 + 10 * S)])
    assert got["tt.x"][0] == [3.0, None, 4.0]
    assert got["tt.x.first.1d"][0] == [1.0, None, 1.0]
    assert got["tt.time_since_last"][0] == [3.0, None, 7.0]
    assert got["tt.x.max.1d"][0] == [3.0, None, 4.0]
    assert got["tt.x.count.1d"][0] == [2, 0, 4]


def test_float_edge_values_in_min_max_and_distinct():
    ft = fact_type("int64")
    other_nan = struct.unpack("<d", struct.pack("<Q", 0xFFF8_0000_0000_0001))[0]  # -NaN payload
    xs = [0.0, -0.0, math.nan, other_nan, 1.0, -math.inf]
    facts = [_fact(k, 1, T0 + k * S, x=x) for k, x in enumerate(xs)]
    names = ["tt.x.distinct_count.1d", "tt.x.min.1d", "tt.x.max.1d", "tt.x.min.2s"]
    got = run(ft, facts, names, [(1, T0 + 1 * S), (1, T0 + 3 * S), (1, T0 + 5 * S)])
    assert got["tt.x.distinct_count.1d"][0] == [1, 2, 4]  # 0.0 == -0.0; NaNs are one value
    mins, maxs = got["tt.x.min.1d"][0], got["tt.x.max.1d"][0]
    assert same(mins[0], -0.0) and same(maxs[0], 0.0)  # -0.0 sorts below 0.0
    assert same(mins[2], -math.inf) and math.isnan(maxs[2])  # NaN sorts above everything
    assert math.isnan(got["tt.x.min.2s"][0][1])  # (t-2s, t] holds only the two NaNs


def test_fact_logged_one_microsecond_after_t_is_invisible():
    ft = fact_type("int64")
    facts = [_fact(0, 1, T0, la=T0 + S, x=1.0), _fact(1, 1, T0 + S, x=2.0)]
    names = ["tt.count.1d", "tt.x.sum.1d", "tt.x.count.1d", "tt.x.distinct_count.1d", "tt.x"]
    got = run(ft, facts, names, [(1, T0 + S - 1), (1, T0 + S)])
    assert got["tt.count.1d"][0] == [0, 2]
    assert got["tt.x.sum.1d"] == ([None, 3.0], ["missing", "ok"])
    assert got["tt.x.count.1d"][0] == [0, 2]
    assert got["tt.x.distinct_count.1d"][0] == [0, 2]
    assert got["tt.x"][0] == [None, 2.0]
