"""FactLogger: what is logged comes back from the store exactly, once; counters, drops, buffer
bounds, spool locking, threads, asyncio, heartbeats and metrics."""

from __future__ import annotations

import asyncio
import re
import threading
from datetime import UTC, datetime, timedelta
from pathlib import Path

import numpy as np
import pyarrow as pa
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from factlog import (
    BufferFull,
    FactLogger,
    FactTypeCatalog,
    LoggerClosed,
    SpoolLocked,
    producer_watermarks,
    read_heartbeats,
)
from ttstore import TIMESTAMP_TYPE, InvalidInput, ManualClock, Store

from .logger_helpers import (  # noqa: F401  (no_logger_threads_left is an autouse fixture)
    DAY,
    FAST,
    PLAY,
    T0,
    WriterGateClock,
    fact_keys,
    id_counts,
    make_logger,
    no_logger_threads_left,
    read_facts,
    row,
)


def test_rows_and_batches_come_back_exactly(store: Store, tmp_path: Path) -> None:
    clock = ManualClock(T0 + 5 * DAY)
    with make_logger(store, tmp_path / "spool", clock=clock) as lg:
        for i in range(300):
            clock.advance(1)
            assert lg.log("play", row(i)) is True
        # explicit event times, as an aware datetime and as RFC 3339 (one day earlier)
        assert lg.log("play", row(1000, event_time=datetime(2027, 1, 5, 12, 0, tzinfo=UTC)))
        assert lg.log("play", row(1001, event_time="2027-01-05T13:00:00.5+01:00"))
        n = 200
        batch = pa.table({
            "member_id": pa.array(np.arange(2000, 2000 + n)),
            "event_time": pa.array(np.full(n, T0 + 3 * DAY), pa.int64()).cast(TIMESTAMP_TYPE),
            "video_id": pa.array(np.arange(n)),
            "seconds": pa.array(np.linspace(0, 1, n)),
            "device": pa.array(["tv"] * n),
        })
        seq = lg.log_batch("play", batch)
        lg.wait_durable(seq, 30)
        lg.flush(30)
        got = read_facts(store)
        stats = lg.stats()
        writer_id = lg.writer_id

    assert got.num_rows == 302 + n
    assert max(id_counts(got).values()) == 1  # fact ids unique
    by_member = {r["member_id"]: r for r in got.to_pylist()}
    assert set(by_member) == {*range(300), 1000, 1001, *range(2000, 2000 + n)}
    for i in range(300):
        r = by_member[i]
        assert {k: r[k] for k in row(i)} == row(i)
        assert r["event_time"] == r["logged_at"]  # default event_time: one clock reading
        assert r["logged_at"] == datetime(2027, 1, 6, tzinfo=UTC) + timedelta(microseconds=i + 1)
        assert r["producer"] == "svc"
    assert by_member[1000]["event_time"] == datetime(2027, 1, 5, 12, 0, tzinfo=UTC)
    assert by_member[1001]["event_time"] == datetime(2027, 1, 5, 12, 0, 0, 500000, tzinfo=UTC)
    for i in range(n):
        r = by_member[2000 + i]
        assert r["video_id"] == i and r["device"] == "tv" and r["autoplay"] is None
        assert r["event_time"] == datetime(2027, 1, 4, tzinfo=UTC)
        assert r["logged_at"] == datetime(2027, 1, 6, 0, 0, 0, 300, tzinfo=UTC)
    # objects: one per UTC date of event_time, named after the writer and the segment
    keys = fact_keys(store)
    pat = re.compile(rf"^facts/play/date=(2027-01-0[456])/{writer_id}-(\d{{10}})\.parquet$")
    matches = [pat.match(k) for k in keys]
    assert all(matches), keys
    assert {m.group(1) for m in matches if m} == {"2027-01-04", "2027-01-05", "2027-01-06"}
    assert (stats.accepted, stats.durable, stats.written) == (302 + n, 302 + n, 302 + n)
    assert stats.dropped == {} and stats.buffered == 0 and stats.spool_segments == 0
    # the spool is empty once everything is uploaded
    assert list((tmp_path / "spool" / "segments").iterdir()) == []


def test_bad_rows_are_counted_never_raised(local_store: Store, tmp_path: Path) -> None:
    with make_logger(local_store, tmp_path / "spool") as lg:
        assert lg.log("play", row(1))
        assert lg.log("nope", row(2))  # accepted, then dropped by the writer
        assert lg.log(123, row(3))  # type: ignore[arg-type]
        assert lg.log("play", {"member_id": "x"})
        assert lg.log("play", {"member_id": 5, "bogus": 1})
        assert lg.log("play", "not a dict")  # type: ignore[arg-type]
        assert lg.log("play", {"member_id": 6, "event_time": "2027-01-01T00:00:00"})  # naive
        assert lg.log("play", {"member_id": 7, "seconds": "slow"})
        assert lg.log("../x", row(8))
        assert lg.log("play", row(9))
        lg.flush(30)
        stats = lg.stats()
        got = read_facts(local_store)
    assert sorted(got.column("member_id").to_pylist()) == [1, 9]
    assert stats.dropped == {
        "unknown_fact_type": 3, "invalid:invalid_type": 2, "invalid:unknown_field": 1,
        "invalid:invalid_fact": 1, "invalid:invalid_timestamp": 1,
    }
    assert stats.accepted == 10 and stats.durable == 2 and stats.written == 2


def test_drop_policy_counts_buffer_full(local_store: Store, tmp_path: Path) -> None:
    clock = WriterGateClock(T0)
    lg = make_logger(local_store, tmp_path / "spool", clock=clock, max_buffer_rows=10)
    try:
        accepted = [lg.log("play", row(i)) for i in range(25)]
        assert accepted == [True] * 10 + [False] * 15
        assert lg.stats().dropped == {"buffer_full": 15}
    finally:
        clock.gate.set()
    lg.flush(30)
    assert sorted(read_facts(local_store).column("member_id").to_pylist()) == list(range(10))
    lg.close()
    assert lg.log("play", row(99)) is False
    assert lg.stats().dropped == {"buffer_full": 15, "closed": 1}
    with pytest.raises(LoggerClosed):
        lg.log_batch("play", pa.table({"member_id": [1]}))
    with pytest.raises(LoggerClosed):
        lg.flush(1)


def test_block_policy_waits_for_room_then_drops(local_store: Store, tmp_path: Path) -> None:
    clock = WriterGateClock(T0)
    lg = make_logger(local_store, tmp_path / "spool", clock=clock, max_buffer_rows=4,
                     full_policy="block", block_timeout_s=0.05)
    try:
        assert [lg.log("play", row(i)) for i in range(4)] == [True] * 4
        assert lg.log("play", row(4)) is False  # waited its bound, then dropped
        assert lg.stats().dropped == {"buffer_full": 1}
        # With a longer bound, room made by the writer lets the fact in.
        lg._b.block_timeout_s = 30.0
        opener = threading.Timer(0.1, clock.gate.set)
        opener.start()
        assert lg.log("play", row(5)) is True
        opener.join()
    finally:
        clock.gate.set()
    lg.close()
    assert sorted(read_facts(local_store).column("member_id").to_pylist()) == [0, 1, 2, 3, 5]


def _batch(start: int, n: int) -> pa.Table:
    return pa.table({
        "member_id": pa.array(np.arange(start, start + n)),
        "event_time": pa.array(np.full(n, T0), pa.int64()).cast(TIMESTAMP_TYPE),
    })


def test_log_batch_blocks_then_raises_and_is_not_accepted(local_store: Store,
                                                           tmp_path: Path) -> None:
    clock = WriterGateClock(T0 + 1000)
    lg = make_logger(local_store, tmp_path / "spool", clock=clock, max_buffer_rows=10)
    try:
        lg.log_batch("play", _batch(0, 8))
        with pytest.raises(BufferFull, match="not accepted"):
            lg.log_batch("play", _batch(100, 8), timeout_s=0.1)
        assert lg.stats().accepted == 8
    finally:
        clock.gate.set()
    lg.log_batch("play", _batch(200, 8))  # room again once the writer drains
    lg.close()
    got = sorted(read_facts(local_store).column("member_id").to_pylist())
    assert got == [*range(8), *range(200, 208)]


def test_log_batch_rejects_rows_and_whole_tables(local_store: Store, tmp_path: Path) -> None:
    from factlog import FactValidationError, UnknownFactType

    with make_logger(local_store, tmp_path / "spool", clock=ManualClock(T0 + DAY)) as lg:
        with pytest.raises(UnknownFactType):
            lg.log_batch("nope", _batch(0, 2))
        with pytest.raises(FactValidationError, match="bogus"):
            lg.log_batch("play", _batch(0, 2).append_column("bogus", pa.array([1, 2])))
        t = pa.table({"member_id": pa.array([1, None, 3], pa.int64()),
                      "event_time": pa.array([T0] * 3, pa.int64()).cast(TIMESTAMP_TYPE)})
        lg.log_batch("play", t)
        lg.flush(30)
        assert lg.stats().dropped == {"invalid:missing_entity": 1}
    assert sorted(read_facts(local_store).column("member_id").to_pylist()) == [1, 3]


def test_spool_dir_is_exclusive(local_store: Store, tmp_path: Path) -> None:
    with make_logger(local_store, tmp_path / "spool") as lg:
        with pytest.raises(SpoolLocked, match="in use by another FactLogger"):
            make_logger(local_store, tmp_path / "spool")
        assert lg.log("play", row(1))
    # released on close: the next logger gets the same writer id
    with make_logger(local_store, tmp_path / "spool") as again:
        assert again.writer_id == lg.writer_id


def test_same_producer_two_spools_never_overwrite(store: Store, tmp_path: Path) -> None:
    a = make_logger(store, tmp_path / "a", producer="replica")
    b = make_logger(store, tmp_path / "b", producer="replica")
    try:
        assert a.writer_id != b.writer_id
        for i in range(200):
            a.log("play", row(i))
            b.log("play", row(1000 + i))
        a.flush(30)
        b.flush(30)
    finally:
        a.close()
        b.close()
    got = read_facts(store)
    assert sorted(got.column("member_id").to_pylist()) == [*range(200), *range(1000, 1200)]
    keys = fact_keys(store)
    assert {k.rsplit("/", 1)[1].split("-")[0] for k in keys} == {a.writer_id, b.writer_id}


def test_many_threads_exact_counts(local_store: Store, tmp_path: Path) -> None:
    threads, per = 8, 5000
    lg = make_logger(local_store, tmp_path / "spool", full_policy="block", block_timeout_s=30.0,
                     segment_max_age_s=1.0)
    start = threading.Barrier(threads)
    results: list[int] = []

    def work(t: int) -> None:
        start.wait()
        ok = sum(lg.log("play", row(t * per + i)) for i in range(per))
        results.append(ok)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    lg.flush(60)
    stats = lg.stats()
    lg.close()
    assert results == [per] * threads
    got = read_facts(local_store)
    members = got.column("member_id").to_pylist()
    assert len(members) == threads * per and set(members) == set(range(threads * per))
    assert max(id_counts(got).values()) == 1
    assert stats.accepted == stats.durable == stats.written == threads * per


async def test_asyncio_service_logs_from_the_event_loop(local_store: Store,
                                                        tmp_path: Path) -> None:
    async with make_logger(local_store, tmp_path / "spool", clock=ManualClock(T0 + DAY)) as lg:
        async def handle(i: int) -> None:
            await asyncio.sleep(0)
            assert lg.log("play", row(i))

        await asyncio.gather(*(handle(i) for i in range(2000)))
        await lg.await_durable(lg.checkpoint(), 30)
        assert lg.stats().durable == 2000
        ticker_ran = 0

        async def ticker() -> None:  # the loop keeps running while aflush waits
            nonlocal ticker_ran
            while True:
                ticker_ran += 1
                await asyncio.sleep(0.001)

        tick = asyncio.create_task(ticker())
        await lg.aflush(30)
        tick.cancel()
        assert ticker_ran > 0
        seq = lg.log_batch("play", _batch(5000, 10))
        await lg.await_durable(seq, 30)
    got = read_facts(local_store)
    assert sorted(got.column("member_id").to_pylist()) == [*range(2000), *range(5000, 5010)]
    assert max(id_counts(got).values()) == 1


def test_fact_types_are_declared_and_catalog_types_resolved(local_store: Store,
                                                             tmp_path: Path) -> None:
    from factlog import FactType

    page = FactType("page", entity=("user", "string"), fields={"path": "string"})
    FactTypeCatalog(local_store).declare(page)  # declared by someone else
    with make_logger(local_store, tmp_path / "spool") as lg:
        assert FactTypeCatalog(local_store).get("play") == PLAY
        assert lg.log("page", {"user": "u1", "path": "/a"})
        lg.flush(30)
    assert read_facts(local_store, "page").column("user").to_pylist() == ["u1"]


def test_heartbeat_watermark_and_liveness(local_store: Store, tmp_path: Path) -> None:
    clock = ManualClock(T0)
    lg = make_logger(local_store, tmp_path / "spool", clock=clock, heartbeat_interval_s=3600,
                     segment_max_age_s=3600)
    clock.advance(1_000_000)
    lg.log("play", row(1))
    lg.wait_durable(lg.checkpoint(), 30)
    clock.advance(5_000_000)
    # durable but not uploaded: the watermark stays at (or before) that fact's logged_at
    assert lg.upload_watermark_us() <= T0 + 1_000_000
    lg.flush(30)
    assert lg.upload_watermark_us() == T0 + 6_000_000  # nothing pending: "now"
    (hb,) = read_heartbeats(local_store)
    assert (hb.writer_id, hb.producer, hb.fact_types, hb.closed) == \
        (lg.writer_id, "svc", ("play",), False)
    assert hb.watermark_us == T0 + 6_000_000
    assert producer_watermarks(local_store, now_us=T0 + 7_000_000) == {"play": T0 + 6_000_000}
    # a heartbeat older than the ttl is not live
    assert producer_watermarks(local_store, now_us=T0 + 600_000_000, live_ttl_s=30) == \
        {"play": None}
    lg.close()
    (hb,) = read_heartbeats(local_store)
    assert hb.closed
    assert producer_watermarks(local_store, now_us=T0 + 7_000_000) == {"play": None}


def test_metrics_collector(local_store: Store, tmp_path: Path) -> None:
    registry = CollectorRegistry()
    with make_logger(local_store, tmp_path / "spool") as lg:
        lg.metrics_collector(registry)
        for i in range(5):
            lg.log("play", row(i))
        lg.log("nope", row(9))
        lg.flush(30)
        text = generate_latest(registry).decode()
        labels = f'producer="svc",writer_id="{lg.writer_id}"'
        assert f"timetravel_factlog_accepted_total{{{labels}}} 6.0" in text
        assert f"timetravel_factlog_written_total{{{labels}}} 5.0" in text
        assert f"timetravel_factlog_durable_total{{{labels}}} 5.0" in text
        assert ('timetravel_factlog_dropped_total{producer="svc",reason="unknown_fact_type",'
                f'writer_id="{lg.writer_id}"}} 1.0' in text)
        assert f"timetravel_factlog_spool_bytes{{{labels}}} 0.0" in text
        assert "timetravel_factlog_last_flush_age_seconds" in text


def test_config_is_validated(local_store: Store, tmp_path: Path) -> None:
    with pytest.raises(InvalidInput, match="full_policy"):
        FactLogger(store=local_store, producer="p", spool_dir=tmp_path / "s",
                   full_policy="maybe")  # type: ignore[arg-type]
    with pytest.raises(InvalidInput, match="batch_rows"):
        FactLogger(store=local_store, producer="p", spool_dir=tmp_path / "s", batch_rows=0)
    with pytest.raises(TypeError):
        FactLogger(store=local_store, producer="p", spool_dir=tmp_path / "s",  # type: ignore
                   flush_every=3)
    with pytest.raises(InvalidInput, match="producer"):
        FactLogger(store=local_store, producer="", spool_dir=tmp_path / "s")
    # a failed construction leaves the spool usable
    with FactLogger(store=local_store, producer="p", spool_dir=tmp_path / "s", **FAST):
        pass


def test_segments_rotate_by_size(local_store: Store, tmp_path: Path) -> None:
    with make_logger(local_store, tmp_path / "spool", segment_max_bytes=2000,
                     segment_max_age_s=60) as lg:
        for i in range(50):
            lg.log("play", row(i))
            lg.wait_durable(lg.checkpoint(), 30)
        lg.flush(30)
    assert len(fact_keys(local_store)) > 3
    got = read_facts(local_store)
    assert sorted(got.column("member_id").to_pylist()) == list(range(50))


def test_producer_watermarks_minimum_over_live_producers(local_store: Store) -> None:
    from factlog import Heartbeat
    from factlog._heartbeat import publish

    now = T0 + DAY

    def hb(wid: str, types: tuple[str, ...], wm: int, age_s: float, closed: bool = False) -> None:
        publish(local_store, Heartbeat(
            writer_id=wid, producer="p", fact_types=types, watermark_us=wm,
            updated_at_us=now - int(age_s * 1e6), started_at_us=T0, closed=closed))

    hb("a" * 32, ("play", "page"), now - 50, 1)
    hb("b" * 32, ("play",), now - 80, 2)
    hb("c" * 32, ("play",), now - 999_000_000, 3, closed=True)  # closed: not live
    hb("d" * 32, ("page",), now - 999_000_000, 120)  # stale: not live
    hb("e" * 32, ("search",), now - 999_000_000, 120)  # only a stale producer
    hb("f" * 32, ("page",), now - 20, 0)
    local_store.put("catalog/heartbeats/broken.json", b"{not json")
    assert producer_watermarks(local_store, now_us=now, live_ttl_s=30) == {
        "play": now - 80, "page": now - 50, "search": None}
    assert producer_watermarks(local_store.url, now_us=now, live_ttl_s=300) == {
        "play": now - 80, "page": now - 999_000_000, "search": now - 999_000_000}
