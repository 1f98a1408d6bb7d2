"""facts stats: exact figures on constructed data, before and after compaction."""

from __future__ import annotations

import json

import pytest

from factlog import Compactor, FactType, FactTypeCatalog, fact_stats
from tests.factdata import DAY, T0, H, write_facts
from ttstore import ManualClock, Store
from ttstore._cli import main

ST = FactType("st", entity=("member_id", "int64"), fields={"a": "int64", "b": "string"})
M = 60_000_000


def _r(member, fid, ev, logged, a=None, b=None):
    return {"member_id": member, "fact_id": fid, "event_time": ev, "logged_at": logged,
            "a": a, "b": b}


def _build(store: Store) -> None:
    FactTypeCatalog(store).declare(ST)
    write_facts(store, ST, [_r(1, "f1", T0, T0, a=1),
                            _r(2, "f4", T0 + 10 * M, T0 + 10 * M, 5, "y")],
                writer="a", ingested_at_us=T0 + 20 * M)
    # f1 again (same payload, later logged_at: a duplicate, not a conflict); f4 with another
    # payload and the same logged_at: a conflict, which the smaller canonical JSON (a=5) wins.
    write_facts(store, ST, [_r(1, "f1", T0, T0 + 10_000_000, a=1),
                            _r(2, "f4", T0 + 10 * M, T0 + 10 * M, 6, "y")],
                writer="b", ingested_at_us=T0 + 20 * M)
    # Late by 2h, ingested a minute after it was logged.
    write_facts(store, ST, [_r(1, "f2", T0 + H, T0 + 3 * H, b="x")], writer="l",
                ingested_at_us=T0 + 3 * H + M)
    # Imported 5h and 4h after their logged_at.
    write_facts(store, ST, [_r(3, "f5", T0 + DAY, T0 + DAY, 2, "z"),
                            _r(3, "f6", T0 + DAY + H, T0 + DAY + H)],
                writer="c", producer="importer", ingested_at_us=T0 + DAY + 5 * H)


def test_figures_are_exact(store: Store) -> None:
    _build(store)
    s = fact_stats(store)["fact_types"][0]
    assert s["fact_type"] == "st" and s["facts"] == 5 and s["copies"] == 7
    assert [(d["date"], d["facts"], d["copies"], d["live_files"]) for d in s["days"]] == [
        ("2027-01-01", 3, 5, 3), ("2027-01-02", 2, 2, 1)]
    assert s["null_rate"] == {"a": 0.4, "b": 0.4}
    # lateness: [0, 0, 0, 0, 2h] -> nearest-rank p50 = 0, p99 = 2h
    assert s["lateness"] == {"p50_s": 0.0, "p99_s": 7200.0, "max_s": 7200.0, "late": 1,
                             "late_share": 0.2}
    assert s["imports"] == {"count": 2, "share": 0.4}
    assert s["duplicates"] == {"live": 2, "removed_by_compaction": 0, "total": 2}
    assert s["conflicts"] == {"count": 1, "facts": [{"entity": 2, "fact_id": "f4"}]}

    # Compaction removes the copies; the record keeps the duplicates and the conflict.
    Compactor(store, clock=ManualClock(T0 + 2 * DAY)).run()
    after = fact_stats(store)["fact_types"][0]
    assert after["facts"] == 5 and after["copies"] == 5
    assert after["duplicates"] == {"live": 0, "removed_by_compaction": 2, "total": 2}
    assert after["conflicts"] == s["conflicts"]
    assert after["days"][0]["live_files"] == 1
    assert after["days"][0]["files_awaiting_deletion"] == 3
    assert after["days"][0]["duplicates_removed_by_compaction"] == 2
    for k in ("null_rate", "lateness", "imports"):
        assert after[k] == s[k]

    # A new conflicting copy of the already-resolved fact is still one conflict.
    write_facts(store, ST, [_r(2, "f4", T0 + 10 * M, T0 + 10 * M, 7, "y")], writer="d",
                ingested_at_us=T0 + 20 * M)
    assert fact_stats(store)["fact_types"][0]["conflicts"]["count"] == 1


def test_since_until_and_fact_type_selection(store: Store) -> None:
    _build(store)
    FactTypeCatalog(store).declare(FactType("other", fields={"x": "int64"}))
    rep = fact_stats(store, fact_types=["st"], since_us=T0 + DAY)
    assert [s["fact_type"] for s in rep["fact_types"]] == ["st"]
    s = rep["fact_types"][0]
    assert s["facts"] == 2 and s["imports"]["count"] == 2 and s["conflicts"]["count"] == 0
    rep = fact_stats(store, until_us=T0 + H)
    other, st_ = rep["fact_types"]  # sorted by name
    assert st_["facts"] == 3 and st_["lateness"]["late"] == 1  # f2's event_time is T0+1h
    assert other["facts"] == 0 and other["null_rate"] == {"x": None}
    assert other["lateness"]["p50_s"] is None


def test_cli_stats(local_store: Store, capsys: pytest.CaptureFixture[str]) -> None:
    store = local_store
    _build(store)
    assert main(["facts", "stats", "--store", store.url, "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == fact_stats(store)
    assert main(["facts", "stats", "--store", store.url, "--since", "2027-01-02", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["fact_types"][0]["facts"] == 2
    assert main(["facts", "stats", "--store", store.url, "--until", "2027-01-01"]) == 0
    out = capsys.readouterr().out
    assert "st per day" in out and "2027-01-01" in out and "2027-01-02" not in out
    assert "conflict: st entity 2 fact_id f4" in out
    assert main(["facts", "stats", "--store", store.url, "--since", "2027-01-02",
                 "--until", "2027-01-01"]) == 2
    assert main(["facts", "stats", "--store", store.url, "--since", "yesterday"]) == 2
    assert "invalid_timestamp" in capsys.readouterr().err
