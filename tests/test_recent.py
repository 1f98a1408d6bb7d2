"""Newest-first lookups (``timetravel_api._recent``): one entity's ``last``-type features read
only the recent partitions when those hold the answer, fall back to the whole history when they
do not (old facts only, null fields, facts logged too late to be visible), and always answer as
the full read and the brute-force reference do."""

from __future__ import annotations

from typing import Any

import pyarrow as pa
import pytest

import timetravel_api._engine as engine_mod
from factlog import FactTypeCatalog
from timetravel_api import Engine
from ttstore import TIMESTAMP_TYPE, Store

from .factdata import DAY, PLAY, T0, H, write_facts
from .reference import reference_features
from .test_engine import pylist, same

NAMES = ["play.secs.last", "play.video_id", "play.time_since_last", "play.count.1d",
         "play.secs.sum.7d", "play.tag.last", "play.secs.last.2d"]


def _row(member: int, k: int, ev: int, la: int | None = None, **fields: Any) -> dict[str, Any]:
    base = {"video_id": None, "secs": None, "tag": None, "meta": None, "at": None, "ids": None}
    return {"member_id": member, "fact_id": f"m{member}-{k:03d}", "event_time": ev,
            "logged_at": ev if la is None else la, **base, **fields}


def history() -> list[dict[str, Any]]:
    rows = []
    for d in range(20):  # 1: a fact every day
        rows.append(_row(1, d, T0 + d * DAY + 5 * H, secs=float(d), video_id=d, tag=f"t{d}"))
    for d in range(3):  # 2: only old facts
        rows.append(_row(2, d, T0 + d * DAY, secs=10.0 + d, video_id=100 + d, tag="old"))
    rows.append(_row(3, 0, T0 + H, secs=1.5, tag="first"))  # 3: recent facts have secs null
    rows += [_row(3, 1 + d, T0 + (15 + d) * DAY, video_id=d) for d in range(5)]
    rows.append(_row(4, 0, T0 + 2 * DAY, secs=4.0, video_id=4))  # 4: the recent one is late
    rows.append(_row(4, 1, T0 + 18 * DAY, T0 + 25 * DAY, secs=5.0, video_id=5))
    return rows


def answer(engine: Engine, entity: int, at: list[int], knowledge: str) -> Any:
    return engine.features([entity] * len(at), pa.array(at, pa.int64()).cast(TIMESTAMP_TYPE),
                           NAMES, knowledge=knowledge)


@pytest.mark.parametrize("knowledge", ["as_known", "event"])
def test_newest_first_answers_as_the_full_read(
    store: Store, knowledge: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    FactTypeCatalog(store).declare(PLAY)
    rows = history()
    write_facts(store, PLAY, rows)
    engine = Engine(store, workers=1)
    times = [T0 + 19 * DAY + 6 * H, T0 + 12 * DAY, T0 + 18 * DAY + 1, T0 + 26 * DAY]
    cases = [(e, [t]) for e in (1, 2, 3, 4, 99) for t in times] + [(1, times), (4, times)]
    got = {(e, tuple(at)): answer(engine, e, at, knowledge) for e, at in cases}
    monkeypatch.setattr(engine_mod, "RECENT_MAX_ROWS", 0)  # the plain full read
    full = Engine(store, workers=1)
    for e, at in cases:
        res, whole = got[(e, tuple(at))], answer(full, e, at, knowledge)
        want = reference_features(rows, NAMES, [(e, t) for t in at], entity_col="member_id",
                                  field_types=dict(PLAY.fields), knowledge=knowledge,
                                  lookback_us=None)
        for name in NAMES:
            vals, st = pylist(res.values.column(name)), res.status.column(name).to_pylist()
            assert vals == pylist(whole.values.column(name)), (e, at, name)
            assert st == whole.status.column(name).to_pylist(), (e, at, name)
            for q, (wv, ws) in enumerate(want[name]):
                assert st[q] == ws and same(vals[q], wv), (e, at[q], name, vals[q], wv)


def test_newest_first_reads_only_the_recent_partitions(store: Store) -> None:
    FactTypeCatalog(store).declare(PLAY)
    write_facts(store, PLAY, history())
    engine = Engine(store, workers=1)
    at = T0 + 19 * DAY + 6 * H
    recent = answer(engine, 1, [at], "as_known")  # its newest facts have every value
    dates = [p.rsplit("=", 1)[1] for p in recent.lineage["fact_partitions"]["play"]]
    assert dates == [f"2027-01-{d}" for d in range(13, 21)]  # 7d window, then at's own day
    assert recent.values.column("play.secs.last").to_pylist() == [19.0]
    old = answer(engine, 2, [at], "as_known")  # nothing recent: the whole history is read
    assert min(old.lineage["fact_partitions"]["play"]) == "facts/play/date=2027-01-01"
    assert old.values.column("play.secs.last").to_pylist() == [12.0]
    assert old.values.column("play.count.1d").to_pylist() == [0]
    late = answer(engine, 4, [T0 + 20 * DAY], "as_known")  # the recent fact is not known yet
    assert late.values.column("play.secs.last").to_pylist() == [4.0]
    assert min(late.lineage["fact_partitions"]["play"]) == "facts/play/date=2027-01-01"
    nulls = answer(engine, 3, [T0 + 19 * DAY], "as_known")  # secs null in every recent fact
    assert nulls.values.column("play.secs.last").to_pylist() == [1.5]
    assert nulls.values.column("play.video_id").to_pylist() == [4]
