"""Producer rows and tables into stored facts: every rejection names the fact type, the field and
the reason, and the valid rows of the same call are kept (SPEC §1, §2)."""

from __future__ import annotations

import json
import re
import uuid
from collections import OrderedDict
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pyarrow as pa
import pytest

from factlog import (
    DEFAULT_SKEW_US,
    FactType,
    FactValidationError,
    Rejection,
    rows_to_table,
    table_to_facts,
)
from factlog._ids import uuid7_array
from ttstore import TIMESTAMP_TYPE, format_timestamp

T = 1_795_687_200_000_000  # 2026-11-26T10:00:00Z
S = 1_000_000
TS = format_timestamp

PLAY = FactType(
    "play",
    entity=("member_id", "int64"),
    fields={
        "video_id": "int64", "secs": "float64", "ok": "bool", "tag": "string", "at": "timestamp",
        "meta": "json", "ids": "list<int64>", "xs": "list<float64>", "names": "list<string>",
    },
)
PAGE = FactType("page", entity=("user", "string"), fields={"path": "string", "n": "int64"})
UUID_RE = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-7[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def good_row(i: int) -> dict[str, Any]:
    return {
        "member_id": i, "event_time": TS(T - 60 * S + i), "video_id": 100 + i, "secs": i * 1.5,
        "ok": i % 2 == 0, "tag": f"t{i}", "at": TS(T - i * S), "meta": {"i": i, "a": [1, None]},
        "ids": [i, i + 1], "xs": [0.5, i], "names": ["a", f"n{i}"],
    }


def run(rows: list[Any], ft: FactType = PLAY, **kw: Any) -> tuple[pa.Table, list[Rejection]]:
    args: dict[str, Any] = {"logged_at_us": T, "now_us": T, "producer": "svc"}
    args.update(kw)
    return rows_to_table(ft, rows, **args)


def one_rejection(bad: Any, ft: FactType = PLAY, **kw: Any) -> Rejection:
    """``bad`` between two valid rows: exactly it is rejected, both neighbours are kept."""
    rows = [good_row(1), bad, good_row(3)] if ft is PLAY else [
        {"user": "a", "path": "/a"}, bad, {"user": "c", "path": "/c"}]
    table, rej = run(rows, ft, **kw)
    assert len(rej) == 1, rej
    assert rej[0].index == 1
    assert rej[0].message.startswith(f"fact type {ft.name!r}")
    if rej[0].field is not None:
        assert repr(rej[0].field) in rej[0].message
    ent = ft.entity_name
    assert table.column(ent).to_pylist() == ([1, 3] if ft is PLAY else ["a", "c"])
    return rej[0]


# --- valid rows ------------------------------------------------------------------------------


def test_valid_rows_in_order_with_every_type() -> None:
    rows = [good_row(i) for i in range(5)]
    table, rej = run(rows)
    assert rej == []
    assert table.schema == PLAY.arrow_schema().remove_metadata()
    assert table.column("member_id").to_pylist() == list(range(5))
    assert table.column("video_id").to_pylist() == [100 + i for i in range(5)]
    assert table.column("secs").to_pylist() == [i * 1.5 for i in range(5)]
    assert table.column("ok").to_pylist() == [True, False, True, False, True]
    assert table.column("tag").to_pylist() == [f"t{i}" for i in range(5)]
    assert table.column("at").cast(pa.int64()).to_pylist() == [T - i * S for i in range(5)]
    assert table.column("event_time").cast(pa.int64()).to_pylist() == [
        T - 60 * S + i for i in range(5)]
    assert table.column("logged_at").cast(pa.int64()).to_pylist() == [T] * 5
    assert table.column("ingested_at").cast(pa.int64()).to_pylist() == [T] * 5
    assert table.column("producer").to_pylist() == ["svc"] * 5
    # json fields hold canonical JSON text: sorted keys, no spaces.
    assert table.column("meta").to_pylist() == [f'{{"a":[1,null],"i":{i}}}' for i in range(5)]
    assert table.column("ids").to_pylist() == [[i, i + 1] for i in range(5)]
    assert table.column("xs").to_pylist() == [[0.5, float(i)] for i in range(5)]
    assert table.column("names").to_pylist() == [["a", f"n{i}"] for i in range(5)]
    ids = table.column("fact_id").to_pylist()
    assert len(set(ids)) == 5 and all(UUID_RE.match(x) for x in ids)


def test_missing_fields_are_null_and_fields_may_come_in_any_order() -> None:
    rows = [{"member_id": 1}, OrderedDict([("tag", "x"), ("member_id", 2)]),
            {"member_id": 3, "video_id": None, "meta": None, "ids": None}]
    table, rej = run(rows)
    assert rej == []
    assert table.column("tag").to_pylist() == [None, "x", None]
    assert table.column("video_id").to_pylist() == [None, None, None]
    assert table.column("meta").to_pylist() == [None, None, None]


def test_event_time_defaults_to_logged_at() -> None:
    logged = np.array([T, T + 1, T + 2], dtype=np.int64)
    table, rej = run([{"member_id": 1}, {"member_id": 2, "event_time": None},
                      {"member_id": 3, "event_time": TS(T - S)}], logged_at_us=logged)
    assert rej == []
    assert table.column("logged_at").cast(pa.int64()).to_pylist() == [T, T + 1, T + 2]
    assert table.column("event_time").cast(pa.int64()).to_pylist() == [T, T + 1, T - S]


def test_times_as_aware_datetimes_and_offsets() -> None:
    rows = [
        {"member_id": 1, "event_time": datetime(2026, 11, 26, 9, 59, tzinfo=UTC)},
        {"member_id": 2, "event_time": "2026-11-26T10:59:00+01:00"},
        {"member_id": 3, "event_time": "2026-11-26T09:59:00.000001Z", "at": "2026-11-26t09:00:00z"},
    ]
    table, rej = run(rows)
    assert rej == []
    assert table.column("event_time").cast(pa.int64()).to_pylist() == [
        T - 60 * S, T - 60 * S, T - 60 * S + 1]
    assert table.column("at").cast(pa.int64()).to_pylist() == [None, None, T - 3600 * S]


def test_event_time_within_the_skew_allowance_is_kept() -> None:
    table, rej = run([{"member_id": 1, "event_time": TS(T + DEFAULT_SKEW_US)}])
    assert rej == [] and table.num_rows == 1


def test_supplied_fact_id_and_logged_at() -> None:
    rows = [
        {"member_id": 1, "fact_id": "req-42:a.b_c", "logged_at": TS(T - 3600 * S)},
        {"member_id": 2},
    ]
    table, rej = run(rows, now_us=T + 10 * S, ingested_at_us=T + 10 * S)
    assert rej == []
    assert table.column("fact_id")[0].as_py() == "req-42:a.b_c"
    assert UUID_RE.match(table.column("fact_id")[1].as_py())
    assert table.column("logged_at").cast(pa.int64()).to_pylist() == [T - 3600 * S, T]
    assert table.column("event_time").cast(pa.int64()).to_pylist() == [T - 3600 * S, T]
    assert table.column("ingested_at").cast(pa.int64()).to_pylist() == [T + 10 * S] * 2


def test_int64_keys_above_2_53_as_decimal_strings() -> None:
    big = 2**53 + 1
    rows = [{"member_id": str(big)}, {"member_id": big}, {"member_id": "-7"},
            {"member_id": str(2**63 - 1)}]
    table, rej = run(rows)
    assert rej == []
    assert table.column("member_id").to_pylist() == [big, big, -7, 2**63 - 1]


def test_string_keys_stay_strings() -> None:
    table, rej = run([{"user": "007"}, {"user": "x"}], PAGE)
    assert rej == [] and table.column("user").to_pylist() == ["007", "x"]


def test_json_values() -> None:
    values = [{"b": 1, "a": {"d": [1, 2], "c": "x"}}, [1, "two", None], 3, 2.5, "text", True,
              None, {}]
    table, rej = run([{"member_id": i, "meta": v} for i, v in enumerate(values)])
    assert rej == []
    got = table.column("meta").to_pylist()
    assert got[0] == '{"a":{"c":"x","d":[1,2]},"b":1}'
    assert [None if g is None else json.loads(g) for g in got] == values


def test_int_values_in_float_fields() -> None:
    table, rej = run([{"member_id": 1, "secs": 3, "xs": [1, 2.5]}])
    assert rej == []
    assert table.column("secs").to_pylist() == [3.0]
    assert table.column("xs").to_pylist() == [[1.0, 2.5]]


def test_empty_input() -> None:
    table, rej = run([])
    assert rej == [] and table.num_rows == 0
    assert table.schema == PLAY.arrow_schema().remove_metadata()


# --- rejections ------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", [["member_id", 2], "a string", 7, None])
def test_a_fact_must_be_an_object(bad: Any) -> None:
    r = one_rejection(bad)
    assert (r.field, r.code) == (None, "invalid_fact")


def test_unknown_field() -> None:
    r = one_rejection({"member_id": 2, "zzz": 1, "bogus": 2})
    assert (r.field, r.code) == ("bogus", "unknown_field")
    assert "unknown field 'bogus'" in r.message


@pytest.mark.parametrize("row", [{"video_id": 1}, {"member_id": None}])
def test_missing_entity(row: dict[str, Any]) -> None:
    r = one_rejection(row)
    assert (r.field, r.code) == ("member_id", "missing_entity")


@pytest.mark.parametrize("key", ["abc", "1.5", "1e3", " 12", "12 ", "12\n", "", 1.5, True,
                                 [1], 2**63, str(2**63), -(2**63) - 1])
def test_bad_int64_keys(key: Any) -> None:
    r = one_rejection({"member_id": key})
    assert (r.field, r.code) == ("member_id", "invalid_type")


@pytest.mark.parametrize("key", ["", 7, None, ["x"]])
def test_bad_string_keys(key: Any) -> None:
    r = one_rejection({"user": key}, PAGE)
    assert r.field == "user"
    assert r.code == ("missing_entity" if key is None else "invalid_type")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("video_id", "12"),
        ("video_id", 1.5),
        ("video_id", True),
        ("video_id", 2**63),
        ("video_id", [1]),
        ("secs", "1.0"),
        ("secs", True),
        ("secs", {"x": 1}),
        ("ok", 1),
        ("ok", "true"),
        ("tag", 5),
        ("tag", ["a"]),
        ("ids", "12"),
        ("ids", 5),
        ("ids", [1, "a"]),
        ("ids", [1.5]),
        ("ids", [True]),
        ("xs", ["a"]),
        ("xs", [True]),
        ("names", "ab"),
        ("names", [1]),
        ("names", {"a": 1}),
    ],
)
def test_wrong_field_types(field: str, value: Any) -> None:
    r = one_rejection({"member_id": 2, field: value})
    assert (r.field, r.code) == (field, "invalid_type")
    assert re.search(r"is not a valid (int64|float64|bool|string|list<\w+>)", r.message)


@pytest.mark.parametrize("value", [{1, 2}, float("nan"), float("inf"), object(), {"a": b"x"}])
def test_json_fields_must_be_json(value: Any) -> None:
    r = one_rejection({"member_id": 2, "meta": value})
    assert (r.field, r.code) == ("meta", "invalid_value")


@pytest.mark.parametrize(
    ("value", "reason"),
    [
        ("2026-11-26T09:00:00", "no time zone offset"),
        ("2026-11-26T09:00:00.1234567Z", "more than 6 fractional digits"),
        ("2026-02-30T09:00:00Z", "not a valid time"),
        ("soon", "not an RFC 3339 timestamp"),
        (1_795_687_200, "expected an RFC 3339 string"),
        (datetime(2026, 11, 26, 9), "no time zone offset"),
    ],
)
@pytest.mark.parametrize("field", ["event_time", "at", "logged_at"])
def test_bad_timestamps_name_the_field(field: str, value: Any, reason: str) -> None:
    r = one_rejection({"member_id": 2, field: value})
    assert (r.field, r.code) == (field, "invalid_timestamp")
    assert reason in r.message


def test_event_time_after_logged_at() -> None:
    r = one_rejection({"member_id": 2, "event_time": TS(T + DEFAULT_SKEW_US + 1)})
    assert (r.field, r.code) == ("event_time", "event_after_logged_at")
    # Against a supplied logged_at too.
    r2 = one_rejection({"member_id": 2, "logged_at": TS(T - 3600 * S), "event_time": TS(T)})
    assert (r2.field, r2.code) == ("event_time", "event_after_logged_at")


def test_skew_allowance_is_configurable() -> None:
    r = one_rejection({"member_id": 2, "event_time": TS(T + 2)}, skew_us=1)
    assert r.code == "event_after_logged_at"


def test_logged_at_in_the_future() -> None:
    r = one_rejection({"member_id": 2, "logged_at": TS(T + DEFAULT_SKEW_US + 1)})
    assert (r.field, r.code) == ("logged_at", "logged_at_in_future")


def test_logged_at_needs_the_write_scope() -> None:
    r = one_rejection({"member_id": 2, "logged_at": TS(T - S)}, allow_logged_at=False)
    assert (r.field, r.code) == ("logged_at", "forbidden")


@pytest.mark.parametrize("fid", ["", "-x", "a b", "x" * 129, 12, "a/b", "id\n"])
def test_bad_fact_ids(fid: Any) -> None:
    r = one_rejection({"member_id": 2, "fact_id": fid})
    assert (r.field, r.code) == ("fact_id", "invalid_fact_id")


def test_many_problems_one_rejection_per_row_in_index_order() -> None:
    rows = [
        {"member_id": "x", "video_id": "y"},  # two problems: one rejection
        good_row(1),
        {"member_id": 3, "nope": 1},
        {"member_id": 4, "event_time": "2026-11-26T09:00:00"},
        good_row(5),
        {"member_id": 6, "secs": "s", "meta": {1, 2}},
    ]
    table, rej = run(rows)
    assert [r.index for r in rej] == [0, 2, 3, 5]
    assert [r.code for r in rej] == ["invalid_type", "unknown_field", "invalid_timestamp",
                                     "invalid_type"]
    assert rej[0].field in ("member_id", "video_id")
    assert table.column("member_id").to_pylist() == [1, 5]
    assert table.column("video_id").to_pylist() == [101, 105]
    assert rej[1].to_json() == {"index": 2, "field": "nope", "code": "unknown_field",
                                "message": rej[1].message}


def test_every_row_rejected_gives_an_empty_table() -> None:
    table, rej = run([{"member_id": "x"}, {"member_id": None}])
    assert table.num_rows == 0 and len(rej) == 2


# --- the Arrow fast path ---------------------------------------------------------------------


def _tbl(**cols: Any) -> pa.Table:
    return pa.table(cols)


def _facts(t: pa.Table, ft: FactType = PLAY, **kw: Any) -> tuple[pa.Table, list[Rejection]]:
    args: dict[str, Any] = {"logged_at_us": T, "now_us": T, "producer": "bulk"}
    args.update(kw)
    return table_to_facts(ft, t, **args)


def _ts(values: list[int | None], unit: str = "us", tz: str | None = "UTC") -> pa.Array:
    return pa.array(values, pa.int64()).cast(pa.timestamp(unit, tz=tz))


def test_table_to_facts_valid() -> None:
    t = _tbl(member_id=pa.array([1, 2, 3]), event_time=_ts([T - 3, T - 2, None]),
             video_id=pa.array([7, None, 9]), tag=pa.array(["a", "b", "c"]))
    out, rej = _facts(t)
    assert rej == []
    assert out.schema == PLAY.arrow_schema().remove_metadata()
    assert out.column("member_id").to_pylist() == [1, 2, 3]
    assert out.column("event_time").cast(pa.int64()).to_pylist() == [T - 3, T - 2, T]
    assert out.column("logged_at").cast(pa.int64()).to_pylist() == [T] * 3
    assert out.column("video_id").to_pylist() == [7, None, 9]
    assert out.column("secs").to_pylist() == [None] * 3  # undeclared in the table: null
    assert out.column("producer").to_pylist() == ["bulk"] * 3
    assert len(set(out.column("fact_id").to_pylist())) == 3


def test_table_to_facts_casts_safely_and_converts_time_units() -> None:
    t = _tbl(member_id=pa.array([1, 2], pa.int32()),
             event_time=_ts([(T - S) // 1000, T // 1000], "ms"),
             secs=pa.array([1, 2], pa.int32()))
    out, rej = _facts(t)
    assert rej == []
    assert out.column("member_id").type == pa.int64()
    assert out.column("event_time").cast(pa.int64()).to_pylist() == [T - S, T]
    assert out.column("secs").to_pylist() == [1.0, 2.0]


def test_table_to_facts_supplied_ids_and_logged_at() -> None:
    t = _tbl(member_id=pa.array([1, 2]), event_time=_ts([T - 5 * S, T - 5 * S]),
             fact_id=pa.array(["mine", None]), logged_at=_ts([T - S, None]))
    out, rej = _facts(t, now_us=T + S)
    assert rej == []
    ids = out.column("fact_id").to_pylist()
    assert ids[0] == "mine" and UUID_RE.match(ids[1])
    assert out.column("logged_at").cast(pa.int64()).to_pylist() == [T - S, T]


@pytest.mark.parametrize(
    ("table", "field", "code"),
    [
        (_tbl(member_id=pa.array([1]), event_time=_ts([T]), nope=pa.array([1])), "nope",
         "unknown_field"),
        (_tbl(member_id=pa.array([1])), "event_time", "missing_field"),
        (_tbl(member_id=pa.array([1]), event_time=_ts([T], tz=None)), "event_time",
         "invalid_timestamp"),
        (_tbl(member_id=pa.array([1]), event_time=pa.array([T])), "event_time",
         "invalid_timestamp"),
        (_tbl(member_id=pa.array(["x"]), event_time=_ts([T])), "member_id", "invalid_type"),
        (_tbl(member_id=pa.array([1]), event_time=_ts([T]), video_id=pa.array([1.5])),
         "video_id", "invalid_type"),
        (_tbl(member_id=pa.array([1]), event_time=_ts([T]), at=_ts([T], tz=None)), "at",
         "invalid_timestamp"),
    ],
)
def test_table_to_facts_whole_table_errors(table: pa.Table, field: str, code: str) -> None:
    with pytest.raises(FactValidationError) as exc:
        _facts(table)
    err = exc.value
    assert (err.fact_type, err.field, err.code) == ("play", field, code)
    assert err.message.startswith("fact type 'play', field ")
    assert err.http_status == 400


def test_table_to_facts_logged_at_needs_the_write_scope() -> None:
    t = _tbl(member_id=pa.array([1]), event_time=_ts([T - S]), logged_at=_ts([T - S]))
    with pytest.raises(FactValidationError) as exc:
        _facts(t, allow_logged_at=False)
    assert (exc.value.field, exc.value.code) == ("logged_at", "forbidden")
    # An all-null logged_at column supplies nothing, so it is allowed.
    t2 = _tbl(member_id=pa.array([1]), event_time=_ts([T - S]), logged_at=_ts([None]))
    out, rej = _facts(t2, allow_logged_at=False)
    assert rej == [] and out.num_rows == 1


def test_table_to_facts_row_rejections_keep_the_valid_rows() -> None:
    t = _tbl(
        member_id=pa.array([1, None, 3, 4, 5]),
        event_time=_ts([T - S, T - S, T + DEFAULT_SKEW_US + 1, T - S, T - S]),
        logged_at=_ts([None, None, None, T + DEFAULT_SKEW_US + 1, None]),
        video_id=pa.array([10, 20, 30, 40, 50]),
    )
    out, rej = _facts(t)
    assert [(r.index, r.field, r.code) for r in rej] == [
        (1, "member_id", "missing_entity"),
        (2, "event_time", "event_after_logged_at"),
        (3, "logged_at", "logged_at_in_future"),
    ]
    assert all(r.message.startswith("fact type 'play', field ") for r in rej)
    assert out.column("member_id").to_pylist() == [1, 5]
    assert out.column("video_id").to_pylist() == [10, 50]


def test_table_to_facts_chunked_input() -> None:
    t = pa.concat_tables([
        _tbl(member_id=pa.array([1]), event_time=_ts([T - S])),
        _tbl(member_id=pa.array([2]), event_time=_ts([T - 2 * S])),
    ])
    out, rej = _facts(t)
    assert rej == [] and out.column("member_id").to_pylist() == [1, 2]


def test_both_paths_store_the_same_facts() -> None:
    rows = [{"member_id": i, "event_time": TS(T - i * S), "video_id": i * 3, "tag": f"x{i}",
             "fact_id": f"id{i}"} for i in range(20)]
    a, ra = run(rows)
    t = _tbl(member_id=pa.array(range(20)), event_time=_ts([T - i * S for i in range(20)]),
             video_id=pa.array([i * 3 for i in range(20)]),
             tag=pa.array([f"x{i}" for i in range(20)]),
             fact_id=pa.array([f"id{i}" for i in range(20)]))
    b, rb = _facts(t, producer="svc")
    assert ra == rb == []
    assert a.equals(b)


# --- fact ids --------------------------------------------------------------------------------


def test_uuid7_canonical_unique_and_time_ordered() -> None:
    n = 50_000
    logged = T + np.arange(n, dtype=np.int64) * 7  # distinct microseconds, increasing
    ids = uuid7_array(logged).to_pylist()
    assert len(set(ids)) == n
    assert all(UUID_RE.match(x) for x in ids)
    assert ids == sorted(ids)
    for x, us in zip(ids[:200], logged[:200], strict=True):
        u = uuid.UUID(x)
        assert str(u) == x
        assert u.version == 7 and u.variant == uuid.RFC_4122
        assert u.int >> 80 == int(us) // 1000  # the 48-bit millisecond timestamp


def test_uuid7_same_microsecond_is_still_unique() -> None:
    ids = uuid7_array(np.full(10_000, T, dtype=np.int64)).to_pylist()
    assert len(set(ids)) == 10_000
    assert len({x[:18] for x in ids}) == 1  # same time prefix, random tail


def test_uuid7_empty_and_arrow_type() -> None:
    assert uuid7_array(np.zeros(0, dtype=np.int64)).to_pylist() == []
    arr = uuid7_array(np.array([T], dtype=np.int64))
    assert arr.type == pa.string() and len(arr[0].as_py()) == 36


def test_generated_ids_follow_logged_at_order_across_rows() -> None:
    logged = np.array([T + 5, T + 1, T + 3000], dtype=np.int64)
    table, rej = run([{"member_id": i} for i in range(3)], logged_at_us=logged)
    assert rej == []
    ids = table.column("fact_id").to_pylist()
    assert ids[1] < ids[0] < ids[2]


def test_timestamp_columns_are_utc_microseconds() -> None:
    table, _ = run([good_row(1)])
    for c in ("event_time", "logged_at", "ingested_at", "at"):
        assert table.schema.field(c).type == TIMESTAMP_TYPE
