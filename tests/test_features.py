"""Feature names (SPEC §4): parsing, type rules, every bad name listed, entity type mismatch."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

from factlog import FactType
from timetravel_api._errors import EntityTypeMismatch, InvalidFeature, TimetravelApiError
from timetravel_api._features import FeatureSpec, parse_features
from ttstore import TIMESTAMP_TYPE, InvalidInput, TimetravelError

PLAY = FactType(
    "play", entity=("member_id", "int64"), lookback="30d",
    fields={"secs": "float64", "n": "int64", "ok": "bool", "tag": "string",
            "started": "timestamp", "meta": "json", "ids": "list<int64>",
            "names": "list<string>", "w": "list<float64>"},
)
PAGE = FactType("page", entity=("user", "string"), fields={"path": "string"})
TYPES = {"play": PLAY, "page": PAGE}
AGGS = ("count", "sum", "mean", "min", "max", "first", "last", "distinct_count")

# SPEC §4, written out: which aggregation applies to which field type.
ALLOWED = {
    "int64": set(AGGS),
    "float64": set(AGGS),
    "bool": set(AGGS),
    "string": {"count", "min", "max", "first", "last", "distinct_count"},
    "timestamp": {"count", "min", "max", "first", "last", "distinct_count"},
    "json": {"count", "last"},
    "list<int64>": {"count", "last"},
    "list<string>": {"count", "last"},
    "list<float64>": {"count", "last"},
}
FIELD_OF = {"int64": "n", "float64": "secs", "bool": "ok", "string": "tag",
            "timestamp": "started", "json": "meta", "list<int64>": "ids",
            "list<string>": "names", "list<float64>": "w"}


def parse(*names: str, **kw: Any) -> list[FeatureSpec]:
    return parse_features(list(names), fact_types=TYPES, **kw)


def test_unwindowed_last():
    a, b, c = parse("play.secs", "play.secs.last", "play.time_since_last")
    for s in (a, b):
        assert (s.kind, s.fact_type, s.field, s.agg, s.window_us) == (
            "fact_field", "play", "secs", "last", None)
        assert s.lookback_us == 30 * 86_400_000_000 and s.history_us == s.lookback_us
        assert s.output_type == pa.float64() and s.entity_type == "int64"
        assert s.entity_name == "member_id"
    assert a.name == "play.secs" and b.name == "play.secs.last"
    assert (c.kind, c.output_type, c.history_us) == ("time_since_last", pa.float64(),
                                                     30 * 86_400_000_000)


def test_windows_and_units():
    specs = parse("play.count.15s", "play.n.sum.2m", "play.n.max.3h", "play.tag.first.7d",
                  "play.secs.mean.120d")
    assert [s.window_us for s in specs] == [
        15_000_000, 120_000_000, 3 * 3_600_000_000, 7 * 86_400_000_000, 120 * 86_400_000_000]
    assert [s.window for s in specs] == ["15s", "2m", "3h", "7d", "120d"]
    assert specs[0].kind == "fact_count" and specs[0].output_type == pa.int64()
    assert specs[0].always_ok and not specs[1].always_ok
    assert specs[3].history_us == 7 * 86_400_000_000  # windows ignore the lookback


@pytest.mark.parametrize("ftype", list(ALLOWED))
@pytest.mark.parametrize("agg", AGGS)
def test_type_rules(ftype, agg):
    name = f"play.{FIELD_OF[ftype]}.{agg}.1d"
    if agg in ALLOWED[ftype]:
        (spec,) = parse(name)
        if agg in ("sum", "mean"):
            assert spec.output_type == pa.float64()
        elif agg in ("count", "distinct_count"):
            assert spec.output_type == pa.int64() and spec.always_ok
        elif ftype == "timestamp":
            assert spec.output_type == TIMESTAMP_TYPE
        elif ftype == "json":
            assert spec.output_type == pa.string()
        else:
            assert spec.output_type == PLAY.arrow_schema().field(FIELD_OF[ftype]).type
    else:
        with pytest.raises(InvalidFeature) as exc:
            parse(name)
        assert exc.value.problems[0][0] == name


def test_all_bad_names_are_listed_with_reasons():
    bad = {
        "nope.secs": "unknown fact type",
        "play.nope": "no field",
        "play.secs.sum": "needs a window",
        "play.count": "needs one window",
        "play.count.0d": "malformed window",
        "play.secs.sum.7w": "malformed window",
        "play.secs.sum.07d": "malformed window",
        "play.secs.sum.1.5h": "malformed",
        "play.secs.sum.7D": "malformed window",
        "play.secs.sum. 7d": "malformed window",
        "play.secs.avg.7d": "unknown aggregation",
        "play.tag.sum.7d": "sum applies to",
        "play.meta.first.1d": "json fields allow only last and count",
        "play.ids.max.1d": "list<int64> fields allow only",
        "play.time_since_last.1d": "takes no window",
        "play": "malformed",
        "play..secs": "malformed",
        "snapshot.history": "snapshot.S.F",
        "snapshot.unknown_svc.f": "unknown snapshot service",
        "": "malformed",
    }
    names = ["play.secs.sum.7d", *bad, "play.secs.sum.7d"]
    with pytest.raises(InvalidFeature) as exc:
        parse(*names)
    err = exc.value
    listed = dict(err.problems)
    assert list(listed) == [*bad, "play.secs.sum.7d"]
    for name, why in bad.items():
        assert why in listed[name], (name, listed[name])
        assert repr(name) in err.message
    assert "requested more than once" in listed["play.secs.sum.7d"]
    assert err.code == "invalid_feature" and err.http_status == 400
    assert isinstance(err, TimetravelApiError) and isinstance(err, InvalidInput)
    assert isinstance(err, TimetravelError)


def test_non_strings_and_empty_requests():
    with pytest.raises(InvalidFeature) as exc:
        parse_features(["play.secs", 3, None], fact_types=TYPES)
    assert [p[0] for p in exc.value.problems] == ["3", "None"]
    with pytest.raises(InvalidFeature, match="no features"):
        parse_features([], fact_types=TYPES)


def test_entity_type_mismatch_lists_the_features():
    with pytest.raises(EntityTypeMismatch) as exc:
        parse("play.secs", "page.path.last.1d", "play.count.1d")
    err = exc.value
    assert err.by_type == {"int64": ["play.secs", "play.count.1d"],
                           "string": ["page.path.last.1d"]}
    assert err.code == "entity_type_mismatch" and err.http_status == 400
    for name in ("play.secs", "page.path.last.1d", "play.count.1d"):
        assert name in err.message


def test_snapshot_features_and_mismatch_with_facts():
    services = {"history": {"entity_type": "int64"}, "profile": {"entity_type": "string"}}
    (s,) = parse("snapshot.history.n_titles", services=services)
    assert (s.kind, s.service, s.field, s.entity_type, s.output_type) == (
        "snapshot", "history", "n_titles", "int64", None)
    with pytest.raises(EntityTypeMismatch):
        parse("play.secs", "snapshot.profile.country", services=services)
    with pytest.raises(InvalidFeature, match="not a valid name"):
        parse("snapshot.history.Bad", services=services)


def test_named_encoders_are_a_hook():
    class Enc:
        entity_type = "int64"
        output_type = pa.float64()

    enc = Enc()
    specs = parse("watch_ratio", "play.secs", encoders={"watch_ratio": enc})
    assert specs[0].kind == "encoder" and specs[0].encoder is enc
    assert specs[0].output_type == pa.float64() and specs[0].entity_type == "int64"
    with pytest.raises(InvalidFeature):
        parse("watch_ratio")  # not registered: not a feature
    with pytest.raises(EntityTypeMismatch):
        parse("watch_ratio", "page.path.last.1d", encoders={"watch_ratio": enc})
