"""Fact type declarations (SPEC §2): names, reserved words, types, lookback, and the versioned
catalog in the store, on every backend."""

from __future__ import annotations

import json
import threading

import pyarrow as pa
import pytest

from factlog import Declared, FactType, FactTypeCatalog, FactTypeError, UnknownFactType
from ttstore import (
    AGGREGATIONS,
    FIELD_TYPES,
    SYSTEM_COLUMNS,
    TIMESTAMP_TYPE,
    InvalidInput,
    ManualClock,
    Store,
)

T = 1_795_687_200_000_000  # 2026-11-26T10:00:00Z

ALL_TYPES = {f"f_{i}": t for i, t in enumerate(FIELD_TYPES)}


# --- names -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["a", "play", "play_v2", "x9", "a" * 63, "a_"])
def test_valid_names(name: str) -> None:
    ft = FactType(name, entity=(name, "string"), fields={f"{name[:61]}_f": "int64"})
    assert ft.name == name and ft.entity_name == name


@pytest.mark.parametrize(
    "name", ["", "Play", "9play", "_play", "play-v2", "play.v2", "pläy", "a" * 64, "../x", "x/y",
             "play\n", " play", 7, None],
)
def test_bad_fact_type_names(name: object) -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType(name)  # type: ignore[arg-type]
    assert exc.value.code == "invalid_name"
    assert exc.value.fact_type == str(name)
    assert exc.value.http_status == 400


@pytest.mark.parametrize("fname", ["", "Video", "1x", "_x", "x-y", "a" * 64, "x\n"])
def test_bad_field_names_name_the_type_and_field(fname: str) -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("play", fields={fname: "int64"})
    err = exc.value
    assert (err.code, err.fact_type, err.field) == ("invalid_name", "play", fname)
    assert "'play'" in err.message


def test_bad_entity_name() -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("play", entity=("Member", "int64"))
    assert (exc.value.code, exc.value.field) == ("invalid_name", "Member")


def test_snapshot_is_a_reserved_fact_type_name() -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("snapshot")
    assert (exc.value.code, exc.value.fact_type) == ("reserved_name", "snapshot")
    FactType("snapshots")  # only the exact name is reserved


RESERVED = sorted({*AGGREGATIONS, "count", "time_since_last", *SYSTEM_COLUMNS})


def test_the_reserved_field_names_are_the_specs() -> None:
    assert RESERVED == sorted([
        "count", "sum", "mean", "min", "max", "first", "last", "distinct_count",
        "time_since_last", "fact_id", "event_time", "logged_at", "ingested_at", "producer",
    ])


@pytest.mark.parametrize("fname", RESERVED)
def test_reserved_field_names(fname: str) -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("play", fields={"ok": "int64", fname: "int64"})
    err = exc.value
    assert (err.code, err.fact_type, err.field) == ("reserved_name", "play", fname)
    assert fname in err.message and "reserved" in err.message
    with pytest.raises(FactTypeError) as exc2:
        FactType("play", entity=(fname, "int64"))
    assert (exc2.value.code, exc2.value.field) == ("reserved_name", fname)


def test_a_field_named_like_the_entity_key_is_rejected() -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("play", entity=("member_id", "int64"), fields={"member_id": "string"})
    assert (exc.value.code, exc.value.field) == ("reserved_name", "member_id")


# --- types -----------------------------------------------------------------------------------


def test_every_field_type_and_the_stored_schema() -> None:
    ft = FactType("all_types", entity=("device", "string"), fields=ALL_TYPES, lookback="30d")
    schema = ft.arrow_schema()
    assert schema.names == ["fact_id", "device", "event_time", "logged_at", "ingested_at",
                            "producer", *ALL_TYPES]
    expected = {
        "int64": pa.int64(), "float64": pa.float64(), "bool": pa.bool_(), "string": pa.string(),
        "timestamp": TIMESTAMP_TYPE, "json": pa.string(), "list<int64>": pa.list_(pa.int64()),
        "list<float64>": pa.list_(pa.float64()), "list<string>": pa.list_(pa.string()),
    }
    assert set(FIELD_TYPES) == set(expected)
    for fname, tname in ALL_TYPES.items():
        assert schema.field(fname).type == expected[tname]
        assert schema.field(fname).nullable
    assert schema.field("device").type == pa.string() and not schema.field("device").nullable
    for c in ("fact_id", "event_time", "logged_at", "ingested_at"):
        assert not schema.field(c).nullable
    assert schema.field("event_time").type == TIMESTAMP_TYPE
    assert schema.metadata == {b"timetravel.fact_type": b"all_types"}
    assert FactType("p").arrow_schema().field("member_id").type == pa.int64()


@pytest.mark.parametrize("tname", ["int", "float", "list<bool>", "list<list<int64>>", "map",
                                   "INT64", "timestamp[us]", ""])
def test_unknown_field_types(tname: str) -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("play", fields={"video_id": tname})
    err = exc.value
    assert (err.code, err.fact_type, err.field) == ("invalid_type", "play", "video_id")
    assert repr(tname) in err.message


@pytest.mark.parametrize("etype", ["float64", "bool", "timestamp", "json", "list<int64>"])
def test_entity_key_must_be_int64_or_string(etype: str) -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("play", entity=("member_id", etype))
    assert (exc.value.code, exc.value.field) == ("invalid_type", "member_id")


def test_entity_must_be_a_pair() -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("play", entity=("member_id",))  # type: ignore[arg-type]
    assert exc.value.field == "entity"


# --- lookback --------------------------------------------------------------------------------


def test_lookback() -> None:
    assert FactType("play").lookback_us is None
    assert FactType("play", lookback="30d").lookback_us == 30 * 86_400_000_000
    assert FactType("play", lookback="90m").lookback_us == 90 * 60_000_000


@pytest.mark.parametrize("lookback", ["0d", "30", "1w", "1.5h", "-1d", ""])
def test_bad_lookback(lookback: str) -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType("play", lookback=lookback)
    err = exc.value
    assert (err.code, err.fact_type, err.field) == ("invalid_duration", "play", "lookback")


# --- JSON form -------------------------------------------------------------------------------


def test_json_round_trip() -> None:
    ft = FactType("play", entity=("device", "string"), fields=ALL_TYPES, lookback="7d")
    body = json.loads(json.dumps(ft.to_json()))
    assert FactType.from_json("play", body) == ft
    assert list(FactType.from_json("play", body).fields) == list(ALL_TYPES)  # order is kept
    assert FactType.from_json("p", {}) == FactType("p")


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"fields": {}, "extra": 1}, "extra"),
        ({"name": "other"}, "name"),
        ({"entity": "member_id"}, "entity"),
        ({"entity": {"name": "m", "type": "int64", "x": 1}}, "entity"),
        ({"fields": ["a"]}, "fields"),
    ],
)
def test_bad_json_declarations(body: dict[str, object], field: str) -> None:
    with pytest.raises(FactTypeError) as exc:
        FactType.from_json("play", body)
    assert (exc.value.fact_type, exc.value.field) == ("play", field)


def test_json_declaration_must_be_an_object() -> None:
    with pytest.raises(FactTypeError):
        FactType.from_json("play", ["x"])  # type: ignore[arg-type]


# --- the catalog, on every backend -----------------------------------------------------------


def _stored(store: Store, name: str, version: int) -> dict[str, object]:
    raw: dict[str, object] = json.loads(
        store.get(f"catalog/fact_types/{name}/v{version:06d}.json")
    )
    return raw


def test_catalog_declare_evolve_and_history(store: Store) -> None:
    cat = FactTypeCatalog(store, clock=ManualClock(T))
    v1 = FactType("play", fields={"video_id": "int64", "secs": "float64"}, lookback="30d")
    d1 = cat.declare(v1)
    assert (d1.version, d1.created, d1.fact_type) == (1, True, v1)
    body = _stored(store, "play", 1)
    assert body == {
        "name": "play", "entity": {"name": "member_id", "type": "int64"},
        "fields": {"video_id": "int64", "secs": "float64"}, "lookback": "30d",
        "version": 1, "declared_at": "2026-11-26T10:00:00.000000Z",
    }
    # The same declaration again writes nothing.
    again = cat.declare(v1)
    assert (again.version, again.created) == (1, False)
    # Adding a nullable field is a new version; the old one is kept.
    v2 = FactType("play", fields={"video_id": "int64", "secs": "float64", "tag": "string"},
                  lookback="30d")
    d2 = cat.declare(v2)
    assert (d2.version, d2.created, d2.fact_type) == (2, True, v2)
    assert [o.key for o in store.list("catalog")] == [
        "catalog/fact_types/play/v000001.json", "catalog/fact_types/play/v000002.json",
    ]
    assert cat.history("play") == [v1, v2]
    assert _stored(store, "play", 1)["fields"] == {"video_id": "int64", "secs": "float64"}
    # A fresh catalog on the same store reads what is there.
    fresh = FactTypeCatalog(store)
    assert fresh.get("play") == v2
    assert fresh.get_versioned("play") == (2, v2)
    assert fresh.names() == ["play"]
    assert fresh.all() == [v2]


def test_catalog_rejects_a_type_change_naming_the_field(store: Store) -> None:
    cat = FactTypeCatalog(store)
    cat.declare(FactType("play", fields={"video_id": "int64", "secs": "float64"}))
    with pytest.raises(FactTypeError) as exc:
        cat.declare(FactType("play", fields={"video_id": "string", "secs": "float64"}))
    err = exc.value
    assert (err.code, err.fact_type, err.field) == ("incompatible_schema", "play", "video_id")
    assert "video_id" in err.message and "int64" in err.message and "string" in err.message
    with pytest.raises(FactTypeError) as exc2:
        cat.declare(FactType("play", entity=("member_id", "string")))
    assert exc2.value.code == "incompatible_schema"
    with pytest.raises(FactTypeError) as exc3:
        cat.declare(FactType("play", entity=("device", "int64")))
    assert exc3.value.code == "incompatible_schema"
    assert [o.key for o in store.list("catalog")] == ["catalog/fact_types/play/v000001.json"]


def test_catalog_accepts_a_subset_and_writes_nothing(store: Store) -> None:
    cat = FactTypeCatalog(store)
    full = FactType("play", fields={"video_id": "int64", "secs": "float64", "tag": "string"},
                    lookback="7d")
    cat.declare(full)
    before = store.list()
    for subset in (
        FactType("play", fields={"video_id": "int64"}),
        FactType("play", fields={"tag": "string", "video_id": "int64"}),
        FactType("play"),
        FactType("play", fields={"secs": "float64"}, lookback="7d"),
    ):
        d = cat.declare(subset)
        assert (d.version, d.created, d.fact_type) == (1, False, full)
    assert store.list() == before


def test_catalog_new_lookback_is_a_new_version(store: Store) -> None:
    cat = FactTypeCatalog(store)
    cat.declare(FactType("play", fields={"v": "int64"}))
    d = cat.declare(FactType("play", fields={"v": "int64"}, lookback="30d"))
    assert (d.version, d.fact_type.lookback) == (2, "30d")
    assert [ft.lookback for ft in cat.history("play")] == [None, "30d"]


def test_catalog_unknown_types(store: Store) -> None:
    cat = FactTypeCatalog(store)
    with pytest.raises(UnknownFactType) as exc:
        cat.get("nope")
    assert exc.value.code == "unknown_fact_type" and exc.value.http_status == 404
    assert "nope" in str(exc.value)
    assert cat.history("nope") == []
    assert cat.names() == []
    with pytest.raises(InvalidInput):
        cat.get("../x")


def test_catalog_cache_and_refresh(store: Store) -> None:
    a, b = FactTypeCatalog(store), FactTypeCatalog(store)
    a.declare(FactType("play", fields={"v": "int64"}))
    assert b.get("play").fields == {"v": "int64"}
    a.declare(FactType("play", fields={"v": "int64", "w": "bool"}))
    assert b.get("play").fields == {"v": "int64"}  # cached
    assert b.get("play", refresh=True).fields == {"v": "int64", "w": "bool"}


def test_catalog_lists_several_types(store: Store) -> None:
    cat = FactTypeCatalog(store)
    for n in ("zeta", "alpha", "mid"):
        cat.declare(FactType(n))
    cat.declare(FactType("alpha", fields={"x": "int64"}))
    assert cat.names() == ["alpha", "mid", "zeta"]
    assert [ft.name for ft in cat.all()] == ["alpha", "mid", "zeta"]


def test_concurrent_declarations_converge(store: Store) -> None:
    """Threads (separate catalogs, as separate processes would be) each add their own field at
    once; the conditional put makes them take turns, and the last version has every field."""
    n = 6
    base = {"v": "int64"}
    FactTypeCatalog(store).declare(FactType("play", fields=base))
    barrier = threading.Barrier(n)
    results: list[tuple[int, object]] = []
    lock = threading.Lock()

    def declare(i: int) -> None:
        cat = FactTypeCatalog(store)
        barrier.wait()
        try:
            d = cat.declare(FactType("play", fields={**base, f"f{i}": "string"}))
            out: object = d
        except BaseException as exc:  # reported below
            out = exc
        with lock:
            results.append((i, out))

    threads = [threading.Thread(target=declare, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(not isinstance(r, BaseException) for _, r in results), results
    history = FactTypeCatalog(store).history("play")
    assert len(history) == n + 1  # every addition is its own version: nothing was lost
    final = history[-1]
    assert set(final.fields) == {"v", *(f"f{i}" for i in range(n))}
    for older, newer in zip(history, history[1:], strict=False):
        assert set(older.fields) < set(newer.fields)
        assert list(newer.fields)[: len(older.fields)] == list(older.fields)  # column order kept
    # Each declaration's returned schema contains the field it asked for.
    assert sorted(i for i, _ in results) == list(range(n))
    for i, r in results:
        assert isinstance(r, Declared) and r.created
        assert f"f{i}" in r.fact_type.fields
