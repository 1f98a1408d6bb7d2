"""The engine's online path reuses work within a call, never across calls: a fact object written
after a lookup is in the next one; one listing serves the scan and the lineage (and a scan whose
listing went stale lists again); heartbeats are read through a short-lived cache whose stale
answers are conservative; fact-only names never list snapshot runs."""

from __future__ import annotations

import json
from typing import Any

import pytest

from factlog import FactReader, FactTypeCatalog, Heartbeat
from factlog._heartbeat import WatermarkCache
from factlog._parquetio import RowGroupCache
from factlog._partitions import FactFile
from tests.api_helpers import BIG, add_late_object, seed
from tests.factdata import DAY, PLAY, T0, H, write_facts
from timetravel_api import Engine
from timetravel_api._server import ApiConfig
from ttstore import InvalidInput, ManualClock, Store


class FakeMonotonic:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def put_heartbeat(store: Store, *, watermark_us: int, updated_at_us: int,
                  closed: bool = False, writer: str = "w-live") -> None:
    hb = Heartbeat(writer_id=writer, producer="svc", fact_types=("play",),
                   watermark_us=watermark_us, updated_at_us=updated_at_us, started_at_us=T0,
                   closed=closed)
    store.put(f"catalog/heartbeats/{writer}.json", json.dumps(hb.to_json()).encode())


def test_new_object_is_in_the_next_lookup(local_store: Store) -> None:
    seed(local_store)
    engine = Engine(local_store, clock=ManualClock(T0 + 20 * DAY), workers=1,
                    watermark_cache_s=60.0)
    engine.facts.row_groups = RowGroupCache(max_bytes=1 << 24)
    names = ["play.secs.last", "play.count.7d"]
    for _ in range(2):  # warm every cache
        first = engine.features([1], T0 + 6 * DAY, names)
    assert first.values.to_pylist() == [{"play.secs.last": 4.0, "play.count.7d": 3}]
    before = set(first.lineage["fact_files"]["play"])
    add_late_object(local_store)
    again = engine.features([1], T0 + 6 * DAY, names)
    assert again.values.to_pylist() == [{"play.secs.last": 100.0, "play.count.7d": 4}]
    added = set(again.lineage["fact_files"]["play"]) - before
    assert len(added) == 1 and added.pop().endswith("w2-0000000007.parquet")
    assert again.lineage["fact_files"] == engine.features(
        [1], T0 + 6 * DAY, names).lineage["fact_files"]


def test_scan_with_a_stale_listing_lists_again(local_store: Store) -> None:
    FactTypeCatalog(local_store).declare(PLAY)
    write_facts(local_store, PLAY, [
        {"member_id": 1, "fact_id": "a", "event_time": T0 + H, "logged_at": T0 + H,
         "video_id": 1},
        {"member_id": 2, "fact_id": "b", "event_time": T0 + DAY, "logged_at": T0 + DAY,
         "video_id": 2}])
    reader = FactReader(local_store)
    live = reader.live_files("play")
    assert len(live) == 2
    table, files = reader.scan_with_files("play", files=live)
    assert files == live and table.column("fact_id").to_pylist() == ["a", "b"]
    gone = FactFile(live[0].key.rsplit("/", 1)[0] + "/w9-0000000001.parquet", 100, "play",
                    live[0].date, "raw")
    table, files = reader.scan_with_files("play", files=[*live, gone])
    assert files == live and table.column("fact_id").to_pylist() == ["a", "b"]
    assert reader.scan("play", files=[gone]).column("fact_id").to_pylist() == ["a", "b"]
    empty, files = reader.scan_with_files("play", entities=[], files=live)
    assert empty.num_rows == 0 and files == live


def test_watermark_cache_reuses_one_reading_for_its_ttl(local_store: Store) -> None:
    now = T0 + 10 * H
    put_heartbeat(local_store, watermark_us=T0 + 5 * H, updated_at_us=now)
    mono = FakeMonotonic()
    cache = WatermarkCache(local_store, ttl_s=0.25, monotonic=mono)
    assert cache.watermarks(now_us=now) == {"play": T0 + 5 * H}
    # the watermark rises and then the producer closes: within the TTL the older, lower
    # watermark is still used (conservative), after it the new state
    put_heartbeat(local_store, watermark_us=T0 + 6 * H, updated_at_us=now)
    mono.t += 0.2
    assert cache.watermarks(now_us=now) == {"play": T0 + 5 * H}
    mono.t += 0.1
    assert cache.watermarks(now_us=now) == {"play": T0 + 6 * H}
    put_heartbeat(local_store, watermark_us=T0 + 6 * H, updated_at_us=now, closed=True)
    mono.t += 0.1
    # a caller's clock far past the heartbeat's liveness: still judged as at the reading
    assert cache.watermarks(now_us=now + 3600 * 1_000_000) == {"play": T0 + 6 * H}
    mono.t += 0.2
    assert cache.watermarks(now_us=now) == {"play": None}
    # ttl 0 reads every time
    fresh = WatermarkCache(local_store, ttl_s=0, monotonic=mono)
    put_heartbeat(local_store, watermark_us=T0 + 7 * H, updated_at_us=now)
    assert fresh.watermarks(now_us=now) == {"play": T0 + 7 * H}
    put_heartbeat(local_store, watermark_us=T0 + 8 * H, updated_at_us=now)
    assert fresh.watermarks(now_us=now) == {"play": T0 + 8 * H}
    with pytest.raises(ValueError):
        WatermarkCache(local_store, ttl_s=-1)


def test_engine_completeness_through_the_watermark_cache(local_store: Store) -> None:
    FactTypeCatalog(local_store).declare(PLAY)
    write_facts(local_store, PLAY, [{"member_id": 1, "fact_id": "x", "event_time": T0,
                                     "logged_at": T0, "video_id": 1}])
    now = T0 + 10 * H
    put_heartbeat(local_store, watermark_us=T0 + 5 * H, updated_at_us=now)
    engine = Engine(local_store, clock=ManualClock(now), workers=1, watermark_cache_s=0.25)
    mono = FakeMonotonic()
    engine.watermarks = WatermarkCache(local_store, ttl_s=0.25, monotonic=mono)
    assert not engine.features([1], T0 + 6 * H, ["play.count.1d"]).complete
    put_heartbeat(local_store, watermark_us=T0 + 7 * H, updated_at_us=now)
    assert not engine.features([1], T0 + 6 * H, ["play.count.1d"]).complete  # cached, lower
    mono.t += 1.0
    assert engine.features([1], T0 + 6 * H, ["play.count.1d"]).complete
    with pytest.raises(InvalidInput):
        Engine(local_store, watermark_cache_s=-0.5)
    with pytest.raises(InvalidInput):
        ApiConfig(watermark_cache_s=float("nan"))
    assert ApiConfig().watermark_cache_s == 0.25


def test_fact_only_names_do_not_list_snapshot_runs(
        local_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    seed(local_store)
    engine = Engine(local_store, clock=ManualClock(T0 + 20 * DAY), workers=1)
    listed: list[int] = []
    runs = engine.snapshots.runs

    def counting() -> Any:
        listed.append(1)
        return runs()

    monkeypatch.setattr(engine.snapshots, "runs", counting)
    res = engine.features([1], T0 + 6 * DAY, ["play.secs.last"])
    assert res.values.to_pylist() == [{"play.secs.last": 4.0}] and listed == []
    res = engine.features([1], T0 + 8 * H, ["snapshot.history.count"])
    assert res.values.to_pylist() == [{"snapshot.history.count": 3}] and listed


def _same(a: Any, b: Any) -> bool:
    """Equal tables, NaN equal to NaN (``Table.equals`` says NaN != NaN)."""
    return bool(a.schema == b.schema and repr(a.to_pylist()) == repr(b.to_pylist()))


def _cached_engine(store: Store, max_bytes: int) -> Engine:
    engine = Engine(store, clock=ManualClock(T0 + 20 * DAY), workers=1)
    engine.facts.row_groups = RowGroupCache(max_bytes=max_bytes)
    return engine


def test_one_decoded_copy_of_a_row_group_serves_every_column_set(local_store: Store) -> None:
    seed(local_store)
    engine = _cached_engine(local_store, 1 << 24)
    cache = engine.facts.row_groups
    assert cache is not None
    plain = Engine(local_store, clock=ManualClock(T0 + 20 * DAY), workers=1)
    first, second = ["play.secs.last"], ["play.video_id.last", "play.secs.sum.7d"]
    for names in (first, second, first):
        got = engine.features([1, 3], T0 + 6 * DAY, names)
        assert _same(got.values, plain.features([1, 3], T0 + 6 * DAY, names).values)
    # second asked for a column the groups lacked: each was read again with both sets and
    # replaced (one entry per group, bytes as kept); first then hit the wider copies
    groups = len(cache._items)
    assert groups and cache.bytes == sum(g.nbytes for g in cache._items.values())
    assert all({"secs", "video_id"} <= set(g.names) for g in cache._items.values())
    misses = cache.misses
    engine.features([1, 3], T0 + 6 * DAY, first)
    assert cache.misses == misses


def test_warm_decodes_newest_dates_first_until_the_budget(local_store: Store) -> None:
    seed(local_store)
    full = _cached_engine(local_store, 1 << 26)
    assert full.facts.warm() > 0
    cache = full.facts.row_groups
    assert cache is not None
    schema_cols = {n: set(full.facts.fact_type(n).arrow_schema().names) for n in ("play", "page")}
    assert all(set(g.names) == schema_cols["play"] or set(g.names) == schema_cols["page"]
               for g in cache._items.values())
    assert full.facts.warm() == 0  # everything is held already
    sizes = {k: g.nbytes for k, g in cache._items.items()}
    # warmed, every lookup hits, and answers are those of an engine without a cache
    plain = Engine(local_store, clock=ManualClock(T0 + 20 * DAY), workers=1)
    misses = cache.misses
    names = ["play.secs.last", "play.count.7d", "play.tag.last"]
    for at in (T0 + 2 * H, T0 + 6 * DAY):
        got = full.features([1, BIG], at, names)
        assert _same(got.values, plain.features([1, BIG], at, names).values)
    assert cache.misses == misses

    # a budget for about one group: the newest date's is the one decoded
    newest = max(sizes, key=lambda k: _date_of(k[0]))
    small = _cached_engine(local_store, int(sizes[newest] / 0.9) + 1)
    assert small.facts.warm() >= 1
    assert small.facts.row_groups is not None
    kept = list(small.facts.row_groups._items)
    assert kept[0][0] == newest[0] or _date_of(kept[0][0]) == _date_of(newest[0])

    stopped = _cached_engine(local_store, 1 << 26)
    assert stopped.facts.warm(stop=lambda: True) == 0


def _date_of(key: str) -> str:
    return key.split("date=")[1].split("/")[0]
